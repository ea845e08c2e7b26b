"""``align rec-update``: continue training a recommender head on new events only (a warm start),
instead of training it again on the whole log.

    align rec-update --checkpoint runs/demo/rec --events new.csv [--out runs/demo/rec-2] \\
        [--epochs 3 | --steps 200] [--lr 1e-3] [train.batch_size=128 ...]

From the checkpoint: the head's weights, AdamW's moments (``optimizer.safetensors``, which
``align rec-train`` saves; without it the moments start at zero), the config (dotted overrides
change it, e.g. ``train.batch_size=128``) and the popularity scale. The learning rate warms up
(``train.warmup_steps``) and decays over the update's own steps, from a peak of a third of the
training rate (``--lr`` sets it): on the demo shop (benchmarks/rec_online.py, 1000 users, W1's
3672 events) three epochs at the training rate itself ranked the next window worse (NDCG@10
0.0925) than at a third of it (0.0975), which is within noise of refreshing the popularity counts
alone (one step at a negligible rate: 0.0997); ten epochs did no better (0.0961) in three times
the time.

Examples: one per row of ``--events`` (validated against the catalogue as ``align rec-train``
validates its log: bad rows dropped and counted, too many refused). Its history is the user's
items before it in the checkpoint's log and the new events together, so a known user's first new
event is not read as a first visit; only the new events are targets. The old log's rows before
the checkpoint's cut-off trained it; those after it (the part a temporal split held out to
evaluate on) are history here, never targets: a head meant to serve is trained with
``data.split: none``, on every row. A new user is what it is in training: their first event has an empty history
(the head's "anyone" vector). A new item is what a cold item is: it had no ID vector (content
only); now that it has interactions it gets one, starting at zero (content only, as every ID
starts), and an item the checkpoint's catalogue did not list at all gets a new zero row. Item
popularity (``head.popularity_feature``) counts the old and the new interactions, on the
checkpoint's scale (the head learnt what that scale means).

The new folder holds what ``align rec-train`` writes, plus ``interactions.csv``: the checkpoint's
log and the new events merged (exact repeats once, in the shop's column names), which its
``rec_config.yaml`` names (``data.interactions``, with ``data.cutoff`` just after the newest new
event, or none with ``data.split: none``), so ``align serve`` and the next update read every
event the head has seen. ``summary.json`` adds ``loss_before`` (the checkpoint's loss on the new
events, as it serves them) and ``loss_after`` (the updated head's): a full softmax over the
catalogue, no dropout, at ``train.temperature``. Everything is
written to a temporary folder beside ``--out`` and then swapped in at once (an atomic exchange on
Linux), so a reader sees the old folder or the whole new one; ``--out`` defaults to
``--checkpoint`` (updated in place).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from align.config import load_dataclass
from align.errors import ConfigError, RunError, staged_folder, write_json_atomic
from align.index.vectors import load_item_embeddings
from align.loading import read_json, read_tensors, write_tensors
from align.rec.config import RecConfig, validate_rec
from align.rec.data import RecData, item_content, item_features, item_rows, training_examples
from align.rec.head import REFERENCE_USERS_FILE, RecHead
from align.rec.interactions import (BadRows, Interactions, merge_logs, read_catalogue_ids,
                                    read_interactions, write_interactions)
from align.rec.recommend import learned_inputs
from align.rec.split import Split, temporal_split, time_order
from align.rec.train import (OPTIMIZER_FILE, fit_head, items_meta, make_accelerator, reference_users,
                             restore_optimizer, save_head, save_optimizer)

log = logging.getLogger("align.rec")
MERGED_LOG = "interactions.csv"
UPDATE_EPOCHS = 3  # passes over the new events by default (train.epochs is for training from scratch)
UPDATE_LR_RATIO = 1 / 3  # the update's default peak learning rate, as a share of train.lr (module docstring)


@dataclasses.dataclass
class Checkpoint:
    """A saved head as ``align rec-train`` wrote it: config, items.json and tensors."""

    folder: str
    config: RecConfig
    meta: Dict[str, Any]
    state: Dict[str, torch.Tensor]
    optimizer: Dict[str, torch.Tensor]  # empty when the folder has no optimizer.safetensors

    @classmethod
    def read(cls, folder: str, overrides: Sequence[str] = ()) -> "Checkpoint":
        """Read ``folder`` (safetensors, YAML and JSON only); ``overrides`` change its config."""
        path = os.path.join(folder, "rec_config.yaml")
        if not os.path.isfile(path):
            raise RunError(f"{folder}: no rec_config.yaml; give --checkpoint a folder written by align rec-train")
        config = validate_rec(load_dataclass(RecConfig, path, list(overrides)))
        state, _ = read_tensors(os.path.join(folder, "head.safetensors"))
        optimizer_path = os.path.join(folder, OPTIMIZER_FILE)
        optimizer = read_tensors(optimizer_path)[0] if os.path.isfile(optimizer_path) else {}
        return cls(folder, config, read_json(os.path.join(folder, "items.json")), state, optimizer)


def new_examples(train: Interactions, is_new: np.ndarray, history: int) -> Tuple[np.ndarray, np.ndarray]:
    """``training_examples`` of ``train`` whose target row is new: (histories (E, L), targets (E,)),
    each history the user's items before it, old and new."""
    histories, targets = training_examples(train, history)  # in time_order(train)
    chosen = is_new[time_order(train)]
    return histories[chosen], targets[chosen]


