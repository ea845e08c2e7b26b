"""Run by tests/test_cached_step_distributed.py under `accelerate launch --num_processes 2 --cpu`.

Each rank takes its own micro-batches, runs one plain step and one cached (GradCache) step under
DDP, counts DDP's all-reduce calls with a comm hook, and rank 0 writes the counts plus whether
both ranks ended with identical gradients.
"""
import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from align.config import LossConfig
from align.objective import ContrastiveObjective, build_pair_losses
from align.train.cached_step import cached_step
from tests.test_objective import make_batch, tiny_model


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(0)
    model = tiny_model(dropout=0.1)
    objective = accelerator.prepare(ContrastiveObjective(model, build_pair_losses(model.modalities, LossConfig())))
    calls = {"n": 0}

    def counting_allreduce(state, bucket):
        calls["n"] += 1
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    objective.register_comm_hook(None, counting_allreduce)
    rank = accelerator.process_index
    micro = [make_batch(model, 4, missing_image=(rank,), seed=10 * rank + s) for s in range(3)]
    for i, b in enumerate(micro):
        b["ids"] = [f"{rank}-{i}-{x}" for x in b["ids"]]

    accelerator.backward(objective(micro[0])["loss"])
    plain_calls = calls["n"]
    objective.zero_grad(set_to_none=True)

    calls["n"] = 0
    cached_step(objective, micro, accelerator.backward, lambda: accelerator.no_sync(objective))
    cached_calls = calls["n"]
    flat = torch.cat([p.grad.flatten() for p in objective.parameters() if p.grad is not None])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if accelerator.is_main_process:
        with open(out_path, "w") as handle:
            json.dump({"plain_calls": plain_calls, "cached_calls": cached_calls,
                       # both ranks hold the same all-reduced sum of two halves (a + b == b + a
                       # exactly in floating point), so this holds on any kernels
                       "grads_equal_across_ranks": bool(torch.allclose(gathered[0], gathered[1])),
                       "grad_norm": float(flat.norm())}, handle)
    accelerator.wait_for_everyone()
    # Leave the group before exiting: a rank that exits with gloo's threads still joinable can
    # abort ("terminate called without an active exception") once its peer has gone.
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
