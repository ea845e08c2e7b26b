"""Our training step beside open_clip's own, from identical weights on identical batches.

Part 1, step parity: one open_clip CLIP is created; its initial weights are copied into our model
(the same open_clip towers, identity projections, the same temperature). Then ``--steps`` steps
run on both from the same batches in the same order, augmentation off:

* open_clip: ``open_clip_train.train.train_one_epoch`` itself, with its ``ClipLoss``, the AdamW
  parameter groups ``open_clip_train.main`` builds (no decay for ndim < 2, "bn", "ln", "bias",
  "logit_scale" names), its cosine schedule and its clamp of the logit scale after each step;
* ours: the trainer's own step (``align.train.recipe``) with our AdamW groups and schedule, set
  to open_clip's choices: ``optim.decay_embeddings=true``, ``model.logit_scale_clamp=parameter``,
  ``optim.grad_clip=0``, ``optim.implementation=foreach``.

Loss, gradient norm and logit scale are compared step by step, in float64 and in float32.

Part 2, quality: ``benchmarks/peer_openclip.py`` trains both trainers on the demo catalogue for
``--seeds`` seeds with ``--model`` and reports the held-out text->image R@1, mean and standard
deviation (skip with ``--seeds 0``).

    python benchmarks/parity_openclip.py [--model ViT-B-32] [--steps 4] [--batch-size 8]
        [--quality-model configs/models/demo-vit-s.json --seeds 3 --epochs 3]

The last line is JSON: {"max_loss_rel_diff", "ours_r1_mean", "ours_r1_std", "openclip_r1_mean",
"openclip_r1_std", "seeds", "model"}.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
from types import SimpleNamespace
from typing import Dict, List, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENCLIP_CHOICES = ["optim.decay_embeddings=true", "model.logit_scale_clamp=parameter", "optim.grad_clip=0",
                    "optim.implementation=foreach", "optim.schedule=cosine", "optim.min_lr_ratio=0",
                    "model.learn_temperature=true", "model.max_logit_scale=100"]


def model_name(model: str) -> str:
    """An open_clip model name, or a JSON config registered under its file stem."""
    import open_clip

    if model.endswith(".json"):
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


# Where our defaults differ from open_clip's trainer (each a config choice; measured by main()).
DIFFERENCES = {
    "embeddings not decayed (our default)": "optim.decay_embeddings=false",
    "logit scale clamped in the forward (our default)": "model.logit_scale_clamp=forward",
    "gradients clipped at norm 1 (our default)": "optim.grad_clip=1.0",
    "fused AdamW kernel (our default: auto)": "optim.implementation=fused",
}


def our_config(model: str, embed_dim: int, steps: int, lr: float, wd: float, warmup: int, out_dir: str,
               extra: Sequence[str] = ()):
    from align.config import load_config

    return load_config(None, [
        f"model.embed_dim={embed_dim}", "model.init_temperature=0.07",
        "model.towers.image.type=open_clip_image", f"model.towers.image.model={model}",
        "model.towers.text.type=open_clip_text", f"model.towers.text.model={model}",
        "data.train=unused.csv", f"optim.lr={lr}", f"optim.weight_decay={wd}", "optim.betas=[0.9,0.98]",
        "optim.eps=1e-6", f"optim.warmup_steps={warmup}", f"train.max_steps={steps}",
        f"train.output_dir={out_dir}", "train.wandb=disabled", "train.progress=false", *OPENCLIP_CHOICES, *extra,
    ])


def copy_weights(clip: torch.nn.Module, model: torch.nn.Module) -> None:
    """open_clip's CLIP state -> our AlignModel: ``visual.*`` is the image tower's trunk, the rest
    the text tower's trunk, ``logit_scale`` our temperature. Every parameter of ours is set."""
    state = clip.state_dict()
    ours = {}
    for name, value in state.items():
        if name.startswith("visual."):
            ours[f"towers.image.trunk.{name[len('visual.'):]}"] = value
        else:
            ours[f"towers.text.trunk.{name}"] = value
    ours["log_logit_scale"] = state["logit_scale"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected or any(not k.endswith("pixel_scale") and not k.endswith("pixel_shift") for k in missing):
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")


def make_batches(clip: torch.nn.Module, name: str, steps: int, batch_size: int, seed: int) -> List[dict]:
    """Random uint8 images and random captions, tokenised by open_clip, as our batches."""
    import open_clip

    generator = torch.Generator().manual_seed(seed)
    size = clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    tokenizer = open_clip.get_tokenizer(name)
    words = ["red", "blue", "striped", "dotted", "large", "small", "star", "shoe", "lamp", "cup", "green", "round"]
    batches = []
    for _ in range(steps):
        images = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, generator=generator)
        picks = torch.randint(0, len(words), (batch_size, 4), generator=generator)
        captions = [" ".join(words[int(i)] for i in row) for row in picks]
        ones = torch.ones(batch_size, dtype=torch.bool)
        batches.append({"ids": [str(i) for i in range(batch_size)], "texts": captions,
                        "groups": torch.full((batch_size,), -1, dtype=torch.long),
                        "inputs": {"image": images, "text": tokenizer(captions)},
                        "masks": {"image": ones, "text": ones.clone()}})
    return batches


