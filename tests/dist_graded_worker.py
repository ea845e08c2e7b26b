"""Worker for tests/test_graded_loss.py's two-process check, started by ``accelerate launch``
(see tests/dist_loss_worker.py for the launch flags and what rank 0 writes).

Each rank takes its rows of every scenario, trims its relevance lists to the widest list it
holds (so the two ranks pass lists of different widths P, as real batches do), runs every
listed (key, loss name, parameters) case (``graded_infonce``, ``graded_infonce_tiled``)
forward and backward, and rank 0 writes the mean of the returned losses over the ranks and
every rank's input gradients divided by the world size (what DDP's averaging leaves),
concatenated.
"""
from __future__ import annotations

import sys

import torch

from align.registry import LOSSES
from tests.dist_loss_worker import backward_as_ddp, rank_rows, run_two_processes


def own_rows(data, rank):
    rows = rank_rows(data, rank)
    keys = data["positive_keys"][rows]
    width = max(int((keys >= 0).sum(1).max()) if keys.numel() else 0, 1)
    return rows, keys[:, :width], data["positive_grades"][rows][:, :width]


def run_scenario(data, scale_value, cases, rank, world):
    rows, keys, grades = own_rows(data, rank)
    results = {}
    for key, name, kwargs in cases:
        loss = LOSSES.get(name)(gather=True, **kwargs)
        a = data["a"][rows].clone().requires_grad_()
        b = data["b"][rows].clone().requires_grad_()
        scale = torch.tensor(scale_value, requires_grad=True)
        out = loss(a, b, logit_scale=scale, valid=data["valid"][rows], groups=data["groups"][rows],
                   negatives=data["negatives"][rows], negatives_mask=data["negatives_mask"][rows],
                   item_keys=data["item_keys"][rows], positive_keys=keys, positive_grades=grades)
        results[key] = backward_as_ddp(loss, out, a, b, scale, world)
    return results


def main(inputs_path: str, results_path: str) -> None:
    run_two_processes(inputs_path, results_path, run_scenario, "cases")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
