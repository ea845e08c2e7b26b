"""Contrastive losses; importing this package registers them."""
from align.losses import infonce  # noqa: F401
