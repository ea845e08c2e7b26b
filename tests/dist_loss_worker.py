"""Worker for tests/test_losses_distributed.py, started by ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_loss_worker.py INPUTS.pt RESULTS.pt

(``--multi_gpu`` starts two processes through torchrun; ``Accelerator(cpu=True)`` below makes the
process group gloo on CPU. ``--cpu --num_processes 2`` would start only one in accelerate 1.15.)

For every scenario (a fixed batch and where it splits between the ranks) each rank takes its
share of the rows, runs every listed loss forward and backward, and rank 0 writes, per scenario
and loss: the mean over ranks of the returned loss, the input gradients of all ranks
concatenated and divided by the world size (DDP averages gradients; the gather's backward has
summed every rank's contribution, see align/losses/pairs.py), and the averaged gradients of the
replicated scalars (logit scale, SigLIP bias), as DDP would leave them.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

from align.registry import LOSSES


def scalar_grads(scale, loss):
    """(1 + parameters,) gradients of the logit scale and the loss's own parameters (0 if unused)."""
    tensors = [scale] + list(loss.parameters())
    return torch.stack([t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors])


def rank_rows(data, rank):
    """The slice of a scenario's rows this rank holds (``splits`` are the boundaries between ranks)."""
    bounds = [0] + list(data["splits"]) + [data["a"].shape[0]]
    return slice(bounds[rank], bounds[rank + 1])


def backward_as_ddp(loss, out, a, b, scale, world):
    """Backward through ``out["loss"]`` and what DDP would leave, on every rank: the mean loss over
    ranks, every rank's input gradients / world size concatenated, the averaged scalar gradients."""
    out["loss"].backward()
    value = out["loss"].detach().clone()
    dist.all_reduce(value)
    grads = [None] * world
    dist.all_gather_object(grads, (a.grad / world, b.grad / world))
    replicated = scalar_grads(scale, loss)
    dist.all_reduce(replicated)
    return {
        "loss": value / world,
        "a": torch.cat([g[0] for g in grads]),
        "b": torch.cat([g[1] for g in grads]),
        "params": replicated / world,
    }


def run_scenario(data, scale_value, losses, rank, world):
    rows = rank_rows(data, rank)
    results = {}
    for key, name, kwargs in losses:
        loss = LOSSES.get(name)(gather=True, **kwargs)
        a = data["a"][rows].clone().requires_grad_()
        b = data["b"][rows].clone().requires_grad_()
        scale = torch.tensor(scale_value, requires_grad=True)
        out = loss(a, b, logit_scale=scale, valid=data["valid"][rows], groups=data["groups"][rows],
                   negatives=data["negatives"][rows], negatives_mask=data["negatives_mask"][rows])
        results[key] = backward_as_ddp(loss, out, a, b, scale, world)
    return results


def run_two_processes(inputs_path: str, results_path: str, run, cases: str) -> None:
    """Every scenario of ``inputs_path`` through ``run(scenario, scale, data[cases], rank, world)``
    on two gloo processes; rank 0 saves {scenario: results} to ``results_path``."""
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes != 2:
        raise SystemExit(f"expected 2 processes, got {accelerator.num_processes}: check the launch flags")
    rank, world = accelerator.process_index, accelerator.num_processes
    data = torch.load(inputs_path)
    results = {name: run(scenario, data["scale"], data[cases], rank, world)
               for name, scenario in data["scenarios"].items()}
    if rank == 0:
        torch.save(results, results_path)
    accelerator.wait_for_everyone()
    # Leave the group before exiting: a rank that exits with gloo's threads still joinable can
    # abort ("terminate called without an active exception") once its peer has gone.
    dist.destroy_process_group()


def main(inputs_path: str, results_path: str) -> None:
    run_two_processes(inputs_path, results_path, run_scenario, "losses")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
