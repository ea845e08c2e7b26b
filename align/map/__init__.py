"""The catalogue in two dimensions (``align map``): one projection of every item's modality and fused
vectors (``project.py``), what each item shows (``items.py``), drawn as map.png (``png.py``) and as a
self-contained interactive map.html (``html.py``); the command is ``command.py``."""
