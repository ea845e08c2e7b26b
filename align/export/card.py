"""The model card, ``<out>/README.md``: what was exported (towers, dimensions), what it was trained
on (the run's config, ``trainer_state.json`` and ``summary.json``), how well it retrieves (the
run's ``eval.json``, or the newest ``eval-step-N.json`` at or before the checkpoint's step), how to
load each export with its own library, and every file with its sha256.

The run is found from the checkpoint's place: ``<run>/checkpoints/step-N/model/``. A bare model
folder elsewhere gets a card without the training and evaluation sections' figures.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from align.config import Config
from align.errors import atomic_open
from align.loading import read_json

CARD_FILE = "README.md"
EVAL_STEP = re.compile(r"^eval-step-(\d+)\.json$")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_records(model_dir: str) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[str]]:
    """(trainer_state.json, summary.json, eval JSON path) found around ``model_dir``; {} / None
    for what is not there."""
    step_dir = os.path.dirname(model_dir) if os.path.basename(model_dir) == "model" else model_dir
    state_path = os.path.join(step_dir, "trainer_state.json")
    state = read_json(state_path) if os.path.isfile(state_path) else {}
    run_dir = os.path.dirname(os.path.dirname(step_dir))
    if os.path.basename(os.path.dirname(step_dir)) != "checkpoints":
        run_dir = ""
    summary_path = os.path.join(run_dir, "summary.json") if run_dir else ""
    summary = read_json(summary_path) if summary_path and os.path.isfile(summary_path) else {}
    return state, summary, _eval_file(model_dir, step_dir, run_dir, state.get("step"))


def _eval_file(model_dir: str, step_dir: str, run_dir: str, step: Optional[int]) -> Optional[str]:
    """eval.json beside the model or its step folder; else the run's eval.json when the run ended at
    this step; else the run's newest eval-step-N.json with N <= step."""
    for folder in (model_dir, step_dir):
        if os.path.isfile(os.path.join(folder, "eval.json")):
            return os.path.join(folder, "eval.json")
    if not run_dir or not os.path.isdir(run_dir):
        return None
    final = os.path.join(run_dir, "eval.json")
    if os.path.isfile(final) and (step is None or _summary_step(run_dir) in (None, step)):
        return final
    found = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := EVAL_STEP.match(name)))
    usable = [name for number, name in found if step is None or number <= step]
    return os.path.join(run_dir, usable[-1]) if usable else None


def _summary_step(run_dir: str) -> Optional[int]:
    path = os.path.join(run_dir, "summary.json")
    return int(read_json(path).get("steps", 0)) if os.path.isfile(path) else None


def _tower_line(modality: str, tower: Any, dims: Mapping[str, str]) -> str:
    params = tower.params
    keys = [k for k in ("model", "path", "pooling", "max_length", "width", "layers", "heads", "n_mels",
                        "sample_rate", "clip_seconds", "projection") if hasattr(params, k)]
    detail = ", ".join(f"{k}={getattr(params, k)}" for k in keys)
    return f"| {modality} | {tower.type} | {dims.get(modality, '')} | {detail} |"


def _eval_table(results: Mapping[str, Any]) -> List[str]:
    rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and "R@1" in v]
    if not rows:
        return ["(no retrieval figures in the evaluation file)"]
    lines = ["| query -> target | R@1 | R@5 | R@10 | mAP | median rank | queries |", "|---|---|---|---|---|---|---|"]
    for name, v in rows:
        lines.append(f"| {name} | {v.get('R@1', float('nan')):.3f} | {v.get('R@5', float('nan')):.3f} | "
                     f"{v.get('R@10', float('nan')):.3f} | {v.get('mAP', float('nan')):.3f} | "
                     f"{v.get('median_rank', '')} | {v.get('n_queries', '')} |")
    return lines


LOADING = {
    "open_clip": """```python
import open_clip, torch
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:open_clip")
tokenizer = open_clip.get_tokenizer("local-dir:open_clip")
with torch.no_grad():
    text = model.encode_text(tokenizer(["a red star"]), normalize=True)            # (1, D)
    image = model.encode_image(preprocess(pil_image)[None], normalize=True)        # (1, D)
```""",
    "sentence_transformers": """```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("sentence_transformers", device="cpu")
text = model.encode(["a red star"])                                                # (1, D), unit rows
```""",
    "onnx": """```python
import json, onnxruntime
spec = json.load(open("onnx/preprocess.json"))  # image size/mean/std, tokenizer, sample rate, clip length
session = onnxruntime.InferenceSession("onnx/audio.onnx")
embedding = session.run(["embedding"], {"waveform": waves})[0]                    # (B, D) float32, unit rows
# text.onnx takes input_ids (+ attention_mask), image.onnx pixel_values: see preprocess.json
# with --quantize int8, audio.int8.onnx (preprocess.json: towers.audio.int8_file) takes the same inputs
```""",
}


