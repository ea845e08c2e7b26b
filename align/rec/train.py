"""Train the recommender head: config -> Accelerator -> data -> examples -> head -> loop -> save.

One example is (a user's previous items, the next item they touched). A step scores every
user of the global batch against every item of it (``SampledSoftmax``: gathered across
processes, logQ-corrected, rows of the same item never each other's negatives), or against the
whole catalogue (``train.negatives: full``) when it fits. Batches are drawn from one seeded
permutation per epoch and cut into per-process slices of the global batch, so N processes see
exactly the batch one process would: their step is the same step.

The head is saved to ``train.output_dir`` as ``head.safetensors`` + ``rec_config.yaml`` +
``items.json`` (the ID table's item ids, training counts, where the item vectors came from) +
``reference_users.safetensors`` (a sample of training users' vectors, for the hub penalty):
safetensors, YAML and JSON only. With ``head.fusion: learned``, ``items.json`` also records the
modality order of the head's fusion weights, and ``summary.json`` the weights by modality name.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from align.config import save_config, to_dict
from align.errors import RunError, write_json_atomic
from align.loading import write_tensors
from align.losses.sampled_softmax import SampledSoftmax
from align.rec.config import RecConfig
from align.rec.data import RecData, item_features, last_items, load_rec_data, popularity_scale, training_examples
from align.rec.head import REFERENCE_USERS_FILE, RecHead
from align.schedule import warmup_cosine

log = logging.getLogger("align.rec")
OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW's moments, for align rec-update (save_optimizer)


def make_accelerator(config: RecConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without CUDA, a gloo group only when told it is CPU
        log_with=None if config.train.wandb == "disabled" else "wandb",
        project_config=ProjectConfiguration(project_dir=config.train.output_dir),
    )


def train_head(config: RecConfig) -> Dict[str, Any]:
    """Train as configured; returns the run summary (also written to ``summary.json``)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    set_seed(config.train.seed)
    data = load_rec_data(config)
    histories, targets = training_examples(data.split.train, config.head.history)
    scale = popularity_scale(data.train_counts)
    features = item_features(data.content, data.train_counts, scale, config.head.popularity_feature,
                             data.modality_vectors, data.modality_masks)  # (N, F)
    head = RecHead(features.shape[1], len(data.item_ids), config.head, data.modalities)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    out_dir = config.train.output_dir
    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
    if config.train.wandb != "disabled":
        accelerator.init_trackers(config.train.wandb_project, config=to_dict(config),
                                  init_kwargs={"wandb": {"mode": config.train.wandb, "dir": out_dir}})
    log.info("%d items (%d warm)", len(data.item_ids), int((data.train_counts > 0).sum()))
    summary = fit_head(accelerator, head, optimizer, histories, targets, features, data.id_rows, config,
                       where=config.data.interactions)
    summary["bad_rows"] = dict(data.bad.counts)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_head(head, config, items_meta(data, scale, config), out_dir)
        save_optimizer(optimizer, head, out_dir)
        write_tensors({"users": reference_users(head, data, features, config)},
                      os.path.join(out_dir, REFERENCE_USERS_FILE), metadata={"format": "align-rec-users/1"})
        write_json_atomic(summary, os.path.join(out_dir, "summary.json"))
    accelerator.end_training()
    return summary


