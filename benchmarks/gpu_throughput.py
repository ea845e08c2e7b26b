"""One GPU kept busy? Our trainer beside open_clip's on the same device, in three parts.

(a) **Model step** on synthetic tensors already on the device: images at the model's input size,
    texts filling the whole context (no padding to skip). Ours is the trainer's own step
    (``align.train.recipe.prepare_training`` + ``optimizer_step``, the model built from our config
    with open_clip towers of the same model config); open_clip's is its model + ``open_clip.loss.ClipLoss`` +
    AdamW (open_clip_train's parameter groups and logit-scale clamp), forward, backward, step.
    Both under the same mixed precision. MFU = samples/s x FLOPs per sample / peak, with ONE
    nominal FLOP count for both: ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
    backward of open_clip's step, divided by the batch.
(b) **End to end**: the demo catalogue (``align prep demo``) rendered at the model's image size;
    ``open_clip_train`` and our trainer from the same CSV, and ours again from webdataset shards
    of JPEGs (``align prep shards``), once as configured and once with ``data.image_pipeline:
    device`` + ``data.image_decode: device`` (the workers check each JPEG and draw its crop; the
    tower decodes the batch with nvJPEG, crops and resizes on the GPU). The runs and their
    samples/s are those of benchmarks/peer_openclip.py (its helpers are imported): steady state
    after ``skip_steps``.
(c) **Loss** forward + backward on unit (B, D) inputs: ours (``infonce_tiled``; on CUDA with
    ALIGN_TILED_BACKEND=auto unless set, i.e. the fused Triton kernels), open_clip's ``ClipLoss``,
    and plain matmuls of the least FLOPs an InfoNCE forward + backward needs (logits a b^T, then
    G b and G^T a: three GEMMs, 6 B^2 D FLOPs; ClipLoss computes the logits twice, a b^T and
    b a^T, so it does 12 B^2 D, and ours, which recomputes tiles in the backward, 8 B^2 D). Each measurement runs in its own child process (inputs from
    benchmarks/loss_scaling.py): a warm-up at a small B with the same D (Triton compiles), then
    one call at B whose extra peak memory is reported (CUDA: ``torch.cuda.max_memory_allocated``
    minus the allocated bytes before it; CPU: the growth of the child's resident high-water mark
    over that call, VmHWM after it minus VmRSS before it, reset through /proc/self/clear_refs),
    then ``loss_reps`` more calls whose median time is reported (the first call's time if none).

    python benchmarks/gpu_throughput.py [--size full|tiny] [--quick] [--work DIR] [--peak-tflops X]
        [--model NAME_OR_JSON] [--batch-size B]

Sizes: ``full`` (the default on CUDA) is open_clip's ViT-B-32 in bf16 at B = 1024, the demo
catalogue at 224 px (8192 items, 3 epochs), the loss at B = 32768 and 65536 (D = 512) and
1,048,576 (D = 128): it is meant to finish in under 6 minutes on one H100/H200. ``tiny`` (the
default on CPU, what the test runs) is configs/models/tiny-clip.json in fp32 at B = 32, a few
steps, 256 items, the loss at B = 1024/2048 and 8192 (D = 128). ``--quick`` trims tiny further
(fewer steps, 128 items, the loss at B = 1024 (D = 512) and 2048 (D = 128) only).

Peak for MFU: dense bf16 tensor-core TFLOP/s of the GPU by name (H100/H200 SXM: 989); on CPU a
nominal 96 GFLOP/s per thread (fp32 AVX2: 2 FMA units x 8 lanes x 2 FLOPs x 3 GHz), stated in the
output; ``--peak-tflops`` overrides both. An unknown GPU without ``--peak-tflops`` gives MFU null.

The last line is JSON with exactly the keys of ``JSON_KEYS``; at tiny size they keep their names
(``*_65536`` is the largest D=512 loss batch, ``*_1m`` the large D=128 one; the printed table
names the sizes). ``loss_mb_65536`` is megabytes (null on a CPU machine where
/proc/self/clear_refs cannot be written, see ``ResidentPeak``); ``ours_e2e_sps`` is ours from the
CSV (the data open_clip reads; the shards figure is printed above it) and ``e2e_over_step`` that
over our model step on the same titles (``step_on_e2e_texts``: our text tower skips padding, so
(a)'s full-context step would be more work a sample than the end-to-end run's).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import loss_scaling  # noqa: E402  (benchmarks/: inputs and the two losses' steps)
import peer_openclip  # noqa: E402  (benchmarks/: both trainers run on one CSV, their samples/s)
from resident import ResidentPeak  # noqa: E402  (benchmarks/: a block's own peak of resident memory)

TINY_CLIP = os.path.join(REPO, "configs", "models", "tiny-clip.json")
JSON_KEYS = ("ours_step_sps", "openclip_step_sps", "ours_mfu", "ours_e2e_sps", "openclip_e2e_sps",
             "e2e_over_step", "loss_s_65536", "openclip_loss_s_65536", "matmul_s_65536", "loss_mb_65536",
             "loss_s_1m")
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a piece of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0),
                   ("L40S", 362.0), ("A10", 125.0))
CPU_PEAK_PER_THREAD = 2 * 8 * 2 * 3e9  # fp32 AVX2: 2 FMA units x 8 lanes x 2 FLOPs x 3 GHz, nominal
# The shards once more with JPEGs decoded on the device (align/towers/image_ops.py); on CPU the same path runs
DEVICE_DECODE = ("data.image_pipeline=device", "data.image_decode=device")


@dataclasses.dataclass(frozen=True)
class Size:
    """Everything that differs between a GPU run and the CPU check of the same code."""

    model: str  # open_clip name or JSON config, for both models and both trainers
    precision: str  # "bf16" (autocast, both trainers' mixed precision) or "fp32"
    batch: int  # the model step's and both trainers' batch
    warmup_steps: int
    timed_steps: int
    items: int  # demo catalogue training items (end to end)
    epochs: int
    workers: int
    skip_steps: int  # trainer steps left out of the end-to-end samples/s
    loss_batches: tuple  # B at D = loss_dim; the last is the JSON's *_65536 figure
    loss_dim: int
    large_batch: int  # B at D = large_dim, ours alone: the JSON's loss_s_1m
    large_dim: int
    loss_reps: int  # timed calls after the first at each loss batch (0 at the large one)


FULL = Size(model="ViT-B-32", precision="bf16", batch=1024, warmup_steps=5, timed_steps=20, items=8192, epochs=3,
            workers=max(1, min(14, (os.cpu_count() or 2) - 2)), skip_steps=5, loss_batches=(32768, 65536),
            loss_dim=512, large_batch=1048576, large_dim=128, loss_reps=3)
TINY = Size(model=TINY_CLIP, precision="fp32", batch=32, warmup_steps=2, timed_steps=5, items=256, epochs=1,
            workers=1, skip_steps=2, loss_batches=(1024, 2048), loss_dim=512, large_batch=8192, large_dim=128,
            loss_reps=2)
QUICK = dataclasses.replace(TINY, warmup_steps=1, timed_steps=3, items=128, loss_batches=(1024,), large_batch=2048,
                            loss_reps=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> tuple:
    """(FLOP/s or None, how it was chosen)."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for piece, tflops in GPU_PEAK_TFLOPS:
            if piece in name:
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16"
        return None, f"{name}: peak unknown, MFU null (pass --peak-tflops)"
    threads = torch.get_num_threads()
    return threads * CPU_PEAK_PER_THREAD, (f"CPU, nominal {CPU_PEAK_PER_THREAD / 1e9:.0f} GFLOP/s x {threads} "
                                           "threads (fp32 AVX2 FMA at 3 GHz)")


