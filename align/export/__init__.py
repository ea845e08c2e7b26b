"""``align export``: a trained model's towers in formats that load without our code, each checked
by loading it with its own library (open_clip, sentence-transformers, onnxruntime).

``command.py`` is the verb; ``open_clip.py``, ``sentence_transformers.py`` and ``onnx.py`` write
and check one format each; ``quantize.py`` makes the int8 twins of the ONNX graphs (``--quantize
int8``), ``matryoshka.py`` cuts the towers to a prefix of their output (``--dim``); ``card.py``
writes the model card; ``libraries.py`` says which optional library a format lacks. Heavy libraries
are imported inside the functions that use them, so importing this package costs nothing.
"""
