"""Item embeddings of a catalogue (``embed.py``, ``align embed``) and exact search over them (``index.py``)."""