# ---------------------------------------------------------------- (a) the model step alone
def synthetic_inputs(name: str, batch: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """uint8 images at the model's input size and tokens filling the whole context, on ``device``.

    Every token is a word (no padding, so a tower that skips padding gains nothing), the last is
    open_clip's end-of-text id, the largest of the vocabulary, where its text tower pools.
    """
    import open_clip

    config = open_clip.get_model_config(name)
    side = config["vision_cfg"]["image_size"]
    context = config["text_cfg"].get("context_length", 77)
    vocab = config["text_cfg"].get("vocab_size", 49408)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(1, vocab - 2, (batch, context), generator=generator)  # (B, L)
    tokens[:, 0], tokens[:, -1] = vocab - 2, vocab - 1  # start and end of text
    return {"image": images.to(device), "text": tokens.to(device)}


def our_step(size: Size, inputs: Dict[str, torch.Tensor], out_dir: str) -> Callable[[], None]:
    """The trainer's step on a fixed batch, our model built from our config (open_clip towers)."""
    from align.config import load_config
    from align.model import build_model
    from align.objective import ContrastiveObjective, build_pair_losses
    from align.train.recipe import make_accelerator, optimizer_step, prepare_training

    config = load_config(None, [
        f"model.embed_dim={peer_openclip.embed_dim_of(size.model)}",
        "model.towers.image.type=open_clip_image", f"model.towers.image.model={size.model}",
        "model.towers.text.type=open_clip_text", f"model.towers.text.model={size.model}",
        "data.train=unused.csv", f"data.batch_size={size.batch}", "optim.lr=1e-4", "optim.weight_decay=0.1",
        "optim.warmup_steps=1", "optim.grad_clip=0",  # as open_clip_train and peer_openclip's runs
        f"train.mixed_precision={'bf16' if size.precision == 'bf16' else 'no'}", f"train.output_dir={out_dir}",
        "train.wandb=disabled", "train.progress=false",
    ])
    accelerator = make_accelerator(config)
    model = build_model(config.model)
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, config.loss),
                                     matryoshka=config.loss.matryoshka)
    steps = size.warmup_steps + size.timed_steps
    objective, optimizer, scheduler = prepare_training(accelerator, objective, config, total_steps=steps)
    objective.train()
    batch = size.batch
    ones = torch.ones(batch, dtype=torch.bool, device=accelerator.device)
    batch_dict = {"ids": [str(i) for i in range(batch)], "inputs": inputs,
                  "masks": {"image": ones, "text": ones.clone()},
                  "groups": torch.full((batch,), -1, dtype=torch.long, device=accelerator.device)}

    def step() -> None:
        optimizer_step(accelerator, objective, optimizer, [batch_dict], config)
        scheduler.step()
    return step