def fit_head(accelerator, head: RecHead, optimizer: torch.optim.Optimizer, histories: np.ndarray,
             targets: np.ndarray, features: torch.Tensor, id_rows: torch.Tensor, config: RecConfig,
             steps: Optional[int] = None, where: str = "") -> Dict[str, Any]:
    """Train ``head`` in place on (history -> next item) examples: the loop of ``align rec-train``,
    and of ``align rec-update`` from a saved head and optimiser.

    histories (E, L) item codes left-padded with -1, targets (E,); features (N, F) and id_rows (N,)
    of the catalogue. ``steps`` optimiser steps (default ``train.epochs`` epochs), learning rate
    ``train.lr`` warmed up and decayed over them; logQ from the targets' own counts. Returns the
    summary (steps, examples, timing, loss history, learned fusion weights); ``where`` names the
    log in errors."""
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.train.batch_size * world
    if len(targets) < global_batch:
        raise RunError(f"{where}: {len(targets)} training interactions are fewer than one global "
                       f"batch ({global_batch}); lower train.batch_size")
    steps_per_epoch = len(targets) // global_batch  # whole global batches: every process the same size
    total = steps_per_epoch * config.train.epochs if steps is None else steps
    device = accelerator.device
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, config.train.warmup_steps))
    # The schedule stays ours: a prepared one steps once per process per optimiser step.
    model, optimizer = accelerator.prepare(head, optimizer)
    content, id_rows = features.to(device), id_rows.to(device)
    counts = torch.from_numpy(np.bincount(targets, minlength=len(content))).double()
    log_q = torch.log(counts.clamp(min=1) / len(targets)).float().to(device)  # (N,) in-batch sampling odds
    loss_fn = SampledSoftmax(gather=True)
    logit_scale = torch.tensor(1.0 / config.train.temperature, device=device)
    progress = None
    if config.train.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="rec-train", unit="step")
    log.info("%d examples, global batch %d, %d steps", len(targets), global_batch, total)
    history: List[Dict[str, float]] = []
    started, step = time.perf_counter(), 0
    model.train()
    for epoch in range(math.ceil(total / steps_per_epoch)):
        order = np.random.default_rng(config.train.seed + epoch).permutation(len(targets))
        for index in range(min(steps_per_epoch, total - step)):
            rows = order[index * global_batch + rank * config.train.batch_size:][:config.train.batch_size]
            past, target = torch.from_numpy(histories[rows]).to(device), torch.from_numpy(targets[rows]).to(device)
            loss = step_loss(model, past, target, content, id_rows, loss_fn, logit_scale, log_q, config)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.train.log_every == 0 or step == total:
                value = accelerator.reduce(loss.detach(), reduction="mean").item()
                record = {"step": step, "epoch": epoch, "loss": value, "lr": scheduler.get_last_lr()[0],
                          "examples_per_s": step * global_batch / (time.perf_counter() - started)}
                history.append(record)
                fusion = head.fusion_weights()  # {} unless head.fusion is learned
                weights = {f"rec/fusion_weight/{m}": w for m, w in fusion.items()}
                accelerator.log({**{f"rec/{k}": v for k, v in record.items() if k != "step"}, **weights}, step=step)
                if progress is not None:
                    progress.set_postfix(loss=f"{value:.3f}")
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - started
    summary = {"steps": total, "examples": int(len(targets)), "global_batch": global_batch, "seconds": seconds,
               "examples_per_s": total * global_batch / seconds, "history": history}
    fusion_weights = head.fusion_weights()
    if fusion_weights:  # head.fusion learned: each modality's share of the fused item vector
        summary["fusion_weights"] = fusion_weights
        log.info("learned fusion weights: %s", ", ".join(f"{m} {w:.3f}" for m, w in fusion_weights.items()))
    return summary


def step_loss(model, history: torch.Tensor, target: torch.Tensor, content: torch.Tensor, id_rows: torch.Tensor,
              loss_fn: SampledSoftmax, logit_scale: torch.Tensor, log_q: torch.Tensor, config: RecConfig) -> torch.Tensor:
    """This process's share of the step's loss (its mean over processes is the global loss).
    history (b, L) item codes (-1 = padding), target (b,) the next item of each."""
    if config.train.negatives == "full":
        # Every catalogue item is a candidate: one forward scores the users against all of them.
        users, items = model(history, torch.arange(len(content), device=content.device), content, id_rows)
        return F.cross_entropy(logit_scale * users @ items.T, target)  # (b, N) logits
    users, items = model(history, target, content, id_rows)
    return loss_fn(users, items, logit_scale=logit_scale, log_q=log_q[target] if config.train.logq else None,
                   groups=target)["loss"]


