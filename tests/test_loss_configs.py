"""Every registered loss has a typed ``Config`` that matches its keyword constructor, and
``from_config`` builds the same module as the keywords do."""
from __future__ import annotations

import dataclasses
import inspect
import pickle
import typing

import pytest
import torch
import torch.nn.functional as F

from align.registry import LOSSES


def keyword_parameters(loss_cls):
    """name -> (annotation, default) of the constructor, as a caller sees it."""
    hints = typing.get_type_hints(loss_cls.__init__)
    params = inspect.signature(loss_cls).parameters
    return {name: (hints.get(name), p.default) for name, p in params.items()}, params


def other_value(tp, default):
    """A valid value of type ``tp`` different from ``default``."""
    if typing.get_origin(tp) is typing.Literal:
        return next(choice for choice in typing.get_args(tp) if choice != default)
    if tp is bool:
        return not default
    if tp is int:
        return default // 2 + 1
    if tp is float:
        return default + 0.25
    if tp == typing.Optional[typing.Dict[str, float]]:  # graded_infonce's grade -> weight table
        return {"1": 0.5, "2": 1.0}
    raise AssertionError(f"no test value for {tp}")


def description(module):
    """Type, plain attributes and tensors of a module and its submodules."""
    parts = [(name, type(sub), {k: v for k, v in vars(sub).items() if not k.startswith("_")})
             for name, sub in module.named_modules()]
    return parts, {k: v.tolist() for k, v in module.state_dict().items()}


def outputs(loss):
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(6, 4, generator=g), dim=1)
    groups = torch.tensor([0, 0, 1, -1, 1, 2])
    return {k: v.item() for k, v in loss(a, b, logit_scale=torch.tensor(10.0), groups=groups).items()}


@pytest.mark.parametrize("name", LOSSES.names())
def test_config_fields_are_the_constructor_keywords(name):
    loss_cls = LOSSES.get(name)
    expected, params = keyword_parameters(loss_cls)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    fields = dataclasses.fields(loss_cls.Config)
    hints = typing.get_type_hints(loss_cls.Config)
    assert {f.name: (hints[f.name], f.default) for f in fields} == expected
    assert [f.name for f in fields] == list(expected)
    for field in fields:  # precise types, so that config loading can check the values
        tp = hints[field.name]
        assert tp in (bool, int, float, typing.Optional[typing.Dict[str, float]]) \
            or typing.get_origin(tp) is typing.Literal, (field.name, tp)


@pytest.mark.parametrize("name", LOSSES.names())
def test_default_config_round_trips_through_the_constructor(name):
    loss_cls = LOSSES.get(name)
    config = loss_cls.Config()
    assert description(loss_cls(**dataclasses.asdict(config))) == description(loss_cls())
    assert pickle.loads(pickle.dumps(config)) == config  # configs travel in checkpoints


@pytest.mark.parametrize("name", LOSSES.names())
def test_from_config_builds_the_same_module_as_the_keywords(name):
    loss_cls = LOSSES.get(name)
    hints = typing.get_type_hints(loss_cls.Config)
    values = {f.name: other_value(hints[f.name], f.default) for f in dataclasses.fields(loss_cls.Config)}
    if "tile_size" in values:
        values["tile_size"] = 4  # several tiles over the 6-row batch
    if "table" in values:
        values["weighting"] = "table"  # a table is read only with weighting: table
    built = loss_cls.from_config(loss_cls.Config(**values))
    direct = loss_cls(**values)
    assert description(built) == description(direct)
    assert outputs(built) == outputs(direct)


@pytest.mark.parametrize("name, values", [
    ("hcl", {"tau_plus": 1.0}),
    ("hcl", {"tau_plus": -0.1}),
    ("infonce_tiled", {"tile_size": 0}),
    ("siglip_tiled", {"tile_size": 0}),
    ("siglip_tiled", {"exchange": "all_to_all"}),
    ("vsepp", {"infonce_weight": -1.0}),
    ("infonce", {"same_group": "both"}),
])
def test_out_of_range_values_are_refused_by_the_constructor(name, values):
    loss_cls = LOSSES.get(name)
    with pytest.raises(ValueError):
        loss_cls(**values)
    with pytest.raises(ValueError):
        loss_cls.from_config(loss_cls.Config(**values))


def test_from_config_refuses_another_loss_config():
    with pytest.raises(TypeError):
        LOSSES.get("infonce").from_config(LOSSES.get("hcl").Config())
    with pytest.raises(TypeError):
        LOSSES.get("hcl").Config(margin=0.2)