def normalised_pixels(images: torch.Tensor, image_tower: torch.nn.Module) -> torch.Tensor:
    """uint8 -> open_clip's ToTensor + Normalize, exactly as our image tower computes it on its
    device (the same scale and shift constants), so both models see bitwise the same pixels."""
    scale, shift = image_tower.pixel_scale, image_tower.pixel_shift
    return torch.addcmul(shift, images.to(scale.dtype), scale)


class _Recorder(torch.nn.Module):
    """Wraps open_clip's ClipLoss to record the loss and the logit scale it is given."""

    def __init__(self, loss: torch.nn.Module, log: Dict[str, list]) -> None:
        super().__init__()
        self.loss, self.log = loss, log

    def forward(self, **kwargs):
        out = self.loss(**kwargs)
        self.log["loss"].append(float(sum(out.values()).detach()))
        self.log["logit_scale"].append(float(kwargs["logit_scale"].detach()))
        return out


def run_openclip(clip: torch.nn.Module, batches: Sequence[dict], lr: float, wd: float, warmup: int,
                 image_tower: torch.nn.Module) -> Dict[str, list]:
    """``train_one_epoch`` of open_clip_train over ``batches``; returns per-step figures."""
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(clip.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": wd}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    log: Dict[str, list] = {"loss": [], "grad_norm": [], "logit_scale": []}
    step = optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.detach().double().norm() for p in clip.parameters() if p.grad is not None]
        log["grad_norm"].append(float(torch.stack(grads).norm()))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    dataloader = _Batches((normalised_pixels(b["inputs"]["image"], image_tower), b["inputs"]["text"]) for b in batches)
    dataloader.num_batches, dataloader.num_samples = len(dataloader), sum(len(b["ids"]) for b in batches)
    data = {"train": SimpleNamespace(dataloader=dataloader, set_epoch=lambda epoch: None)}
    args = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                           horovod=False, grad_clip_norm=None, log_every_n_steps=10 ** 9, batch_size=len(batches[0]["ids"]),
                           world_size=1, rank=0, local_rank=0, wandb=False)
    scheduler = cosine_lr(optimizer, lr, warmup, len(batches))
    clip.train()
    train_one_epoch(clip, data, _Recorder(ClipLoss(), log), 0, optimizer, None, scheduler, None, args)
    del optimizer.step  # the recording closure holds the optimiser: free both with the call
    return log


class _Batches(list):
    """A list of (images, texts) with the attributes open_clip's loop reads from its dataloader."""

    num_batches = 0
    num_samples = 0


def build_ours(config, clip: torch.nn.Module, dtype: torch.dtype):
    """Our objective with ``clip``'s weights, in ``dtype``."""
    from align.model import build_model
    from align.objective import ContrastiveObjective, build_pair_losses

    model = build_model(config.model)
    copy_weights(clip, model)
    return ContrastiveObjective(model, build_pair_losses(model.modalities, config.loss)).to(dtype)


def run_ours(config, objective: torch.nn.Module, batches: Sequence[dict]) -> Dict[str, list]:
    """Our trainer's step (``optimizer_step``, optimiser and schedule) over ``batches``."""
    from align.train.optim import build_optimizer, build_scheduler
    from align.train.recipe import make_accelerator, optimizer_step

    accelerator = make_accelerator(config)
    optimizer = build_optimizer(objective, config.optim, {m: 1.0 for m in objective.model.modalities})
    scheduler = build_scheduler(optimizer, len(batches), config.optim)
    log: Dict[str, list] = {"loss": [], "grad_norm": [], "logit_scale": []}
    objective.train()
    for batch in batches:
        terms = optimizer_step(accelerator, objective, optimizer, [batch], config)
        scheduler.step()
        log["loss"].append(float(terms["loss"]))
        log["grad_norm"].append(float(terms["grad_norm"]))
        log["logit_scale"].append(float(terms["logit_scale"]))
    return log