def realign_rows(table: torch.Tensor, old_ids: Sequence[str], new_ids: Sequence[str]) -> torch.Tensor:
    """(len(new_ids), ...) the rows of ``table`` (one per ``old_ids``) in ``new_ids`` order; an id
    ``old_ids`` lacks gets a zero row (a new ID starts as "content only")."""
    row_of = {item: row for row, item in enumerate(old_ids)}
    out = table.new_zeros(len(new_ids), *table.shape[1:])
    pairs = [(new, row_of[item]) for new, item in enumerate(new_ids) if item in row_of]
    if pairs:
        new_rows, old_rows = map(torch.tensor, zip(*pairs))
        out[new_rows] = table[old_rows]
    return out


def id_rows_of(counts: np.ndarray) -> torch.Tensor:
    """(N,) an item's ID row (its code) where it has training interactions, else -1 (content only)."""
    return torch.where(torch.from_numpy(counts > 0), torch.arange(len(counts)), -1)


@torch.no_grad()
def softmax_loss(head: RecHead, histories: np.ndarray, targets: np.ndarray, features: torch.Tensor,
                 id_rows: torch.Tensor, temperature: float, chunk: int = 1024) -> float:
    """Mean cross-entropy of each target among every catalogue item, in eval mode (no dropout):
    histories (E, L), targets (E,), features (N, F), id_rows (N,)."""
    head.eval()
    items = head.encode_items(features, id_rows)  # (N, dim)
    total = 0.0
    for start in range(0, len(targets), chunk):
        hist = torch.from_numpy(histories[start:start + chunk])
        mask, safe = hist >= 0, hist.clamp(min=0)
        users = head.encode_users(features[safe], torch.where(mask, id_rows[safe], -1), mask)  # (b, dim)
        logits = users @ items.T / temperature  # (b, N)
        total += F.cross_entropy(logits, torch.from_numpy(targets[start:start + chunk]), reduction="sum").item()
    return total / max(len(targets), 1)


