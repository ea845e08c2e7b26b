"""The model card, ``<out>/README.md``: what was exported (towers, dimensions), what it was trained
on (the run's config, ``trainer_state.json`` and ``summary.json``), how well it retrieves (the
run's ``eval.json``, or the newest ``eval-step-N.json`` at or before the checkpoint's step), how to
load each export with its own library, and every file with its sha256.

The run is found from the checkpoint's place: ``<run>/checkpoints/step-N/model/``, or ``<run>/best/``
whose ``best.json`` names its step. A bare model folder elsewhere gets a card without the training
and evaluation sections' figures.
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
STEP_DIR = re.compile(r"^step-(\d+)$")  # <run>/checkpoints/step-XXXXXXXX
BEST_FILE = "best.json"  # beside the weights in <run>/best/, {"metric", "value", "step"} (align/train/best.py)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_records(model_dir: str) -> Tuple[Dict[str, Any], Optional[str]]:
    """What is known of the training that made ``model_dir``: ({"step", "samples", "processes"},
    each None when not recorded; the evaluation JSON of that step, or None).

    ``<run>/checkpoints/step-N/model/`` reads the step folder's ``trainer_state.json``. ``<run>/best/``
    (``train.best_metric``'s copy of one step's model) has none: its ``best.json`` names the step,
    whose checkpoint's ``trainer_state.json`` is read when the run still keeps it."""
    model_dir = os.path.abspath(model_dir)
    step_dir = os.path.dirname(model_dir) if os.path.basename(model_dir) == "model" else model_dir
    run_dir = os.path.dirname(os.path.dirname(step_dir))
    if os.path.basename(os.path.dirname(step_dir)) != "checkpoints":
        run_dir = ""
    best_step = None
    if os.path.isfile(os.path.join(model_dir, BEST_FILE)):
        run_dir = os.path.dirname(model_dir)
        best_step = read_json(os.path.join(model_dir, BEST_FILE)).get("step")
        step_dir = _step_folder(run_dir, best_step) or model_dir
    state = _read_if_there(os.path.join(step_dir, "trainer_state.json"))
    summary = _read_if_there(os.path.join(run_dir, "summary.json")) if run_dir else {}
    step = best_step if best_step is not None else state.get("step", summary.get("steps"))
    # the run's totals are this model's only when the run ended at its step
    samples = state.get("samples", summary.get("samples") if summary.get("steps") == step else None)
    facts = {"step": step, "samples": samples, "processes": _processes_at(step, state, summary)}
    return facts, _eval_file(model_dir, step_dir, run_dir, step)


def _read_if_there(path: str) -> Dict[str, Any]:
    return read_json(path) if os.path.isfile(path) else {}


def _step_folder(run_dir: str, step: Optional[int]) -> Optional[str]:
    """The run's checkpoint folder of ``step`` (``checkpoints/step-N``), or None when it was pruned."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if step is not None and os.path.isdir(folder) else []
    found = [name for name in names if (m := STEP_DIR.match(name)) and int(m.group(1)) == step]
    return os.path.join(folder, found[0]) if found else None


def _processes_at(step: Optional[int], state: Mapping[str, Any], summary: Mapping[str, Any]) -> Optional[int]:
    """How many processes trained ``step``: the run segment holding it (a resumed run may change the
    count), else the count the checkpoint's data reading was set up for; None when not recorded."""
    for segment in list(state.get("segments") or []) + list(summary.get("segments") or []):
        if step is not None and segment.get("start", 0) < step <= segment.get("end", -1) and segment.get("processes"):
            return int(segment["processes"])
    processes = (state.get("reading") or {}).get("processes")
    return int(processes) if processes else None


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


# The onnx snippet is built from the graphs written (_onnx_loading): which towers there are varies.
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
}


