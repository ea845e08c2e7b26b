"""Command-line pieces the simulator commands share (``align prep shop-sim`` and ``align prep
search-log simulate``): a flag per knob of the simulator's config dataclass (align/knobs.py), the
config read back from the parsed flags, and the ``--new`` manifests as catalogue positions."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Mapping, Sequence, Type, TypeVar

from align.errors import RunError
from align.rec.interactions import read_catalogue_ids

Config = TypeVar("Config")


def add_knob_flags(parser: argparse.ArgumentParser, config_type: Type, title: str,
                   aliases: Mapping[str, str]) -> None:
    """A flag ``--knob-name`` per field of ``config_type`` (plus ``aliases[field]``, e.g.
    ``--users``), typed and defaulted as the field, its help text from the field's metadata."""
    knobs = parser.add_argument_group(title)
    for knob in dataclasses.fields(config_type):
        flags = [f"--{knob.name.replace('_', '-')}"] + ([aliases[knob.name]] if knob.name in aliases else [])
        knobs.add_argument(*flags, dest=knob.name, type=type(knob.default), default=knob.default,
                           help=f"{knob.metadata['help']} ({knob.default})")


def config_from_flags(config_type: Type[Config], args: argparse.Namespace) -> Config:
    """The config whose knobs the parsed flags of ``add_knob_flags`` set (not yet validated)."""
    return config_type(**{k.name: getattr(args, k.name) for k in dataclasses.fields(config_type)})


def new_item_positions(item_ids: Sequence[str], manifests: Sequence[str], id_column: str) -> List[int]:
    """Positions in the catalogue ``item_ids`` of the items of the ``--new`` ``manifests``; an
    item that is not in the catalogue is a ``RunError`` naming the manifest and the item."""
    position: Dict[Any, int] = {item: index for index, item in enumerate(item_ids)}
    new_items = []
    for manifest in manifests:
        for item in read_catalogue_ids([manifest], id_column):
            if item not in position:
                raise RunError(f"--new {manifest}: item {item!r} is not in the --catalogue manifests; "
                               f"list the new manifest under --catalogue too")
            new_items.append(position[item])
    return new_items
