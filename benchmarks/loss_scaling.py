"""Memory and time of open_clip's losses against our tiled ones, as the batch grows.

    python benchmarks/loss_scaling.py                  # InfoNCE: open_clip ClipLoss vs infonce_tiled
    python benchmarks/loss_scaling.py --loss siglip    # SigLIP: open_clip SigLipLoss vs siglip_tiled
    python benchmarks/loss_scaling.py --device cuda --dtype bf16 --sizes 32768 131072 --large 524288

Rows: D=512 at every ``--sizes`` B (open_clip and ours), then ours alone at ``--large`` with
D=``--large-dim`` (128). Every measurement runs in a fresh child process, so its peak memory is
its own. Peak memory is the *extra* memory of one forward + backward on unit-norm (B, D) inputs:

  * CPU: the child's resident high-water mark after the step minus its resident memory just
    before it (``resident.ResidentPeak``: /proc/self/clear_refs resets the mark; ``ru_maxrss``
    would start from the parent's peak, which a child inherits), once the inputs exist and a tiny
    warm-up step (B=64) has loaded every library. The inputs are generated in row chunks so
    that making them leaves no high-water mark above the resident inputs (which would hide
    part of the step's memory). It counts everything the step touches: logits, softmax
    buffers, tiles, gradients of the inputs.
  * CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step.

Time is the wall time of that single step (after the warm-up). The children save loss and input
gradients; the parent reports the largest relative difference of ours against open_clip:
|loss - loss_ref| / |loss_ref| and max|g - g_ref| / max|g_ref| for both inputs, the logit scale
(and SigLIP's bias). Where open_clip's B x B buffers cannot fit in this machine's RAM it is
skipped (SigLipLoss keeps ~7 of them: 28 GB at B=32768). The last line is JSON with the figures
at ``--compare-at`` and ``--large``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resident import ResidentPeak  # noqa: E402  (benchmarks/: a block's own peak of resident memory)

LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation
RAM_MB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def make_inputs(batch: int, dim: int, device: str, dtype: torch.dtype, chunk: int = 4096):
    """Unit rows a, b (B, D) with b_i a noisy copy of a_i, made chunk by chunk (see docstring)."""
    gen = torch.Generator().manual_seed(batch * 1000 + dim)
    a = torch.empty(batch, dim, device=device, dtype=dtype)
    b = torch.empty(batch, dim, device=device, dtype=dtype)
    for start in range(0, batch, chunk):
        rows = min(chunk, batch - start)
        a_part = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
        b_part = F.normalize(a_part + torch.randn(rows, dim, generator=gen), dim=1)
        a[start:start + rows] = a_part.to(device=device, dtype=dtype)
        b[start:start + rows] = b_part.to(device=device, dtype=dtype)
    return a.requires_grad_(), b.requires_grad_()


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print one JSON line."""
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device.startswith("cuda")
    step = _step_with_bias(args.impl, args.loss, args.tile)
    scale_value = LOGIT_SCALE if args.loss == "infonce" else SIGLIP_SCALE
    for batch in (64, args.batch):  # warm-up (libraries, thread pools, kernels), then the run
        a, b = make_inputs(batch, args.dim, args.device, dtype)
        scale = torch.tensor(scale_value, device=args.device, requires_grad=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with ResidentPeak() as resident:
            start = time.perf_counter()
            loss, bias_grad = step(a, b, scale)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = resident.mb  # None where /proc/self/clear_refs cannot be written: no figure
    if args.save:  # safetensors: the parent reads tensors, never a pickle
        tensors = {"loss": loss.detach().float().cpu().reshape(1), "a": a.grad.float().cpu(),
                   "b": b.grad.float().cpu(), "scale": scale.grad.float().cpu().reshape(1)}
        if bias_grad is not None:
            tensors["bias"] = torch.as_tensor(bias_grad, dtype=torch.float32).reshape(1)
        save_file(tensors, args.save)
    print(json.dumps({"mb": None if peak_mb is None else round(peak_mb, 1), "s": round(seconds, 2),
                      "loss": float(loss)}))


def _step_with_bias(impl: str, loss: str, tile: int):
    """(a, b, scale) -> (loss, bias grad or None), forward + backward."""
    if loss == "infonce":
        if impl == "openclip":
            from open_clip.loss import ClipLoss

            clip = ClipLoss()
            fn = lambda a, b, s: clip(a, b, s)  # noqa: E731
        else:
            from align.losses import InfoNCETiled

            ours = InfoNCETiled(gather=False, tile_size=tile)
            fn = lambda a, b, s: ours(a, b, logit_scale=s)["loss"]  # noqa: E731

        def step(a, b, s):
            value = fn(a, b, s)
            value.backward()
            return value, None
        return step
    if impl == "openclip":
        from open_clip.loss import SigLipLoss

        siglip = SigLipLoss()

        def step(a, b, s):
            bias = torch.tensor(SIGLIP_BIAS, device=a.device, requires_grad=True)
            value = siglip(a, b, s, bias)
            value.backward()
            return value, bias.grad.float().cpu()
        return step
    from align.losses import SigLIPTiled

    ours = SigLIPTiled(gather=False, bias_init=SIGLIP_BIAS, tile_size=tile)

    def step(a, b, s):
        ours.zero_grad()
        ours.to(a.device)
        value = ours(a, b, logit_scale=s)["loss"]
        value.backward()
        return value, ours.logit_bias.grad.float().cpu()
    return step


def measure(impl: str, loss: str, batch: int, dim: int, args, save: Optional[str]) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--loss", loss,
               "--batch", str(batch), "--dim", str(dim), "--tile", str(args.tile),
               "--device", args.device, "--dtype", args.dtype]
    if save:
        command += ["--save", save]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_repo_root(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def max_rel_diff(ours_file: str, ref_file: str) -> float:
    ours, ref = load_file(ours_file), load_file(ref_file)
    diffs = [float((ours["loss"] - ref["loss"]).abs() / ref["loss"].abs())]
    for key in ("a", "b", "scale", "bias"):
        if ref.get(key) is not None:
            diffs.append(float((ours[key] - ref[key]).abs().max() / ref[key].abs().max()))
    return max(diffs)


def openclip_fits(loss: str, batch: int, args) -> bool:
    """Skip open_clip where its B x B buffers cannot fit in this machine's memory."""
    if args.device != "cpu":
        return True
    per_matrix_mb = batch * batch * 4 / 2**20
    matrices = 5 if loss == "infonce" else 7  # measured ~4.3 (ClipLoss); SigLipLoss keeps more
    return per_matrix_mb * matrices < 0.9 * RAM_MB


def run_loss(loss: str, args, rows: List[Dict], tmp: str) -> Dict:
    summary: Dict = {}
    for batch in args.sizes:
        ref_file, ours_file = (os.path.join(tmp, f"{who}-{loss}-{batch}.safetensors") for who in ("ref", "ours"))
        if openclip_fits(loss, batch, args):
            ref = measure("openclip", loss, batch, args.dim, args, ref_file)
        else:
            ref = {"error": f"skipped: B x B buffers exceed {RAM_MB / 1024:.0f} GB RAM"}
        ours = measure("ours", loss, batch, args.dim, args, ours_file)
        diff = max_rel_diff(ours_file, ref_file) if "error" not in ref and "error" not in ours else None
        rows.append({"loss": loss, "B": batch, "D": args.dim, "openclip": ref, "ours": ours, "diff": diff})
        _print_row(rows[-1])
        if batch == args.compare_at:
            summary.update(B=batch, openclip_mb=ref.get("mb"), ours_mb=ours.get("mb"), openclip_s=ref.get("s"),
                           ours_s=ours.get("s"), max_rel_diff=diff)
            if "error" in ref:
                summary["openclip_note"] = ref["error"]
    if args.large:
        large = measure("ours", loss, args.large, args.large_dim, args, None)
        rows.append({"loss": loss, "B": args.large, "D": args.large_dim, "openclip": {"error": "not run"},
                     "ours": large, "diff": None})
        _print_row(rows[-1])
        summary.update(B_large=args.large, ours_large_mb=large.get("mb"), ours_large_s=large.get("s"))
    return summary


def _print_targets(summary: Dict) -> None:
    """The brief's targets, checked (skipped where a figure is missing)."""
    checks = [
        ("ours_mb <= openclip_mb / 20", summary.get("ours_mb"), summary.get("openclip_mb"),
         lambda ours, ref: ours <= ref / 20),
        ("ours_s <= openclip_s", summary.get("ours_s"), summary.get("openclip_s"), lambda ours, ref: ours <= ref),
        ("max_rel_diff <= 1e-4", summary.get("max_rel_diff"), 1e-4, lambda value, bound: value <= bound),
        ("ours_large_mb <= 2048", summary.get("ours_large_mb"), 2048, lambda value, bound: value <= bound),
    ]
    for label, value, reference, ok in checks:
        verdict = "n/a" if value is None or reference is None else ("ok" if ok(value, reference) else "MISSED")
        print(f"target {label:<30} {verdict}")


def _cell(result: Dict) -> str:
    if "error" in result:
        return f"{result['error'][:38]:>38}"
    return f"{result['mb']:>12.1f} MB {result['s']:>9.2f} s"


def _print_row(row: Dict) -> None:
    diff = "-" if row["diff"] is None else f"{row['diff']:.2e}"
    print(f"{row['loss']:<8} {row['B']:>7} {row['D']:>4} | {_cell(row['openclip'])} | {_cell(row['ours'])} | {diff:>9}",
          flush=True)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="B at D=--dim (default 8192 32768; SigLIP adds 16384, the largest B at which "
                             "open_clip's SigLipLoss fits in 23 GB)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--compare-at", type=int, default=32768, help="B reported in the JSON line")
    parser.add_argument("--large", type=int, default=131072, help="B for ours alone (0: skip)")
    parser.add_argument("--large-dim", type=int, default=128)
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["openclip", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    if args.sizes is None:
        args.sizes = [8192, 32768] if args.loss == "infonce" else [8192, 16384, 32768]
    print(f"device {args.device}, {args.dtype}, tile {args.tile}, {torch.get_num_threads()} threads; "
          f"peak = extra memory of one forward+backward (see docstring)")
    print(f"{'loss':<8} {'B':>7} {'D':>4} | {'open_clip peak / time':>38} | {'ours (tiled) peak / time':>38} | max rel diff")
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_loss(args.loss, args, rows, tmp)
    _print_targets(summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
