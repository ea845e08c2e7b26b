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
import os
import time
from typing import Any, Dict, List

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
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.train.batch_size * world
    if len(targets) < global_batch:
        raise RunError(f"{config.data.interactions}: {len(targets)} training interactions are fewer than one global "
                       f"batch ({global_batch}); lower train.batch_size")
    steps_per_epoch = len(targets) // global_batch  # whole global batches: every process the same size
    total = steps_per_epoch * config.train.epochs
    device = accelerator.device

    scale = popularity_scale(data.train_counts)
    features = item_features(data.content, data.train_counts, scale, config.head.popularity_feature,
                             data.modality_vectors, data.modality_masks)  # (N, F)
    head = RecHead(features.shape[1], len(data.item_ids), config.head, data.modalities)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, config.train.warmup_steps))
    # The schedule stays ours: a prepared one steps once per process per optimiser step.
    model, optimizer = accelerator.prepare(head, optimizer)
    content, id_rows = features.to(device), data.id_rows.to(device)
    counts = torch.from_numpy(np.bincount(targets, minlength=len(data.item_ids))).double()
    log_q = torch.log(counts.clamp(min=1) / len(targets)).float().to(device)  # (N,) in-batch sampling odds
    loss_fn = SampledSoftmax(gather=True)
    logit_scale = torch.tensor(1.0 / config.train.temperature, device=device)
    out_dir = config.train.output_dir
    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
    if config.train.wandb != "disabled":
        accelerator.init_trackers(config.train.wandb_project, config=to_dict(config),
                                  init_kwargs={"wandb": {"mode": config.train.wandb, "dir": out_dir}})
    progress = None
    if config.train.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="rec-train", unit="step")
    log.info("%d examples, %d items (%d warm), global batch %d, %d steps", len(targets), len(data.item_ids),
             int((data.train_counts > 0).sum()), global_batch, total)
    history: List[Dict[str, float]] = []
    started, step = time.perf_counter(), 0
    model.train()
    for epoch in range(config.train.epochs):
        order = np.random.default_rng(config.train.seed + epoch).permutation(len(targets))
        for index in range(steps_per_epoch):
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
                fusion = accelerator.unwrap_model(model).fusion_weights()  # {} unless head.fusion is learned
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
               "examples_per_s": total * global_batch / seconds, "history": history,
               "bad_rows": dict(data.bad.counts)}
    fusion_weights = accelerator.unwrap_model(model).fusion_weights()
    if fusion_weights:  # head.fusion learned: each modality's share of the fused item vector
        summary["fusion_weights"] = fusion_weights
        log.info("learned fusion weights: %s", ", ".join(f"{m} {w:.3f}" for m, w in fusion_weights.items()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_head(accelerator.unwrap_model(model), config, data, scale, out_dir)
        write_tensors({"users": reference_users(accelerator.unwrap_model(model), data, features, config)},
                      os.path.join(out_dir, REFERENCE_USERS_FILE), metadata={"format": "align-rec-users/1"})
        write_json_atomic(summary, os.path.join(out_dir, "summary.json"))
    accelerator.end_training()
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


def save_head(head: RecHead, config: RecConfig, data: RecData, popularity_scale: float, folder: str) -> None:
    """``head.safetensors`` + ``rec_config.yaml`` + ``items.json``, each written atomically."""
    write_tensors(head.state_dict(), os.path.join(folder, "head.safetensors"), metadata={"format": "align-rec-head/1"})
    save_config(config, os.path.join(folder, "rec_config.yaml"))
    meta = {"ids": data.item_ids, "train_counts": data.train_counts.tolist(),
            "content_dim": int(data.content.shape[1]), "popularity_scale": popularity_scale,
            "items": os.path.abspath(config.data.items), "cutoff": data.split.cutoff}
    if data.modalities:  # learned fusion: the order of the head's fusion weights
        meta["modalities"] = list(data.modalities)
    write_json_atomic(meta, os.path.join(folder, "items.json"))