def openclip_parts(name: str, inputs: Dict[str, torch.Tensor], device: torch.device):
    """(model, ClipLoss, AdamW, normalised pixels): open_clip_train's choices for one step."""
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.create_model(name, output_dict=True).to(device).train()
    # open_clip_train.main: no weight decay on gains, biases, norms and the logit scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1}],
                                  lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    pixels = (inputs["image"].float() / 255 - mean) / std  # (B, 3, H, W): what its loader delivers
    return model, ClipLoss(), optimizer, pixels


def openclip_step(parts, tokens: torch.Tensor, precision: str) -> Callable[[], None]:
    model, loss, optimizer, pixels = parts
    autocast = torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            out = model(pixels, tokens)
            total = loss(out["image_features"], out["text_features"], out["logit_scale"])
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # open_clip_train clamps after every step
            model.logit_scale.clamp_(0, math.log(100))
    return step


def flops_per_sample(parts, tokens: torch.Tensor, precision: str) -> float:
    """FLOPs of one training sample: FlopCounterMode over open_clip's forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    model, loss, optimizer, pixels = parts
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(pixels, tokens)
            total = loss(out["image_features"], out["text_features"], out["logit_scale"])
        total.backward()
    optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(tokens)


def samples_per_second(step: Callable[[], None], size: Size, device: torch.device) -> float:
    for _ in range(size.warmup_steps):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(size.timed_steps):
        step()
    synchronize(device)
    return size.timed_steps * size.batch / (time.perf_counter() - started)


def model_step(size: Size, device: torch.device, work: str) -> dict:
    name = peer_openclip.register_model(size.model)
    inputs = synthetic_inputs(name, size.batch, device)
    torch.manual_seed(0)
    parts = openclip_parts(name, inputs, device)
    flops = flops_per_sample(parts, inputs["text"], size.precision)
    openclip_sps = samples_per_second(openclip_step(parts, inputs["text"], size.precision), size, device)
    memory_openclip = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del parts
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    ours_sps = samples_per_second(our_step(size, inputs, os.path.join(work, "step-run")), size, device)
    memory_ours = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    free_memory(device)
    return {"flops_per_sample": flops, "ours_sps": ours_sps, "openclip_sps": openclip_sps,
            "ours_gib": memory_ours, "openclip_gib": memory_openclip}


def step_on_e2e_texts(size: Size, device: torch.device, work: str, manifest: str) -> float:
    """Our model step's samples/s on synthetic images and the end-to-end run's own texts (the
    demo titles of ``manifest``, tokenized): the denominator of ``e2e_over_step``. Our text tower
    skips the padding after a batch's longest text, so on short titles a sample costs it less
    than on (a)'s full-context texts (open_clip's tower encodes every position either way); the
    ratio must compare the same work."""
    import open_clip

    name = peer_openclip.register_model(size.model)
    with open(manifest, newline="", encoding="utf-8") as handle:
        titles = [row["title"] for row in csv.DictReader(handle)]
    titles = (titles * -(-size.batch // len(titles)))[:size.batch]
    inputs = synthetic_inputs(name, size.batch, device)
    inputs["text"] = open_clip.get_tokenizer(name)(titles).to(device)  # (B, context), zero-padded
    torch.manual_seed(0)
    sps = samples_per_second(our_step(size, inputs, os.path.join(work, "step-run-titles")), size, device)
    free_memory(device)
    return sps


# ---------------------------------------------------------------- (b) end to end
def prepare_data(size: Size, work: str) -> dict:
    """The demo catalogue at the model's image size -> open_clip's TSV, our manifest, JPEG shards."""
    import open_clip

    from data_prep.demo import main as prep_demo
    from data_prep.shards import main as prep_shards

    name = peer_openclip.register_model(size.model)
    side = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    demo = os.path.join(work, "demo")
    started = time.perf_counter()
    # No test split and short audio: neither trainer reads them here.
    prep_demo(["--out", demo, "--image-size", str(side), "--n-train", str(size.items), "--n-test", "0",
               "--clip-seconds", "0.1", "--workers", str(size.workers)])
    train_tsv, manifest = os.path.join(work, "train.tsv"), os.path.join(work, "train_manifest.csv")
    rows = peer_openclip.write_pairs_csv(os.path.join(demo, "train.csv"), train_tsv)
    peer_openclip.write_manifest(train_tsv, manifest)
    shards = os.path.join(work, "shards")
    per_shard = max(1, -(-rows // (2 * size.workers)))  # two shards a loader worker
    prep_shards([manifest, "--out", shards, "--image-format", "jpg", "--image-max-side", str(side),
                 "--samples-per-shard", str(per_shard), "--workers", str(size.workers), "--col-text", "title"])
    count = len([n for n in os.listdir(shards) if n.endswith(".tar")])
    print(f"data: {rows} items at {side} px, {count} JPEG shards, {time.perf_counter() - started:.0f} s", flush=True)
    spec = os.path.join(shards, "shards-{000000..%06d}.tar" % (count - 1))
    return {"tsv": train_tsv, "manifest": manifest, "shards": spec, "rows": rows, "side": side}


def end_to_end(size: Size, device: torch.device, work: str) -> dict:
    data = prepare_data(size, work)
    args = peer_openclip.parse([
        "--model", size.model, "--epochs", str(size.epochs), "--batch-size", str(size.batch),
        "--workers", str(size.workers), "--skip-steps", str(size.skip_steps), "--warmup", "1", "--lr", "1e-4",
        "--device", device.type, "--precision", size.precision, "--repeats", "1"])
    results = {}
    for label, run in (("ours_csv", lambda: peer_openclip.run_ours(args, data["manifest"], work)),
                       ("openclip", lambda: peer_openclip.run_openclip(args, data["tsv"], work)),
                       ("ours_shards", lambda: peer_openclip.run_ours(args, data["shards"], work)),
                       ("ours_shards_device_decode",
                        lambda: peer_openclip.run_ours(args, data["shards"], work, extra=DEVICE_DECODE))):
        results[label] = run()
        print(f"end to end {label:<25} {results[label]['sps']:10.1f} samples/s ({results[label]['steps']} steps, "
              f"{results[label]['wall_s']:.0f} s wall)", flush=True)
    results["side"], results["manifest"] = data["side"], data["manifest"]
    return results


# ---------------------------------------------------------------- (c) the loss
def loss_child(impl: str, batch: int, dim: int, dtype_name: str, reps: int, tile: int) -> dict:
    """One measurement (this process's own): see the module docstring, part (c)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if impl == "matmul":
        def step(a, b, scale):
            with torch.no_grad():  # the three GEMMs of ClipLoss: logits, then G b and G^T a
                logits = a @ b.T  # (B, B)
                return logits @ b, logits.T @ a  # (B, D), (B, D)
    else:  # (a, b, scale) -> forward + backward of open_clip's ClipLoss or our InfoNCETiled
        step = loss_scaling._step_with_bias(impl, "infonce", tile)
    backend = None
    # A small warm-up loads the libraries and compiles the kernels (their blocks depend on D,
    # not B); then the call at B whose memory is measured.
    for warm in (min(batch, 64), batch):
        a, b = loss_scaling.make_inputs(warm, dim, device, dtype)
        scale = torch.tensor(loss_scaling.LOGIT_SCALE, device=device, requires_grad=True)
        if impl == "ours":
            from align.losses.tiled import tiled_backend

            backend = tiled_backend(a)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with ResidentPeak() if device == "cpu" else contextlib.nullcontext() as resident:
            started = time.perf_counter()
            step(a, b, scale)
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - started
    megabytes = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else resident.mb
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step(a, b, scale)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"s": statistics.median(times) if times else first, "first_s": first, "mb": megabytes,
            "backend": backend, "device": device}


