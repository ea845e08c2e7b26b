"""``train.best_metric`` and ``train.patience``: keep the model of the best evaluation, and stop a
run whose evaluations no longer improve.

After every evaluation of a run (``train.eval_every``, or each epoch's end, and the last step's),
the figure that ``train.best_metric`` names ("<entry>/<name>" as eval.json holds it, e.g.
``search/ndcg@10`` or ``text->image/R@1``) is compared with the best so far. Higher is better; a
tie is no improvement (the earlier, less trained model stays), and so is NaN (no query had a
relevant item). An improvement writes the model to ``<output_dir>/best/``: a model folder that
``align embed``, ``align eval``, ``align search-eval`` and ``align export`` read as they read a
checkpoint, with ``best.json`` ({"metric", "value", "step"}) beside the weights, staged and
swapped in whole (``errors.staged_folder``), so a reader never finds half a model there; the
staging folder of a run killed while writing it (``.best.*.tmp``) is removed when a run next starts
in that output folder.

``train.patience`` N > 0 ends the run after N evaluations in a row without an improvement: it
ends as at its last step (a checkpoint, the final evaluation, summary.json with "best" and
"stopped_early"). Fine-tuning on a search log is where this pays: the plain baseline of
``benchmarks/search_log_finetune.py`` peaks after about 100 of its 300 steps.

The record (``TrainState.best``: metric, value, step, evaluations since, the step last counted)
is saved with every checkpoint, so a resumed run counts on from where it stood.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional

import torch

from align.config import Config
from align.errors import RunError, staged_folder, write_json_atomic

BEST_SUBDIR = "best"
BEST_FILE = "best.json"


def best_folder(output_dir: str) -> str:
    return os.path.join(output_dir, BEST_SUBDIR)


def figure(results: Dict[str, Dict[str, Any]], metric: str) -> float:
    """The value ``metric`` ("<entry>/<name>") names in an evaluation's results; a ``RunError``
    naming ``train.best_metric`` and what the evaluation did report when it is not there."""
    entry, _, name = metric.rpartition("/")
    try:
        return float(results[entry][name])
    except (KeyError, TypeError, ValueError):
        present = ", ".join(sorted(results)) or "nothing"
        raise RunError(f"train.best_metric: {metric!r} is not in this evaluation (its entries: {present}); an entry "
                       f"per query modality is there only when the held-out log has such queries") from None


def track_best(accelerator: Any, model: torch.nn.Module, config: Config, state: Any,
               results: Optional[Dict[str, Dict[str, Any]]]) -> bool:
    """Count one evaluation at ``state.step`` (``results``: the main process's; None elsewhere),
    write ``best/`` when it improves, and return whether ``train.patience`` has run out, the same
    on every process (a collective: every process calls it after each evaluation). An evaluation
    at a step already counted (the last step's, after a periodic one) changes nothing."""
    metric = config.train.best_metric
    if not metric:
        return False
    record, stop = state.best, False
    if record.get("metric", metric) != metric:  # resumed with another best_metric: its own count
        record.clear()
    if accelerator.is_main_process:
        if record.get("counted_step") != state.step:
            value, best = figure(results or {}, metric), record.get("value")
            if math.isfinite(value) and (best is None or value > best):
                _write_best(model, config, metric, value, state.step)
                record.update(metric=metric, value=value, step=state.step, since=0)
            else:
                record["since"] = record.get("since", 0) + 1
            record["counted_step"] = state.step
        stop = record.get("since", 0) >= config.train.patience > 0
    return _agree(accelerator, stop)


def _agree(accelerator: Any, stop: bool) -> bool:
    """The main process's decision, on every process."""
    if accelerator.num_processes == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _write_best(model: torch.nn.Module, config: Config, metric: str, value: float, step: int) -> None:
    from align.train.checkpoint import save_model

    with staged_folder(best_folder(config.train.output_dir)) as staging:
        save_model(model, config, staging)
        write_json_atomic({"metric": metric, "value": value, "step": step}, os.path.join(staging, BEST_FILE))
