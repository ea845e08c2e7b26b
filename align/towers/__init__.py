"""Modality towers; importing this package registers the built-in ones."""
from align.towers import audio, open_clip, text  # noqa: F401
from align.towers.base import Tower, freeze_tower, projection_head  # noqa: F401
