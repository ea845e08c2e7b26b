"""An open_clip checkpoint reloads as it was trained, and an open_clip tower never unpickles a file.

1. A pretrained tag brings its own image preprocessing (ViT-L-14's ``laion2b_s32b_b82k``: mean =
   std = 0.5). A checkpoint is rebuilt without the tag, so it saves that preprocessing and
   ``load_model`` normalises images as in training: same pixels, same vectors.
2. ``pretrained`` files that are not safetensors, models whose text tower is a transformers model
   (``text_cfg.hf_model_name``), and ``local-dir:`` / ``hf-hub:`` models whose weights open_clip
   would read with ``torch.load`` are refused, naming the key, before anything is built; a
   checkpoint edited to name one is refused at ``load_model`` before anything is read.

No network: the "pretrained tag" is a tag registered for a copy of the tiny test CLIP, whose
weights file is a local safetensors file (open_clip reads a tag's ``file`` instead of
downloading it); everything after that is the real build, save and load.
"""
import json
import os
import shutil

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from align.cli import main as align_main
from align.config import load_config
from align.errors import ConfigError
from align.loading import load_model
from align.model import build_model
from align.train.checkpoint import save_model
from tests.conftest import TINY_CLIP

# The tag's preprocessing: none of it is open_clip's default (OpenAI mean/std, bicubic, shortest, 0).
TAG = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear",
       "resize_mode": "longest", "fill_color": 128}


def tiny_clip_copy(folder, name):
    """TINY_CLIP under another model name, so what a test registers for it touches no other test."""
    path = os.path.join(folder, f"{name}.json")
    shutil.copyfile(TINY_CLIP, path)
    open_clip.add_model_config(path)
    return path


def clip_weights(name, path):
    """A random CLIP of model ``name`` saved as safetensors at ``path``; its state dict."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    save_file(state, path)
    return state


def pair(model, **params):
    extra = "".join(f", {key}: {value}" for key, value in params.items())
    return ["model.embed_dim=32", f"model.towers.image={{type: open_clip_image, model: {model}{extra}}}",
            f"model.towers.text={{type: open_clip_text, model: {model}{extra}}}"]


@pytest.fixture
def tagged(tmp_path, monkeypatch):
    """(model JSON, tag): a model with a pretrained tag whose preprocessing is ``TAG``."""
    model = tiny_clip_copy(str(tmp_path), "tagged-tiny-clip")
    weights = str(tmp_path / "shop_v1.safetensors")
    clip_weights("tagged-tiny-clip", weights)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tagged-tiny-clip", {"shop_v1": {"file": weights, **TAG}})
    return model, "shop_v1"


def test_a_tags_image_preprocessing_survives_a_checkpoint_reload(tagged, tmp_path):
    model_json, tag = tagged
    config = load_config(None, pair(model_json, pretrained=tag))
    trained = build_model(config.model).eval()
    save_model(trained, config, str(tmp_path / "ckpt"))
    loaded = load_model(str(tmp_path / "ckpt"))
    before, after = trained.towers["image"], loaded.towers["image"]

    # Against the tag itself: the trained tower used it, and the reloaded one (built without the
    # tag, from the checkpoint alone) uses it too.
    for tower in (before, after):
        assert {key: tower.preprocess_cfg[key] for key in TAG} == TAG
    # uint8 * scale + shift = (x / 255 - 0.5) / 0.25: the shift is exactly -2 in float32.
    assert torch.equal(after.pixel_shift.flatten(), torch.full((3,), -2.0))
    assert torch.equal(after.pixel_scale, before.pixel_scale)

    # A 40 x 24 image, resized to 32 x 19 by its longest side and padded to 32 x 32 with the fill.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    pixels = before.preprocessor(train=False)(image)
    assert torch.equal(after.preprocessor(train=False)(image), pixels)
    assert (pixels[:, 0, :] == 128).all() and (pixels[:, -1, :] == 128).all()  # padding rows
    with torch.no_grad():
        expected, got = trained.encode("image", pixels[None]), loaded.encode("image", pixels[None])
    # Same weights, same input, same operations: equal up to float32 summation order (the cosine
    # was 0.86 when the reload normalised with OpenAI's mean and std).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # A checkpoint written before the preprocessing was saved loads as it always did: with open_clip's
    # defaults for the model (its tag is not known to it).
    saved = tmp_path / "ckpt" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    assert data["model"]["towers"]["image"].pop("preprocess")["mean"] == list(TAG["mean"])
    saved.write_text(yaml.safe_dump(data, sort_keys=False))
    old = load_model(str(tmp_path / "ckpt")).towers["image"]
    assert tuple(old.preprocess_cfg["mean"]) == open_clip.OPENAI_DATASET_MEAN


@pytest.fixture
def forbid_building_and_unpickling(monkeypatch):
    """Fails the test if a CLIP is created or anything is unpickled."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"built or unpickled: {args[:1]}")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def hf_text_clip(folder):
    """A model JSON whose text tower is a transformers BERT held in a folder with only
    pytorch_model.bin (never a real pickle here: nothing may open it)."""
    from transformers import BertConfig

    bert = os.path.join(folder, "bert")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with open(os.path.join(bert, "pytorch_model.bin"), "wb") as handle:
        handle.write(b"a pickle would be here")
    with open(TINY_CLIP, encoding="utf-8") as handle:
        cfg = json.load(handle)
    cfg["text_cfg"] = {"hf_model_name": bert, "hf_tokenizer_name": bert, "hf_pooler_type": "mean_pooler"}
    return cfg


