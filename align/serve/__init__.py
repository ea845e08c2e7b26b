"""``align serve``: search (and recommendations) over HTTP with FastAPI + uvicorn (``app.py``), with
concurrent queries batched for the towers (``batching.py``)."""
