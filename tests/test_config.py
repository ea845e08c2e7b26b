"""Config loading is strict: every mistake is refused with the dotted key, before anything is built."""
import re

import pytest

from align.config import ConfigError, load_config, save_config
from tests.conftest import TINY_CLIP

TOWERS = ["model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides_set_typed_values(tmp_path):
    path = write(tmp_path, "a.yaml", "optim:\n  lr: 1.0e-3\ntrain:\n  epochs: 3\n")
    config = load_config(path, TOWERS + ["optim.lr=3e-4", "train.mixed_precision=bf16", "data.columns.text=[title]"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.epochs == 3
    assert config.train.mixed_precision == "bf16"
    assert config.data.columns.text == ["title"]
    assert config.model.towers["image"].params.model == TINY_CLIP


@pytest.mark.parametrize("override, key", [
    (["optim.lrr=1"], "optim.lrr"),
    (["train.epochs=two"], "train.epochs"),
    (["train.epochs=1.5"], "train.epochs"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["train.progress=1"], "train.progress"),
    (["model.towers.image.widht=3"], "model.towers.image.widht"),
    (["model.towers.image.type=no_such_tower"], "model.towers.image.type"),
    (["model.towers.smell.type=open_clip_image"], "model.towers.smell"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["loss.name=no_such_loss"], "loss.name"),
    (["model.towers.image.unfreeze_last=2"], "model.towers.image.unfreeze_last"),
])
def test_mistakes_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, TOWERS + override)


@pytest.mark.parametrize("override, key", [
    (["train.log_every=0"], "train.log_every"),  # was a ZeroDivisionError after the first step
    (["train.max_steps=-1"], "train.max_steps"),  # was a run of no steps that still saved a checkpoint
    (["train.epochs=-1"], "train.epochs"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.save_every=-2"], "train.save_every"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints"),
    (["optim.lr=.nan"], "optim.lr"),
    (["optim.lr=.inf"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.weight_decay=.nan"], "optim.weight_decay"),  # trained and saved NaN weights
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.eps=.nan"], "optim.eps"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas[1]"),
    (["optim.betas=[-0.1, 0.98]"], "optim.betas[0]"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas[1]"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps"),
    (["optim.min_lr_ratio=5"], "optim.min_lr_ratio"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.grad_clip=.nan"], "optim.grad_clip"),
    (["model.towers.image.lr_scale=.nan"], "model.towers.image.lr_scale"),  # trained and saved NaN weights
    (["model.towers.image.lr_scale=-1"], "model.towers.image.lr_scale"),
    (["model.max_logit_scale=.nan"], "model.max_logit_scale"),
    (["model.max_logit_scale=0.5"], "model.max_logit_scale"),
    (["data.shuffle_buffer=-1"], "data.shuffle_buffer"),
    (["data.weights=[1, .nan]"], "data.weights[1]"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["loss.matryoshka.dims=[8, 16]", "loss.matryoshka.weights=[.nan, 1]"], "loss.matryoshka.weights[0]"),
    (["model.towers.text.type=open_clip_text", f"model.towers.text.model={TINY_CLIP}",
      "loss.pairs.text-image.weight=.nan"], "loss.pairs.text-image.weight"),
])
def test_numbers_out_of_range_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + " = .* must be a (finite|whole) number"):
        load_config(None, TOWERS + override)


def test_the_edges_of_each_range_still_load():
    """0 keeps its documented meanings (max_steps: from epochs, eval/save_every: each epoch's end,
    keep_checkpoints: keep all, grad_clip: off), and each inclusive bound is accepted."""
    config = load_config(None, TOWERS + [
        "train.max_steps=0", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
        "train.keep_checkpoints=0", "optim.weight_decay=0", "optim.betas=[0, 0.999]", "optim.warmup_steps=0",
        "optim.min_lr_ratio=1", "optim.grad_clip=0", "model.towers.image.lr_scale=0", "model.max_logit_scale=1",
        "data.shuffle_buffer=0", "data.weights=[0, 1]", "eval.batch_size=1"])
    assert (config.train.max_steps, config.train.keep_checkpoints, config.optim.grad_clip) == (0, 0, 0.0)
    assert config.optim.betas == (0.0, 0.999) and config.model.towers["image"].lr_scale == 0.0
    load_config(None, TOWERS + ["train.epochs=0", "train.max_steps=5"])  # steps alone set the length


def test_yaml_booleans_spelled_as_choices_are_read_as_the_choice(tmp_path):
    path = write(tmp_path, "p.yaml", "train:\n  mixed_precision: no\n")
    assert load_config(path, TOWERS).train.mixed_precision == "no"
    assert load_config(None, TOWERS + ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = write(tmp_path, "bad.yaml", "trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(path, TOWERS)


def test_base_chain_and_round_trip(tmp_path):
    write(tmp_path, "base.yaml", f"model:\n  embed_dim: 64\n  towers:\n    image: {{type: open_clip_image, model: {TINY_CLIP}}}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  embed_dim: 32\n")
    config = load_config(child)
    assert config.model.embed_dim == 32 and "image" in config.model.towers
    saved = str(tmp_path / "saved.yaml")
    save_config(config, saved)
    assert load_config(saved) == config


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, TOWERS + ["optim.lr"])


def test_a_tower_whose_type_changes_starts_from_that_types_defaults(tmp_path):
    base = write(tmp_path, "base.yaml", f"model:\n  towers:\n    text: {{type: open_clip_text, model: {TINY_CLIP}}}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  towers:\n    text: {type: hf_text, max_length: 16}\n")
    config = load_config(child)
    text = config.model.towers["text"]
    assert text.type == "hf_text" and text.params.max_length == 16
    # the same on the command line
    config = load_config(base, ["model.towers.text.type=hf_text"])
    assert config.model.towers["text"].type == "hf_text"
    # a change that keeps the type still merges
    config = load_config(base, ["model.towers.text.context_length=8"])
    assert config.model.towers["text"].params.model == TINY_CLIP


def test_a_column_is_switched_off_with_null_and_an_empty_name_is_refused():
    config = load_config(None, TOWERS + ["data.columns.group=null", "data.columns.audio=null"])
    assert config.data.columns.group is None and config.data.columns.audio is None
    with pytest.raises(ConfigError, match=r"data\.columns\.group.*null"):
        load_config(None, TOWERS + ["data.columns.group="])


@pytest.mark.parametrize("override, key", [
    (["loss.params.betta=1"], "loss.params.betta"),
    (["loss.params.same_group=positve"], "loss.params.same_group"),
    (["loss.name=hcl", "loss.params.tau_plus=1.5"], "loss.params"),
    (["loss.pairs.text-image.name=siglip", "loss.pairs.text-image.params.margin=0.2"], "loss.pairs.text-image.params.margin"),
])
def test_loss_parameters_are_typed_and_checked_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, THREE + override)


THREE = TOWERS + ["model.towers.text.type=open_clip_text", f"model.towers.text.model={TINY_CLIP}",
                  "model.towers.audio.type=audio_transformer"]


def test_a_pair_with_another_loss_starts_from_that_losss_defaults():
    config = load_config(None, THREE + ["loss.name=hcl", "loss.params.beta=0.5", "loss.params.same_group=positive",
                                         "loss.pairs.text-image.name=infonce", "loss.pairs.text-audio.weight=2"])
    assert config.loss.params.beta == 0.5
    pair = config.loss.pairs["text-image"]
    assert pair.name == "infonce" and pair.params.same_group == "ignore"  # InfoNCE's defaults, not hcl's params
    same = config.loss.pairs["text-audio"]
    assert same.name == "hcl" and same.params.beta == 0.5 and same.params.same_group == "positive"  # inherits


def test_saved_config_reloads_to_the_same_loss(tmp_path):
    config = load_config(None, THREE + ["loss.name=siglip", "loss.params.bias_init=-5",
                                         "loss.pairs.text-image.name=infonce"])
    save_config(config, str(tmp_path / "c.yaml"))
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.loss == config.loss


@pytest.mark.parametrize("override, key", [
    (["model.towers.image.projection=linaer"], "model.towers.image.projection"),
    (["model.towers.text.type=hf_text", "model.towers.text.pooling=max"], "model.towers.text.pooling"),
    (["model.towers.audio.type=audio_transformer", "model.towers.audio.projection=MLP"], "model.towers.audio.projection"),
    (["model.logit_scale_clamp=both"], "model.logit_scale_clamp"),
])
def test_free_string_choices_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, TOWERS + override)


def test_every_shipped_config_loads_and_the_demo_ones_name_the_demo_catalogues_columns(small_demo):
    """configs/ is what users copy: each file loads and validates, and the configs that run on the
    demo catalogue (the demo and its search-log fine-tune) name only columns it has, with towers
    the fine-tune's init_from checkpoint fits."""
    import csv
    import glob
    import os

    from align.rec.config import load_rec_config
    from tests.conftest import REPO

    shipped = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    assert len(shipped) >= 3
    configs = {os.path.basename(path): load_config(path) for path in shipped}
    for path in glob.glob(os.path.join(REPO, "configs", "rec", "*.yaml")):
        load_rec_config(path)
    with open(os.path.join(small_demo, "train.csv"), newline="", encoding="utf-8") as handle:
        header = set(next(csv.reader(handle)))
    demo, search = configs["demo.yaml"], configs["finetune_search_log.yaml"]
    for config in (demo, search):
        columns = config.data.columns
        assert {*columns.text, columns.id} <= header
        assert all(getattr(columns, m) in header for m in config.model.towers if m != "text")
    for name, field in search.model.fields.items():
        assert field.modality in search.model.towers and set(field.columns) <= header, name
    # every tower has a product field: a query tower whose modality the products lack drifts in
    # fine-tuning (voice search fell from 0.59 to 0.48 nDCG@10 before the sound field)
    assert {field.modality for field in search.model.fields.values()} == set(search.model.towers)
    assert search.model.towers == demo.model.towers and search.model.embed_dim == demo.model.embed_dim