def local_dir(folder, model_cfg, *weights):
    """An open_clip ``local-dir:`` folder: open_clip_config.json + the named weights files."""
    os.makedirs(folder)
    with open(os.path.join(folder, "open_clip_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, handle)
    for name in weights:
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(b"not read")
    return f"local-dir:{folder}"


def refused_cases(tmp):
    """(override, message) a run is refused with; files under ``tmp``."""
    for name in ("clip.pt", "clip.bin"):
        (tmp / name).write_bytes(b"a pickle would be here")
    hf_json = tmp / "hf-tiny-clip.json"
    hf_cfg = hf_text_clip(str(tmp))
    hf_json.write_text(json.dumps(hf_cfg))
    with open(TINY_CLIP, encoding="utf-8") as handle:
        tiny = json.load(handle)
    # open_clip prefers open_clip_pytorch_model.bin over model.safetensors in a folder
    pickled_dir = local_dir(str(tmp / "pickled"), tiny, "model.safetensors", "open_clip_pytorch_model.bin")
    hf_dir = local_dir(str(tmp / "hf"), hf_cfg, "open_clip_model.safetensors")
    return {
        "pretrained .pt": (f"model.towers.image.pretrained={tmp / 'clip.pt'}",
                           f"model.towers.image.pretrained: {tmp / 'clip.pt'} is not a .safetensors file"),
        "pretrained .bin": (f"model.towers.text.pretrained={tmp / 'clip.bin'}",
                            f"model.towers.text.pretrained: {tmp / 'clip.bin'} is not a .safetensors file"),
        "hf text in a JSON": (f"model.towers.text.model={hf_json}", "model.towers.text.model: "),
        "hf text built in": ("model.towers.text.model=roberta-ViT-B-32", "model.towers.text.model: roberta-ViT-B-32's"),
        "hf text in local-dir": (f"model.towers.text.model={hf_dir}", "model.towers.text.model: "),
        "local-dir .bin": (f"model.towers.image.model={pickled_dir}",
                           f"model.towers.image.model: {pickled_dir}: open_clip would load "
                           f"{tmp / 'pickled' / 'open_clip_pytorch_model.bin'}, not a .safetensors file"),
        "hf-hub not cached": ("model.towers.image.model=hf-hub:nobody/no-clip",
                              "model.towers.image.model: hf-hub:nobody/no-clip: open_clip_model.safetensors"),
    }


CASES = ["pretrained .pt", "pretrained .bin", "hf text in a JSON", "hf text built in", "hf text in local-dir",
         "local-dir .bin", "hf-hub not cached"]
HINTS = {"pretrained": "safetensors.torch.save_file", "hf text": "type hf_text", "local-dir": "Convert it once",
         "hf-hub": "huggingface-cli download"}


@pytest.mark.parametrize("case", CASES)
def test_sources_open_clip_would_unpickle_are_refused_before_anything_is_built(
        case, tmp_path, capsys, forbid_building_and_unpickling):
    override, message = refused_cases(tmp_path)[case]
    manifest = tmp_path / "train.csv"
    manifest.write_text("id,title\nsku-1,red mug\n")
    out = tmp_path / "run"
    code = align_main(["train", *pair(TINY_CLIP), override, f"data.train={manifest}", f"train.output_dir={out}",
                       "train.wandb=disabled"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error
    assert HINTS[next(hint for hint in HINTS if case.startswith(hint))] in error  # says what to do instead
    if case.startswith("hf text"):
        assert "text_cfg.hf_model_name" in error
    assert not out.exists()


def test_a_checkpoint_edited_to_name_a_transformers_text_tower_is_refused_at_load(
        tmp_path, monkeypatch):
    config = load_config(None, pair(TINY_CLIP))
    save_model(build_model(config.model), config, str(tmp_path / "ckpt"))
    saved_json = tmp_path / "ckpt" / "open_clip" / os.path.basename(TINY_CLIP)
    saved_json.write_text(json.dumps(hf_text_clip(str(tmp_path))))

    def refuse(*args, **kwargs):
        raise AssertionError(f"unpickled {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ConfigError, match="model.towers.image.model: .*text_cfg.hf_model_name.*type hf_text"):
        load_model(str(tmp_path / "ckpt"))


def test_a_local_dir_is_judged_by_the_weights_open_clip_would_load(tmp_path):
    from align.registry import TOWERS

    with open(TINY_CLIP, encoding="utf-8") as handle:
        tiny = json.load(handle)
    folder = tmp_path / "clip"
    model = local_dir(str(folder), tiny)
    open_clip.add_model_config(TINY_CLIP)
    state = clip_weights("tiny-clip", str(folder / "model.safetensors"))
    config = load_config(None, pair(model)).model.towers["image"].params
    TOWERS.get("open_clip_image").check_sources(config, "model.towers.image")  # safetensors: accepted
    built = build_model(load_config(None, pair(model)).model)
    for key, value in built.towers["image"].trunk.state_dict().items():
        assert torch.equal(value, state[f"visual.{key}"]), key
    # open_clip prefers this name to model.safetensors
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"a pickle would be here")
    with pytest.raises(ConfigError, match=r"model.towers.image.model: .*open_clip_pytorch_model.bin, not a \.saf"):
        TOWERS.get("open_clip_image").check_sources(config, "model.towers.image")
