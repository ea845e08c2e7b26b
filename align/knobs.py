"""Knobs of a simulator (align/rec/simulate.py, align/searchlog/simulate.py): dataclass fields
that carry the help text their command-line flag shows, and one range check whose error names
the knob and that flag.

    @dataclass
    class MySimConfig:
        seed: int = knob(0, "random seed: the same seed gives the same log")

        def validate(self) -> None:
            check_knobs(self, {"seed": NON_NEGATIVE}, "my simulator", "align prep my-sim")
"""
from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any, Callable, Mapping, Tuple

from align.errors import ConfigError

Rule = Tuple[Callable[[float], bool], str]  # (test of a value, the rule in words for the error)
PROBABILITY: Rule = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
POSITIVE: Rule = (lambda v: v > 0, "> 0")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, ">= 1")


def knob(default: Any, help: str) -> Any:
    """A config field whose help text the command line (data_prep/) shows as the flag's."""
    return field(default=default, metadata={"help": help})


def check_knobs(config: Any, rules: Mapping[str, Rule], simulator: str, command: str) -> None:
    """Raise ``ConfigError`` for the first field of the ``config`` dataclass that is not a number
    (an integer where its default is one) or breaks its rule in ``rules`` (a field without one
    only has to be a number); the message names the ``simulator``, the knob, the rule and the
    knob's flag of ``command``."""
    for item in fields(config):
        value = getattr(config, item.name)
        check, rule = rules.get(item.name, (lambda v: True, ""))
        kind = int if isinstance(item.default, int) else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or not check(value):
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{simulator} {item.name} = {value!r}: must be {what} {rule} "
                              f"({command} --{item.name.replace('_', '-')})")