@torch.no_grad()
def reference_users(head: RecHead, data: RecData, features: torch.Tensor, config: RecConfig) -> torch.Tensor:
    """(M, dim) vectors of up to ``rerank.hub_users`` training users (a seeded sample), from their
    last ``head.history`` training items, as ``Recommender.user_vectors`` computes them."""
    head.eval()
    histories = last_items(data.split.train, config.head.history)  # (U, L) item codes, -1 padded
    users = np.flatnonzero(histories[:, -1] >= 0)  # users with training interactions
    if len(users) > config.rerank.hub_users:
        users = np.sort(np.random.default_rng(config.train.seed).choice(users, config.rerank.hub_users, replace=False))
    device = next(head.parameters()).device
    features, id_rows = features.to(device), data.id_rows.to(device)
    out = []
    for start in range(0, len(users), 4096):
        hist = torch.from_numpy(histories[users[start:start + 4096]]).to(device)  # (u, L)
        mask, safe = hist >= 0, hist.clamp(min=0)
        out.append(head.encode_users(features[safe], torch.where(mask, id_rows[safe], -1), mask).cpu())
    return torch.cat(out) if out else torch.zeros(0, config.head.dim)


def items_meta(data: RecData, popularity_scale: float, config: RecConfig) -> Dict[str, Any]:
    """What ``items.json`` records of the item side the head was trained with."""
    meta = {"ids": data.item_ids, "train_counts": data.train_counts.tolist(),
            "content_dim": int(data.content.shape[1]), "popularity_scale": popularity_scale,
            "items": os.path.abspath(config.data.items), "cutoff": data.split.cutoff}
    if data.modalities:  # learned fusion: the order of the head's fusion weights
        meta["modalities"] = list(data.modalities)
    return meta


def save_head(head: RecHead, config: RecConfig, meta: Dict[str, Any], folder: str) -> None:
    """``head.safetensors`` + ``rec_config.yaml`` + ``items.json``, each written atomically."""
    write_tensors(head.state_dict(), os.path.join(folder, "head.safetensors"), metadata={"format": "align-rec-head/1"})
    save_config(config, os.path.join(folder, "rec_config.yaml"))
    write_json_atomic(meta, os.path.join(folder, "items.json"))


def save_optimizer(optimizer: torch.optim.Optimizer, head: RecHead, folder: str) -> None:
    """``optimizer.safetensors``: AdamW's moments and step count per parameter, named as in the
    head's state dict (``<name>.exp_avg``, ``<name>.exp_avg_sq``, ``<name>.step``), so
    ``align rec-update`` continues with them (``restore_optimizer``)."""
    state = {}
    for name, parameter in head.named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                state[f"{name}.{key}"] = value.reshape(-1) if value.dim() == 0 else value
    write_tensors(state, os.path.join(folder, OPTIMIZER_FILE), metadata={"format": "align-rec-adamw/1"})


def restore_optimizer(optimizer: torch.optim.Optimizer, head: RecHead, state: Dict[str, torch.Tensor]) -> int:
    """Give ``optimizer`` the saved moments of each of ``head``'s parameters whose shapes match
    (``save_optimizer``'s names); returns how many parameters got theirs. The learning rate and
    schedule are not restored: a continued run sets its own."""
    restored = 0
    for name, parameter in head.named_parameters():
        keys = {key[len(name) + 1:]: value for key, value in state.items() if key.rsplit(".", 1)[0] == name}
        moments = ("exp_avg", "exp_avg_sq")
        if "step" in keys and all(m in keys and keys[m].shape == parameter.shape for m in moments):
            optimizer.state[parameter] = {"step": keys["step"].reshape(()).float().clone(),
                                          **{m: keys[m].to(parameter).clone() for m in moments}}
            restored += 1
    return restored
