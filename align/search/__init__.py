"""``align search``: the verb (``command.py``) over the query encoding and index search of
``align.index.search``."""
