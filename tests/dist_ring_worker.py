"""Worker for tests/test_ring_loss.py: the ring-exchange InfoNCE and SigLIP on any number of gloo
processes.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_ring_worker.py INPUTS.pt RESULTS.pt
    python -m torch.distributed.run --nproc_per_node 3 tests/dist_ring_worker.py INPUTS.pt RESULTS.pt

Both launchers set torchrun's environment; the group is gloo on CPU. For every scenario each
rank takes its share of the rows (the scenario's ``splits`` for this world size) and runs every
listed loss forward and backward through ``dist_loss_worker.run_scenario``; rank 0 writes what
DDP would leave: the mean loss, the input gradients averaged over ranks, the averaged logit-scale
gradient.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from tests.dist_loss_worker import run_scenario


def main(inputs_path: str, results_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(inputs_path)
    results = {}
    for name, scenario in data["scenarios"].items():
        scenario = dict(scenario, splits=scenario["splits_by_world"][world])
        results[name] = run_scenario(scenario, scenario["scale"], data["losses"], rank, world)
    if rank == 0:
        torch.save(results, results_path)
    dist.barrier()
    # Leave the group before exiting (see dist_loss_worker: gloo may abort a rank whose peer has gone).
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
