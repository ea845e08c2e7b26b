"""Modality towers behind one interface (base.py); the built-ins are listed in align/registry.py."""
from align.towers.base import Tower, freeze_tower, projection_head  # noqa: F401