def item_side(config: RecConfig, meta: Dict[str, Any], folder: str, item_ids: List[str], items: Optional[str]
              ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[str, ...], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(content (N, Dc), present (N,), modalities, modality vectors (N, M, D), masks (N, M)) of
    ``item_ids`` from the embeddings folder, as the head was trained to read them."""
    source = items or meta["items"]
    embeddings = load_item_embeddings(source)
    content, present = item_content(source, item_ids, config.head.modality, embeddings)
    if content.shape[1] != meta["content_dim"]:
        raise RunError(f"{source}: vectors of dimension {content.shape[1]}, the head in {folder} was trained on "
                       f"{meta['content_dim']}; embed with the same checkpoint")
    modalities, vectors, masks = learned_inputs(config, meta, embeddings, source, folder)
    if vectors is not None:
        rows = item_rows(embeddings, source, item_ids)
        vectors, masks = vectors[rows], masks[rows]
    return content, present, modalities, vectors, masks


@dataclasses.dataclass
class NewWindow:
    """The new events as the update trains on them."""

    old: Interactions  # the checkpoint's log
    new: Interactions  # --events
    bad: BadRows  # --events' dropped rows
    merged: Interactions  # both, repeats once, in time order
    split: Split  # merged, train = everything before ``cutoff``
    cutoff: float  # just after the newest new event (or the checkpoint's cut-off, when later)
    histories: np.ndarray  # (E, L) the history of each new event, old and new items
    targets: np.ndarray  # (E,) the new events' items


def read_window(config: RecConfig, meta: Dict[str, Any], item_ids: List[str], events: str) -> NewWindow:
    """The checkpoint's log and ``events`` read against the catalogue (bad rows dropped and counted,
    too many refused), merged, and cut into (history -> new event) examples."""
    data = config.data
    old, _ = read_interactions(data.interactions, item_ids, data.columns, data.max_bad_fraction)
    new, bad = read_interactions(events, item_ids, data.columns, data.max_bad_fraction)
    if bad.n_bad:
        log.warning("%s", bad.report())
    merged, is_new = merge_logs(old, new)
    cutoff = float(np.nextafter(new.times.max(), np.inf))  # every new event trains
    if meta.get("cutoff") is not None:
        cutoff = max(cutoff, float(meta["cutoff"]))
    split = temporal_split(merged, cutoff, cold_user_max=data.cold_user_max)
    histories, targets = new_examples(split.train, is_new[merged.times < cutoff], config.head.history)
    if len(targets) < 2:
        raise RunError(f"{events}: {len(targets)} usable new events; an update needs at least 2")
    return NewWindow(old, new, bad, merged, split, cutoff, histories, targets)


def warm_start(saved: Checkpoint, config: RecConfig, item_ids: List[str], feature_dim: int,
               modalities: Tuple[str, ...]) -> Tuple[RecHead, torch.optim.Optimizer, int]:
    """(the saved head, an AdamW over it with the saved moments, how many tensors got theirs); the
    ID table (and its moments) in ``item_ids`` order, rows of items the checkpoint lacked at zero."""
    head = RecHead(feature_dim, len(item_ids), config.head, modalities)
    state, moments = dict(saved.state), dict(saved.optimizer)
    if config.head.id_embeddings:
        state["items.ids.weight"] = realign_rows(state["items.ids.weight"], saved.meta["ids"], item_ids)
        for key in [k for k in moments if k.startswith("items.ids.weight.exp_avg")]:
            moments[key] = realign_rows(moments[key], saved.meta["ids"], item_ids)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RunError(f"{saved.folder}/head.safetensors does not match its rec_config.yaml: {error}") from None
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    return head, optimizer, restore_optimizer(optimizer, head, moments)


def update_head(checkpoint: str, events: str, out: Optional[str] = None, epochs: Optional[int] = None,
                steps: Optional[int] = None, lr: Optional[float] = None, overrides: Sequence[str] = (),
                items: Optional[str] = None) -> Dict[str, Any]:
    """Continue training the head in ``checkpoint`` on the log ``events``; write the new folder
    ``out`` (default: ``checkpoint``, replaced) and return its summary (module docstring)."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    saved = Checkpoint.read(checkpoint, overrides)
    config, meta = saved.config, saved.meta
    # this update's own settings train it and are not saved: the next update starts again from
    # the head's (its rate a third of training's, not of this one's, its batch not this one's)
    run = dataclasses.replace(config, train=dataclasses.replace(
        config.train, epochs=epochs if epochs is not None else UPDATE_EPOCHS,
        lr=lr if lr is not None else config.train.lr * UPDATE_LR_RATIO))
    out = os.path.abspath(out or checkpoint)
    accelerator = make_accelerator(run)
    set_seed(run.train.seed)
    item_ids = read_catalogue_ids(config.data.catalogue, config.data.id_column)
    window = read_window(config, meta, item_ids, events)
    most = len(window.targets) // accelerator.num_processes
    if most < run.train.batch_size:
        log.warning("%s: %d new events, fewer than a global batch of %d: one batch of them all", events,
                    len(window.targets), run.train.batch_size * accelerator.num_processes)
        run.train.batch_size = most

    content, present, modalities, vectors, masks = item_side(config, meta, checkpoint, item_ids, items)
    data = RecData(item_ids=item_ids, content=content, has_content=present, split=window.split, bad=window.bad,
                   modalities=modalities, modality_vectors=vectors, modality_masks=masks)
    scale = float(meta["popularity_scale"])
    old_counts = np.array([dict(zip(meta["ids"], meta["train_counts"])).get(i, 0) for i in item_ids], dtype=np.int64)
    before = item_features(content, old_counts, scale, config.head.popularity_feature, vectors, masks)
    features = item_features(content, data.train_counts, scale, config.head.popularity_feature, vectors, masks)
    head, optimizer, restored = warm_start(saved, run, item_ids, features.shape[1], modalities)
    examples = (window.histories, window.targets)
    loss_before = softmax_loss(head, *examples, before, id_rows_of(old_counts), config.train.temperature)
    log.info("%s: %d new events (%d new users), %d rows of context; AdamW moments %s", events, len(window.targets),
             len(set(window.new.user_ids) - set(window.old.user_ids)), len(window.old),
             f"restored for {restored} tensors" if restored else "start at zero (no optimizer.safetensors)")

    summary = fit_head(accelerator, head, optimizer, *examples, features, data.id_rows, run, steps, where=events)
    summary.update(loss_before=loss_before, checkpoint=os.path.abspath(checkpoint), events=os.path.abspath(events),
                   loss_after=softmax_loss(head, *examples, features, data.id_rows, config.train.temperature),
                   new_events=int(len(window.targets)), context_rows=int(len(window.old)),
                   optimizer_restored=restored, bad_rows=dict(window.bad.counts))
    if accelerator.is_main_process:
        # the merged log keeps the shop's column names, so the next update reads it and the next
        # events with the one data.columns
        cutoff = None if config.data.split == "none" else window.cutoff  # none: the whole merged log trained
        config.data = dataclasses.replace(config.data, interactions=os.path.join(out, MERGED_LOG), cutoff=cutoff,
                                          items=os.path.abspath(items or meta["items"]))
        with staged_folder(out) as staging:
            write_interactions(window.merged, os.path.join(staging, MERGED_LOG), config.data.columns)
            save_head(head, config, items_meta(data, scale, config), staging)
            save_optimizer(optimizer, head, staging)
            write_tensors({"users": reference_users(head, data, features, config)},
                          os.path.join(staging, REFERENCE_USERS_FILE), metadata={"format": "align-rec-users/1"})
            summary["seconds_total"] = time.perf_counter() - started
            write_json_atomic(summary, os.path.join(staging, "summary.json"))
    accelerator.end_training()
    return summary


# ------------------------------------------------------------------------------------------------
# align rec-update
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align rec-update", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder written by `align rec-train` (or rec-update)")
    parser.add_argument("--events", required=True, help="the new events: a log as rec-train reads (CSV/JSONL/Parquet)")
    parser.add_argument("--out", help="the updated folder (default: --checkpoint, replaced at once)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"passes over the new events (default {UPDATE_EPOCHS})")
    length.add_argument("--steps", type=int, help="optimiser steps, instead of --epochs")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: a third of the config's train.lr)")
    parser.add_argument("--items", help="item embeddings folder (default: the one the head was trained on)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config, e.g. train.batch_size=128")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    for flag, value in (("--epochs", args.epochs), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr {args.lr}: must be a positive finite number")
    summary = update_head(args.checkpoint, args.events, args.out, args.epochs, args.steps, args.lr, args.overrides,
                          args.items)
    print(f"{summary['new_events']} new events, {summary['steps']} steps in {summary['seconds']:.1f} s; loss on them "
          f"{summary['loss_before']:.4f} -> {summary['loss_after']:.4f} -> {args.out or args.checkpoint}")
    return 0