def measure_loss(impl: str, batch: int, dim: int, dtype_name: str, reps: int) -> dict:
    from align.losses.tiled import DEFAULT_TILE

    command = [sys.executable, os.path.abspath(__file__), "--loss-child", impl, str(batch), str(dim), dtype_name,
               str(reps), str(DEFAULT_TILE)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loss measurement {impl} B={batch} D={dim} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss_part(size: Size, device: torch.device) -> dict:
    dtype_name = "bf16" if size.precision == "bf16" else "fp32"
    rows = []
    for batch in size.loss_batches:
        row = {"B": batch, "D": size.loss_dim}
        for impl in ("ours", "openclip", "matmul"):
            row[impl] = measure_loss(impl, batch, size.loss_dim, dtype_name, size.loss_reps)
        rows.append(row)
        print_loss_row(row)
    large = {"B": size.large_batch, "D": size.large_dim, "ours": measure_loss("ours", size.large_batch, size.large_dim,
                                                                             dtype_name, 0)}
    print_loss_row(large)
    return {"rows": rows, "large": large}


def _mb(value: Optional[float]) -> str:
    return f"{'n/a':>9} MB" if value is None else f"{value:9.1f} MB"


def print_loss_row(row: dict) -> None:
    cells = []
    for impl in ("ours", "openclip", "matmul"):
        result = row.get(impl)
        cells.append(f"{'-':>22}" if result is None else f"{result['s']:9.4f} s {_mb(result['mb'])}")
    gemm_tflops = 6 * row["B"] ** 2 * row["D"] / row["ours"]["s"] / 1e12  # the least InfoNCE's GEMMs need
    print(f"loss B={row['B']:>8} D={row['D']:>4} | " + " | ".join(cells)
          + f" | ours {gemm_tflops:.3g} TFLOP/s of 6 B^2 D ({row['ours']['backend']} kernels)", flush=True)


# ---------------------------------------------------------------- the report
def _rounded(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def summarise(step: dict, e2e: dict, loss: dict, peak: Optional[float]) -> dict:
    compare = loss["rows"][-1]
    ours_mfu = step["ours_sps"] * step["flops_per_sample"] / peak if peak else None
    figures = {
        "ours_step_sps": round(step["ours_sps"], 2), "openclip_step_sps": round(step["openclip_sps"], 2),
        "ours_mfu": _rounded(ours_mfu, 5),
        "ours_e2e_sps": round(e2e["ours_csv"]["sps"], 2), "openclip_e2e_sps": round(e2e["openclip"]["sps"], 2),
        "e2e_over_step": round(e2e["ours_csv"]["sps"] / step["ours_sps_e2e_texts"], 4),  # the same texts
        "loss_s_65536": round(compare["ours"]["s"], 5), "openclip_loss_s_65536": round(compare["openclip"]["s"], 5),
        "matmul_s_65536": round(compare["matmul"]["s"], 5), "loss_mb_65536": _rounded(compare["ours"]["mb"], 1),
        "loss_s_1m": round(loss["large"]["ours"]["s"], 5),
    }
    assert tuple(figures) == JSON_KEYS, "the JSON line's keys are agreed (issue 16): change both or neither"
    return figures


def print_table(size: Size, size_name: str, step: dict, e2e: dict, loss: dict, peak: Optional[float],
                peak_note: str) -> None:
    mfu = lambda sps: f"{100 * sps * step['flops_per_sample'] / peak:.1f}%" if peak else "n/a"  # noqa: E731
    compare = loss["rows"][-1]
    print(f"\n== {size_name}: {size.model}, {size.precision}, batch {size.batch}; peak {peak_note}")
    print(f"FLOPs per training sample (FlopCounterMode, open_clip's step): {step['flops_per_sample'] / 1e9:.3f} GFLOP")
    print(f"{'':34} {'ours':>14} {'open_clip':>14}")
    print(f"{'(a) model step, samples/s':34} {step['ours_sps']:14.1f} {step['openclip_sps']:14.1f}")
    print(f"{'    MFU':34} {mfu(step['ours_sps']):>14} {mfu(step['openclip_sps']):>14}")
    if step["ours_gib"] is not None:
        print(f"{'    peak GPU memory, GiB':34} {step['ours_gib']:14.1f} {step['openclip_gib']:14.1f}")
    print(f"{'(b) end to end (CSV), samples/s':34} {e2e['ours_csv']['sps']:14.1f} {e2e['openclip']['sps']:14.1f}")
    print(f"{'    ours from JPEG shards':34} {e2e['ours_shards']['sps']:14.1f}")
    print(f"{'      JPEGs decoded on the device':34} {e2e['ours_shards_device_decode']['sps']:14.1f}")
    print(f"{'    model step on those titles':34} {step['ours_sps_e2e_texts']:14.1f} {'(= (a))':>14}")
    print(f"{'    end to end / model step':34} {e2e['ours_csv']['sps'] / step['ours_sps_e2e_texts']:14.3f} "
          f"{e2e['openclip']['sps'] / step['openclip_sps']:14.3f}")
    print(f"    ({size.items} demo items at {e2e['side']} px, {size.epochs} epoch(s), {size.workers} loader workers, "
          f"first {size.skip_steps} steps left out)")
    b, d = compare["B"], compare["D"]
    print(f"(c) loss fwd+bwd B={b} D={d}, s      {compare['ours']['s']:14.4f} {compare['openclip']['s']:14.4f}"
          f"   plain matmuls (6 B^2 D) {compare['matmul']['s']:.4f} s")
    print(f"    extra peak memory               {_mb(compare['ours']['mb']):>14} {_mb(compare['openclip']['mb']):>14}")
    large = loss["large"]
    print(f"    B={large['B']} D={large['D']}, ours {large['ours']['s']:.4f} s, {_mb(large['ours']['mb']).strip()}")
    print(f"    sizes: loss at B={list(size.loss_batches)} (D={size.loss_dim}) and B={size.large_batch} "
          f"(D={size.large_dim}); the JSON's *_65536 is B={b}, *_1m is B={large['B']}")


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], help="default: full on CUDA, tiny on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny, trimmed further (the test)")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--peak-tflops", type=float, help="peak for MFU instead of the device's")
    parser.add_argument("--model", help="open_clip name or JSON config instead of the size's (both sides)")
    parser.add_argument("--batch-size", type=int, help="model step and trainer batch instead of the size's")
    parser.add_argument("--loss-child", nargs=6, metavar=("IMPL", "B", "D", "DTYPE", "REPS", "TILE"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if args.loss_child:
        impl, batch, dim, dtype_name, reps, tile = args.loss_child
        print(json.dumps(loss_child(impl, int(batch), int(dim), dtype_name, int(reps), int(tile))))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # What open_clip_train.main sets (and our make_accelerator with train.tf32): both steps alike.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        os.environ.setdefault("ALIGN_TILED_BACKEND", "auto")  # the fused Triton kernels; children inherit it
    size_name = args.size or ("full" if device.type == "cuda" else "tiny")
    size = QUICK if args.quick else {"full": FULL, "tiny": TINY}[size_name]
    size_name = "quick" if args.quick else size_name
    size = dataclasses.replace(size, model=args.model or size.model, batch=args.batch_size or size.batch)
    work = args.work or tempfile.mkdtemp(prefix="gpu-throughput-")
    peak, peak_note = peak_flops(device, args.peak_tflops)
    started = time.perf_counter()
    print(f"device {device}, size {size_name}: {size}", flush=True)
    step = model_step(size, device, work)
    print(f"model step: ours {step['ours_sps']:.1f}, open_clip {step['openclip_sps']:.1f} samples/s "
          f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    loss = loss_part(size, device)
    print(f"loss done ({time.perf_counter() - started:.0f} s so far)", flush=True)
    e2e = end_to_end(size, device, work)
    step["ours_sps_e2e_texts"] = step_on_e2e_texts(size, device, work, e2e["manifest"])
    print_table(size, size_name, step, e2e, loss, peak, peak_note)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps(summarise(step, e2e, loss, peak)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
