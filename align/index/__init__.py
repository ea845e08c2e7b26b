"""A catalogue's item vectors and search over them: the vectors folder (``vectors.py``), ``align
embed`` that writes it (``embed.py``), exact search (``index.py``), FAISS indexes (``build.py``,
``align index``) and queries encoded into the same space (``search.py``)."""
