"""Compressed encoders and vectors: `align export --quantize int8` writes int8 ONNX graphs beside the
float32 ones that run in onnxruntime and stay within a justified cosine of our float32 model on real
catalogue items (with the audio front end left in float32, which quantising would break);
`--dim D` in `align export`, `align embed` and `align index` gives the first D coordinates of the
full vectors renormalised (checked against a float64 reference), recorded so queries are cut alike;
a bad --dim or --quantize is refused naming the flag, before anything is written."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from align.cli import main as align_main
from align.encoding import Processes
from align.errors import ConfigError
from align.eval.runner import embed_for_eval
from align.export.command import export, main as export_main
from align.export.onnx import OnnxEncoder
from align.index.build import load_index, main as index_main
from align.index.embed import main as embed_main
from align.index.vectors import load_item_embeddings
from align.loading import load_model, model_folder, read_saved_config
from tests.conftest import EPS32, one_step_checkpoint
from tests.test_export import ONNX_BOUND, our_tokens

FULL, CUT = 32, 8  # model.embed_dim of the tiny model, and the Matryoshka prefix tested
# A dynamically quantised matmul adds relative noise of ~0.02 (uint8 activations over ~10 x their
# rms, 7-bit per-channel weights over ~3 x theirs: sqrt((0.04^2 + 0.05^2) / 12)), a variance of
# ~4e-4; the tiny towers run at most 10 integer matmuls (2 blocks x QKV, out, 2 MLP, + heads), so
# 1 - cosine ~ 10 x 2e-4 = 0.002 on average. 0.99 allows five times that (align/export/quantize.py's
# rule); a broken quantisation falls far below (see test_quantising_the_audio_front_end_would_break_it).
INT8_COSINE = 0.99
# |prefix32 - prefix64| per entry: the float32 vector's own rounding (a few EPS32 per entry, it is a
# unit vector) carried through one norm of CUT terms and a division.
PREFIX_BOUND = 8 * (CUT + 4) * EPS32


@pytest.fixture(scope="module")
def checkpoint(small_demo, tmp_path_factory):
    return one_step_checkpoint(small_demo, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def int8_export(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("int8") / "export")
    return out, export(checkpoint, out, ["onnx"], quantize="int8")


@pytest.fixture(scope="module")
def cut_export(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cut") / "export")
    return out, export(checkpoint, out, ["open_clip", "onnx"], quantize="int8", dim=CUT)


def split_embeddings(encoder, checkpoint, manifest):
    """{modality: (N, D)} and masks of ``manifest``'s items through ``encoder`` (our loader, our
    preprocessors: the torch model and an ONNX export see the same tensors)."""
    config = read_saved_config(model_folder(checkpoint), ["eval.batch_size=16"])
    embedded, _ = embed_for_eval(encoder, config, manifest, Processes(0, 1, torch.device("cpu")))
    return embedded["embeddings"], embedded["masks"]


def prefix64(vectors, dim):
    """The first ``dim`` coordinates renormalised, in float64 (zero rows stay zero)."""
    cut = vectors.double()[:, :dim]
    return cut / cut.norm(dim=1, keepdim=True).clamp_min(1e-300)


def cosines(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ------------------------------------------------------------------ int8


def test_int8_graphs_run_in_onnxruntime_close_to_float32_on_catalogue_items(checkpoint, int8_export, small_demo):
    out, result = int8_export
    folder = os.path.join(out, "onnx")
    spec = json.load(open(os.path.join(folder, "preprocess.json")))
    assert spec["int8"]["tool"] == "onnxruntime.quantization.quantize_dynamic"
    model = load_model(checkpoint)
    manifest = os.path.join(small_demo, "test.csv")
    want, masks = split_embeddings(model, checkpoint, manifest)
    floats, _ = split_embeddings(OnnxEncoder(folder, "float32", model.preprocessors(False)), checkpoint, manifest)
    ints, int_masks = split_embeddings(OnnxEncoder(folder, "int8", model.preprocessors(False)), checkpoint, manifest)
    for modality in ("text", "image", "audio"):
        rows = masks[modality]
        assert rows.sum() >= 20 and torch.equal(rows, int_masks[modality])
        assert (floats[modality][rows] - want[modality][rows]).abs().max() <= ONNX_BOUND, modality
        got = ints[modality][rows]
        assert got.dtype == torch.float32 and got.shape == (int(rows.sum()), FULL)
        assert (got.norm(dim=1) - 1).abs().max() <= 1e-5  # the last normalisation stays float32
        assert cosines(got, want[modality][rows]).min() >= INT8_COSINE, modality
        assert result["int8_min_cosine"][modality] >= INT8_COSINE  # the export's own check, on probes
        graph = onnx.load(os.path.join(folder, spec["towers"][modality]["int8_file"])).graph
        assert 1 <= sum(node.op_type == "MatMulInteger" for node in graph.node) <= 10
    sizes = {precision: OnnxEncoder(folder, precision).graph_bytes() for precision in ("float32", "int8")}
    assert sizes["float32"] >= 1.5 * sizes["int8"]  # the token table and the linear layers in int8
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "int8 ONNX graphs" in card and "quantize_dynamic" in card and "text.int8.onnx |" in card


def upstream(graph, op_type):
    """Op types of every node from which an ``op_type`` node can be reached."""
    producer = {name: node for node in graph.node for name in node.output}
    stack, seen = [n for n in graph.node if n.op_type == op_type], []
    while stack:
        node = stack.pop()
        if node.name not in [n.name for n in seen]:
            seen.append(node)
            stack += [producer[i] for i in node.input if i in producer]
    return {n.op_type for n in seen}


def test_quantising_the_audio_front_end_would_break_it(checkpoint, int8_export, small_demo, tmp_path):
    """The mel filter MatMul before the log stays float32 in our int8 graph; quantised, the power
    spectrum's ~10 decades on a uint8 grid round to the log floor and the embeddings fall apart."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = os.path.join(int8_export[0], "onnx")
    ours = onnx.load(os.path.join(folder, "audio.int8.onnx")).graph
    assert {"MatMul", "Conv"} <= upstream(ours, "Log")
    assert not {"MatMulInteger", "DynamicQuantizeLinear"} & upstream(ours, "Log")
    naive = str(tmp_path / "audio.naive.onnx")
    quantize_dynamic(os.path.join(folder, "audio.onnx"), naive, op_types_to_quantize=["MatMul", "Gather"],
                     per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    model = load_model(checkpoint)
    waves = split_inputs_audio(model, small_demo)
    with torch.no_grad():
        want = model.encode("audio", waves)
    import onnxruntime

    ort = {name: onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
           for name, path in (("ours", os.path.join(folder, "audio.int8.onnx")), ("naive", naive))}
    got = {name: torch.from_numpy(s.run(["embedding"], {"waveform": waves.numpy()})[0]) for name, s in ort.items()}
    assert cosines(got["ours"], want).min() >= INT8_COSINE
    assert cosines(got["naive"], want).min() < INT8_COSINE


def split_inputs_audio(model, small_demo):
    import csv

    with open(os.path.join(small_demo, "test.csv"), newline="", encoding="utf-8") as handle:
        files = [os.path.join(small_demo, r["audio"]) for r in csv.DictReader(handle) if r["audio"]][:16]
    prepare = model.preprocessors(train=False)["audio"]
    return torch.stack([prepare(path) for path in files])  # (16, T)


# ------------------------------------------------------------------ Matryoshka --dim


def test_export_dim_outputs_the_renormalised_prefix_in_every_format(checkpoint, cut_export):
    import open_clip

    out, result = cut_export
    assert result["dim"] == CUT and result["full_dim"] == FULL
    model = load_model(checkpoint)
    images, tokens = torch.randn(5, 3, 32, 32), our_tokens(model, ["a red star", "blue cube", "x", "green", "ring"])
    with torch.no_grad():
        want = {"image": prefix64(model.encode("image", images), CUT),
                "text": prefix64(model.encode("text", tokens), CUT)}
    folder = os.path.join(out, "onnx")
    spec = json.load(open(os.path.join(folder, "preprocess.json")))
    assert spec["embed_dim"] == CUT and spec["matryoshka"]["full_dim"] == FULL
    encoder = OnnxEncoder(folder)
    int8 = OnnxEncoder(folder, "int8")
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{os.path.join(out, 'open_clip')}")
    with torch.no_grad():
        theirs = {"image": clip.eval().encode_image(images, normalize=True),
                  "text": clip.encode_text(tokens, normalize=True)}
    for modality, inputs in (("image", images), ("text", tokens)):
        assert encoder.encode(modality, inputs).shape == (5, CUT)
        assert (encoder.encode(modality, inputs).double() - want[modality]).abs().max() <= ONNX_BOUND
        assert (theirs[modality].double() - want[modality]).abs().max() <= ONNX_BOUND
        assert cosines(int8.encode(modality, inputs), want[modality]).min() >= INT8_COSINE
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"first {CUT} of the model's {FULL} embedding coordinates, renormalised" in card
    assert "NOT trained with a Matryoshka loss" in card


@pytest.mark.parametrize("argv, message", [
    (["--dim", "0"], "--dim 0: must be a whole number from 1 to the embedding width 32"),
    (["--dim", "33"], "--dim 33: must be a whole number from 1 to the embedding width 32"),
    (["--quantize", "int8", "--formats", "open_clip"], "--quantize int8 quantises the ONNX graphs"),
    (["--quantize", "int4"], "invalid choice: 'int4'"),
    (["--quantize", "int8", "--int8-min-cosine", "1.5"], "--int8-min-cosine 1.5"),
])
def test_bad_dim_or_quantize_is_refused_naming_the_flag_before_anything_is_written(checkpoint, tmp_path, capsys,
                                                                                   argv, message):
    out = str(tmp_path / "out")
    argv = ["--checkpoint", checkpoint, "--out", out, *argv]
    if "invalid choice" in message:  # argparse's own refusal
        with pytest.raises(SystemExit):
            export_main(argv)
    else:
        with pytest.raises(ConfigError, match=message):
            export_main(argv)
        assert align_main(["export", *argv]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_embed_and_index_dim_keep_the_renormalised_prefix_and_record_it(checkpoint, small_demo, tmp_path, capsys):
    manifests = [os.path.join(small_demo, "test.csv")]  # 40 items, some without audio

    def embed(out, *extra):
        return embed_main(["--checkpoint", checkpoint, "--manifest", *manifests, "--out", str(out), "--device", "cpu",
                           "--batch-size", "16", *extra])

    embed(tmp_path / "full")
    embed(tmp_path / "cut", "--dim", str(CUT))
    full, cut = load_item_embeddings(str(tmp_path / "full")), load_item_embeddings(str(tmp_path / "cut"))
    assert cut.ids == full.ids and cut.metadata["dim"] == str(CUT) and cut.metadata["full_dim"] == str(FULL)
    assert json.load(open(tmp_path / "cut" / "ids.json"))["dim"] == CUT
    for name in full.vectors:  # every modality and the fused vector: the prefix of the full vector, renormalised
        assert torch.equal(cut.masks[name], full.masks[name])
        rows = full.masks[name]
        assert cut.vectors[name].shape == (len(full.ids), CUT)
        assert (cut.vectors[name][rows].double() - prefix64(full.vectors[name][rows], CUT)).abs().max() <= PREFIX_BOUND
        assert not cut.vectors[name][~rows].any()  # items without the modality keep zero rows
    assert not full.masks["audio"].all()  # the catalogue has items without audio: the zero rows were tested

    # align index --dim over full-width vectors makes the same vectors, and records the cut for queries
    for source, extra, name in (("full", ["--dim", str(CUT)], "index_cut"), ("cut", [], "index_of_cut")):
        index_main(["--embeddings", str(tmp_path / source), "--out", str(tmp_path / name), "--kind", "exact", *extra])
        index = load_index(str(tmp_path / name))
        assert index.dim == CUT and index.info["full_dim"] == FULL
    index = load_index(str(tmp_path / "index_cut"))
    queries = cut.vectors["text"][cut.masks["text"]][:5]  # (5, CUT)
    scores, ids = index.search(queries.numpy(), k=3)
    items = cut.vectors["fused"][cut.masks["fused"]].double()
    brute = queries.double() @ items.T  # (5, n) float64
    fused_ids = [i for i, has in zip(cut.ids, cut.masks["fused"].tolist()) if has]
    assert [row[0] for row in ids] == [fused_ids[int(j)] for j in brute.argmax(1)]
    assert np.abs(scores[:, 0] - brute.max(1).values.numpy()).max() <= 1e-5

    # a bad --dim is refused naming the flag, before anything is written
    capsys.readouterr()
    with pytest.raises(ConfigError, match="--dim 64: must be a whole number from 1 to the embedding width 32"):
        embed(tmp_path / "wide", "--dim", "64")
    with pytest.raises(ConfigError, match=f"--dim 16: must be a whole number from 1 to the embedding width {CUT}"):
        index_main(["--embeddings", str(tmp_path / "cut"), "--out", str(tmp_path / "wide_index"), "--dim", "16"])
    assert align_main(["index", "--embeddings", str(tmp_path / "full"), "--out", str(tmp_path / "zero"),
                       "--dim", "0"]) == 2
    assert "--dim 0" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / n) for n in ("wide", "wide_index", "zero"))
    with pytest.raises(ConfigError, match=f"its vectors have dim {CUT}; embed with --dim {CUT}"):
        embed(tmp_path / "cut", "--append")


def test_levers_benchmark_skips_cleanly_without_the_demo(tmp_path, capsys):
    from benchmarks.compress_levers import main as levers_main

    assert levers_main(["--checkpoint", str(tmp_path / "no_run"), "--out", str(tmp_path / "out")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "no checkpoint at" in json.loads(last)["skipped"] and not os.path.exists(tmp_path / "out")