def _compression_lines(compression: Mapping[str, Any], matryoshka_dims: List[int]) -> List[str]:
    """The card's "Compression" section: the Matryoshka cut and the int8 graphs, each said how."""
    lines: List[str] = []
    dim, full = compression.get("dim"), compression.get("full_dim")
    if dim:
        trained = (f"The model was trained with a Matryoshka loss at dims {matryoshka_dims}, "
                   f"{'including' if dim in matryoshka_dims else 'not including'} {dim}."
                   if matryoshka_dims else "The model was NOT trained with a Matryoshka loss (`loss.matryoshka`), so "
                                           "its prefixes were not optimised to stand alone: expect lower retrieval "
                                           "quality than at full width.")
        lines += [f"- **Matryoshka truncation** (`--dim {dim}`): every tower outputs the first {dim} of the model's "
                  f"{full} embedding coordinates, renormalised to unit length (the last linear map of each "
                  f"projection keeps its first {dim} rows, in every format). Compare these vectors only with vectors "
                  f"cut the same way (`align embed --dim {dim}`, `align index --dim {dim}`). {trained}"]
    cosines = compression.get("int8") or {}
    if cosines:
        from align.export.quantize import ALLOWED_PER_MATMUL, METHOD

        worst = ", ".join(f"{m} {c:.4f} (required {bound:.4f})" for m, (c, bound) in cosines.items())
        lines += ["- **int8 ONNX graphs** (`--quantize int8`): `onnx/<modality>.int8.onnx` beside each float32 graph, "
                  "same inputs and output. Made by onnxruntime's dynamic quantisation "
                  f"(`{METHOD['tool']}`): weights {METHOD['weights']}; activations {METHOD['activations']}; "
                  f"quantised ops {', '.join(METHOD['ops'])}; kept in float32: {METHOD['kept_float32']}. "
                  f"Checked on export: smallest cosine between an int8 embedding and ours over the probes: {worst}; "
                  f"the requirement is 1 - {ALLOWED_PER_MATMUL:g} x the graph's integer matmuls unless "
                  "`--int8-min-cosine` set it."]
    return lines or ["None: full width, float32 weights."]


def write_card(out: str, config: Config, model_dir: str, dims: Mapping[str, str], written: Mapping[str, List[str]],
               skipped: Mapping[str, str], checks: Mapping[str, float],
               compression: Optional[Mapping[str, Any]] = None) -> None:
    """``out/README.md`` for the export folder ``out`` (its files already in place). ``compression``:
    {"dim": the Matryoshka cut or None, "full_dim": the model's width,
    "int8": {modality: (smallest cosine, cosine required)}}."""
    state, summary, eval_path = run_records(model_dir)
    data = config.data
    compression = compression or {}
    width = compression.get("dim") or config.model.embed_dim
    cut = f" (the first {width} of {compression.get('full_dim')}, renormalised)" if compression.get("dim") else ""
    lines = ["# Exported align model", "",
             f"Exported by `align export` from `{model_dir}`. Embeddings are L2-normalised rows of dimension "
             f"{width}{cut} in one space shared by the towers below (cosine = dot product).", "",
             "## Model", "", "| modality | tower | output | settings |", "|---|---|---|---|"]
    lines += [_tower_line(m, t, dims) for m, t in config.model.towers.items()]
    lines += ["", "## Compression", ""] + _compression_lines(compression, list(config.loss.matryoshka.dims or []))
    lines += ["", "## Training data", "",
              f"- train: `{data.train}`" + (f"; validation: `{data.val}`" if data.val else ""),
              f"- text columns: {list(data.columns.text) if data.columns.text else '(none)'}",
              f"- steps: {state.get('step', summary.get('steps', 'unknown'))}, samples seen: "
              f"{state.get('samples', summary.get('samples', 'unknown'))}, batch size {data.batch_size} "
              f"(the number of in-batch negatives)",
              f"- loss: {config.loss.name}, learning rate {config.optim.lr}", "", "## Evaluation", ""]
    if eval_path:
        lines += [f"Zero-shot retrieval from `{eval_path}`:", ""] + _eval_table(read_json(eval_path))
    else:
        lines.append("No evaluation file was found beside the checkpoint (run `align eval --checkpoint ...`).")
    lines += ["", "## Exports", ""]
    for name, files in written.items():
        figure = checks.get(name)
        checked = f" Checked on export: max |difference| from our model {figure:.2e}." if figure is not None else ""
        lines += [f"### {name}", "", f"Loads with its own library, without `align`.{checked}", "", LOADING[name], ""]
    for name, reason in skipped.items():
        lines += [f"- {name}: not exported ({reason})"]
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    for root, _, names in sorted(os.walk(out)):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, out)
            if relative == CARD_FILE:
                continue
            lines.append(f"| {relative} | {os.path.getsize(path)} | {sha256(path)} |")
    with atomic_open(os.path.join(out, CARD_FILE)) as handle:
        handle.write("\n".join(lines) + "\n")