def compare(model: str, steps: int, batch_size: int, dtype: torch.dtype, seed: int = 0, lr: float = 1e-3,
            wd: float = 0.1, warmup: int = 2, out_dir: str = "", extra: Sequence[str] = ()) -> Dict[str, dict]:
    """Run both for ``steps`` steps in ``dtype``; per-step figures of each and relative differences."""
    import tempfile

    import open_clip

    name = model_name(model)
    torch.manual_seed(seed)
    clip = open_clip.create_model(name, output_dict=True).to(dtype)
    batches = make_batches(clip, name, steps, batch_size, seed)
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    config = our_config(model, embed_dim, steps, lr, wd, warmup, out_dir or tempfile.mkdtemp(prefix="parity-"), extra)
    objective = build_ours(config, clip, dtype)  # copies the initial weights before either trains
    peer = run_openclip(clip, batches, lr, wd, warmup, objective.model.towers["image"])
    ours = run_ours(config, objective, batches)
    rel = {key: [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(ours[key], peer[key])] for key in ours}
    del clip, objective
    gc.collect()  # two models with AdamW state (ViT-B-32 in float64: ~10 GB) before the next call
    return {"ours": ours, "openclip": peer, "rel": rel}


def print_comparison(result: Dict[str, dict], label: str) -> None:
    print(f"\n{label}: step | loss ours / open_clip | grad norm ours / open_clip | logit scale ours / open_clip")
    ours, peer = result["ours"], result["openclip"]
    for i in range(len(ours["loss"])):
        print(f"{i:4d} | {ours['loss'][i]:.10g} / {peer['loss'][i]:.10g} | {ours['grad_norm'][i]:.8g} / "
              f"{peer['grad_norm'][i]:.8g} | {ours['logit_scale'][i]:.8g} / {peer['logit_scale'][i]:.8g}")
    print("max relative difference: " + ", ".join(f"{k} {max(v):.2e}" for k, v in result["rel"].items()))


def quality(args) -> Dict[str, float]:
    """Both trainers on the demo catalogue over ``args.seeds`` seeds (benchmarks/peer_openclip.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_openclip

    r1 = {"ours": [], "open_clip": []}
    for seed in range(args.seeds):
        argv = ["--model", args.quality_model, "--seed", str(seed), "--epochs", str(args.epochs),
                "--batch-size", str(args.quality_batch_size), "--repeats", "1", "--workers", str(args.workers),
                "--warmup", str(args.quality_warmup), "--data", args.data]
        figures = peer_openclip.run(peer_openclip.parse(argv))
        r1["ours"].append(figures["ours_r1"])
        r1["open_clip"].append(figures["openclip_r1"])
        print(f"seed {seed}: held-out text->image R@1 ours {figures['ours_r1']:.3f}, "
              f"open_clip {figures['openclip_r1']:.3f}", flush=True)
    sd = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in r1.items()}
    mean = {k: statistics.fmean(v) for k, v in r1.items()}
    pooled = math.sqrt((sd["ours"] ** 2 + sd["open_clip"] ** 2) / 2)
    print(f"R@1 over {args.seeds} seeds: ours {mean['ours']:.3f} ± {sd['ours']:.3f}, open_clip "
          f"{mean['open_clip']:.3f} ± {sd['open_clip']:.3f}; pooled sd {pooled:.3f}")
    return {"ours_r1_mean": round(mean["ours"], 4), "ours_r1_std": round(sd["ours"], 4),
            "openclip_r1_mean": round(mean["open_clip"], 4), "openclip_r1_std": round(sd["open_clip"], 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip name or JSON config for the step comparison")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--differences", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each of our default choices against open_clip's")
    parser.add_argument("--quality-model", default=os.path.join(REPO, "configs", "models", "demo-vit-s.json"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quality-batch-size", type=int, default=128)
    parser.add_argument("--quality-warmup", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default=os.path.join(REPO, "data", "demo"), help="demo catalogue folder")
    args = parser.parse_args(argv)

    worst = {}
    for dtype in (torch.float64, torch.float32):
        result = compare(args.model, args.steps, args.batch_size, dtype)
        label = str(dtype).removeprefix("torch.")
        print_comparison(result, f"{args.model}, {label}, batch {args.batch_size}")
        worst[label] = float(f"{max(result['rel']['loss']):.3g}")
    if args.differences:
        print(f"\nour defaults, one at a time (float64, {args.steps} steps): max relative difference to open_clip")
        for what, override in DIFFERENCES.items():
            rel = compare(args.model, args.steps, args.batch_size, torch.float64, extra=[override])["rel"]
            print(f"  {what:<50} loss {max(rel['loss']):.2e}, grad norm {max(rel['grad_norm']):.2e}, "
                  f"logit scale {max(rel['logit_scale']):.2e}", flush=True)
    figures = quality(args) if args.seeds > 0 else {}
    # The float64 figure is the parity check; float32 shows how far its rounding alone moves the curves.
    print(json.dumps({"max_loss_rel_diff": worst["float64"], "max_loss_rel_diff_fp32": worst["float32"], **figures,
                      "seeds": args.seeds, "model": args.model,  # the parity figures' model
                      "quality_model": args.quality_model if args.seeds > 0 else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