def _onnx_loading(folder: str) -> str:
    """How to run the graphs written in ``folder``, from its preprocess.json: a session of the first
    graph fed its own inputs; the others and the int8 twins named."""
    from align.export.onnx import OUTPUT, PREPROCESS_FILE, SUBDIR

    towers = read_json(os.path.join(folder, PREPROCESS_FILE))["towers"]
    modality, first = next(iter(towers.items()))
    feeds = ", ".join(f'"{name}": {name}' for name in first["inputs"])
    shapes = ", ".join(f"{name} {spec['dtype']} ({', '.join(map(str, spec['shape']))})"
                       for name, spec in first["inputs"].items())
    lines = ["```python", "import json, onnxruntime",
             f'spec = json.load(open("{SUBDIR}/{PREPROCESS_FILE}"))  # how to make each graph\'s inputs: '
             f'towers.<modality>',
             f'session = onnxruntime.InferenceSession("{SUBDIR}/{first["file"]}")',
             f'embedding = session.run(["{OUTPUT}"], {{{feeds}}})[0]  # (B, D) float32, unit rows',
             f"# {shapes}: spec['towers']['{modality}']"]
    others = [f"{entry['file']} takes {', '.join(entry['inputs'])}" for m, entry in towers.items() if m != modality]
    if others:
        lines.append(f"# {'; '.join(others)}: see preprocess.json")
    if "int8_file" in first:
        lines.append(f"# {first['int8_file']} (towers.{modality}.int8_file) takes the same inputs")
    return "\n".join(lines + ["```"])


def _training_lines(config: Config, facts: Mapping[str, Any]) -> List[str]:
    """The card's "Training data" section: data, steps, samples, the global batch, the loss."""
    data = config.data
    return [f"- train: `{data.train}`" + (f"; validation: `{data.val}`" if data.val else ""),
            f"- text columns: {list(data.columns.text) if data.columns.text else '(none)'}",
            f"- steps: {_known(facts.get('step'))}, samples seen: {_known(facts.get('samples'))}, "
            + _batch_text(data.batch_size, config.train.accum_steps, facts.get("processes")),
            f"- loss: {config.loss.name}, learning rate {config.optim.lr}"]


def _known(value: Any) -> Any:
    return "unknown" if value is None else value


def _batch_text(batch_size: int, accum_steps: int, processes: Optional[int]) -> str:
    """The batch each step contrasts: data.batch_size is per process and per accumulation step, the
    losses gather across processes and the cached step contrasts its accumulated batches together,
    so the in-batch negatives are all three multiplied (as train.py logs it)."""
    per_process = f"data.batch_size {batch_size} x train.accum_steps {accum_steps}"
    if processes is None:
        return (f"batch size {batch_size * accum_steps} per process ({per_process}); the number of processes "
                "was not recorded, and the in-batch negatives are this times it")
    return (f"global batch size {batch_size * accum_steps * processes} ({per_process} x {processes} "
            f"process{'es' if processes != 1 else ''}; the number of in-batch negatives)")


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
    facts, eval_path = run_records(model_dir)
    compression = compression or {}
    width = compression.get("dim") or config.model.embed_dim
    cut = f" (the first {width} of {compression.get('full_dim')}, renormalised)" if compression.get("dim") else ""
    lines = ["# Exported align model", "",
             f"Exported by `align export` from `{model_dir}`. Embeddings are L2-normalised rows of dimension "
             f"{width}{cut} in one space shared by the towers below (cosine = dot product).", "",
             "## Model", "", "| modality | tower | output | settings |", "|---|---|---|---|"]
    lines += [_tower_line(m, t, dims) for m, t in config.model.towers.items()]
    lines += ["", "## Compression", ""] + _compression_lines(compression, list(config.loss.matryoshka.dims or []))
    lines += ["", "## Training data", ""] + _training_lines(config, facts) + ["", "## Evaluation", ""]
    if eval_path:
        # the run evaluated the whole model: with --dim, these are not the exported vectors' figures
        width_note = (f", measured at the model's full width {compression.get('full_dim')} (not at the exported "
                      f"--dim {compression['dim']})" if compression.get("dim") else "")
        lines += [f"Zero-shot retrieval from `{eval_path}`{width_note}:", ""] + _eval_table(read_json(eval_path))
    else:
        lines.append("No evaluation file was found beside the checkpoint (run `align eval --checkpoint ...`).")
    lines += ["", "## Exports", ""]
    for name, files in written.items():
        figure = checks.get(name)
        checked = f" Checked on export: max |difference| from our model {figure:.2e}." if figure is not None else ""
        loading = _onnx_loading(os.path.join(out, name)) if name == "onnx" else LOADING[name]
        lines += [f"### {name}", "", f"Loads with its own library, without `align`.{checked}", "", loading, ""]
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
