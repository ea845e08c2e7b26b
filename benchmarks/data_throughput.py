"""Data-pipeline throughput: our shard loader beside open_clip's ``get_wds_dataset``, same shards.

Both read the same webdataset shards (written by ``align prep shards``, which adds ``.txt``
captions so open_clip's loader reads them too) with the same number of workers, batch size,
shuffle buffer, open_clip image transform (train mode: random resized crop) and open_clip
tokenizer, and nothing else runs (no model). Measured: samples per second over one epoch,
from the first batch to the last (worker start-up excluded, the shuffle-buffer fill included),
median of ``--rounds`` alternating runs; and, as a figure that other load on a shared machine
does not distort, CPU milliseconds per sample: user + system of the child process and its
dataloader workers, less what the child spent starting and importing before it built its loader
(``cpu_ms_per_sample``, what a long run pays per sample; ``cpu_ratio`` compares these), and with
that included (``..._with_imports``). The imports differ by environment, not by pipeline: with
``transformers`` installed, as our towers need, ``import open_clip`` alone costs about a second
more CPU than in the peer's bare venv.
Then ours again with audio decoding + resampling + cropping added (tri-modal shards).

    python benchmarks/data_throughput.py [--items 4000] [--workers 2] [--batch-size 64]
        [--image-size 224] [--model ViT-B-32] [--work DIR]

open_clip's loader runs in a subprocess: in this venv when it works with our webdataset, else
in ``benchmarks/.peer-venv`` (created on demand: ``pip install open_clip_torch pandas
'webdataset<=0.2.86' torch torchvision``). The last line is JSON:
``{"ours_sps", "openclip_sps", "ratio", "ours_audio_sps", "cpu_ms_per_sample", "cpu_ratio",
"cpu_ms_per_sample_with_imports", "cpu_ratio_with_imports", "import_cpu_s", ...}``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PEER_VENV = os.path.join(REPO, "benchmarks", ".peer-venv")
_WORKING_PEER: list = []  # the interpreter open_clip's loader worked with, once known

PEER_SCRIPT = r'''
import argparse, json, resource, sys, time
import open_clip
from open_clip_train.data import get_wds_dataset
usage = resource.getrusage(resource.RUSAGE_SELF)
import_cpu = usage.ru_utime + usage.ru_stime  # interpreter start and imports, before any loading
spec, items, workers, batch_size, image_size, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=items, val_num_samples=None,
                          dataset_resampled=False, seed=0, batch_size=batch_size, workers=workers, world_size=1,
                          train_data_upsampling_factors=None)
preprocess = open_clip.image_transform(image_size, is_train=True)
data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer(model))
samples, first = 0, None
for images, texts in data.dataloader:
    if first is None:
        first, first_n = time.perf_counter(), len(images)
    samples += len(images)
seconds = time.perf_counter() - first
print(json.dumps({"sps": (samples - first_n) / seconds, "samples": samples, "import_cpu": import_cpu}))
'''


class Tokenize:
    """Picklable: one text -> (L,) open_clip tokens (what open_clip's loader does per sample)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._tokenizer = None

    def __getstate__(self):
        return {"model": self.model, "_tokenizer": None}

    def __call__(self, text: str):
        import open_clip

        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.model)
        return self._tokenizer([text])[0]


def make_shards(work: str, items: int, workers: int) -> str:
    """A synthetic catalogue (64 px PNG images, 1 s of 16 kHz audio) -> shards; returns the spec."""
    import numpy as np
    import soundfile
    from PIL import Image

    from data_prep.shards import write_shards

    catalogue = os.path.join(work, "catalogue")
    manifest = os.path.join(catalogue, "manifest.csv")
    if not os.path.isfile(manifest):
        os.makedirs(os.path.join(catalogue, "media"), exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for i in range(items):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(f"{catalogue}/media/{i}.png")
            soundfile.write(f"{catalogue}/media/{i}.wav", rng.uniform(-0.3, 0.3, 16000).astype("float32"), 16000)
            rows.append({"id": f"item{i}", "title": f"a synthetic item number {i}", "description": "with a caption",
                         "image": f"media/{i}.png", "audio": f"media/{i}.wav"})
        with open(manifest, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    out = os.path.join(work, "shards")
    started = time.perf_counter()
    stats = write_shards(manifest, out, samples_per_shard=max(1, items // 8), workers=workers, clip_seconds=1.0)
    print(f"prep: {stats['written']} items in {stats['shards']} shards, {time.perf_counter() - started:.1f} s "
          f"({stats['shards_written_this_run']} shards written now)", flush=True)
    return os.path.join(out, "shards-{000000..%06d}.tar" % (stats["shards"] - 1))


def ours(spec: str, workers: int, batch_size: int, image_size: int, model: str, audio: bool) -> dict:
    import open_clip

    from align.data.audio_io import AudioPreprocessor
    from align.data.loader import build_loader
    from align.data.transforms import SampleProcessor

    usage = resource.getrusage(resource.RUSAGE_SELF)
    import_cpu = usage.ru_utime + usage.ru_stime  # interpreter start and imports, before any loading
    preprocessors = {"image": open_clip.image_transform(image_size, is_train=True), "text": Tokenize(model)}
    if audio:
        preprocessors["audio"] = AudioPreprocessor(sample_rate=16000, clip_seconds=1.0, crop="random")
    loader = build_loader(spec, SampleProcessor(preprocessors), batch_size=batch_size, num_workers=workers,
                          train=True, seed=0, shuffle_buffer=1000, drop_last=False)
    samples, first, first_n = 0, None, 0
    for batch in loader.iterate(0):
        if first is None:
            first, first_n = time.perf_counter(), len(batch["ids"])
        samples += len(batch["ids"])
    return {"sps": (samples - first_n) / (time.perf_counter() - first), "samples": samples, "import_cpu": import_cpu}


def _child_cpu(command: list) -> tuple:
    """Run a child; (its completed process, CPU seconds it and its workers used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _cpu_figures(result: dict, cpu: float) -> dict:
    """CPU ms per sample of a child's run: of the loading alone (all its CPU, its workers' too, less
    what the interpreter's start and imports took before the loader was built), and with them."""
    result["cpu_ms_per_sample"] = 1000 * (cpu - result["import_cpu"]) / result["samples"]
    result["cpu_ms_per_sample_with_imports"] = 1000 * cpu / result["samples"]
    return result


def ours_child(spec: str, items: int, workers: int, batch_size: int, image_size: int, model: str,
               audio: bool) -> dict:
    argv = ["--child", spec, str(workers), str(batch_size), str(image_size), model, str(int(audio))]
    done, cpu = _child_cpu([sys.executable, os.path.abspath(__file__), *argv])
    if done.returncode != 0:
        raise RuntimeError(f"our loader failed:\n{done.stderr[-3000:]}")
    return _cpu_figures(json.loads(done.stdout.strip().splitlines()[-1]), cpu)


def peer(spec: str, items: int, workers: int, batch_size: int, image_size: int, model: str) -> dict:
    argv = [spec, str(items), str(workers), str(batch_size), str(image_size), model]
    peer_python = os.path.join(PEER_VENV, "bin", "python")
    for python in _WORKING_PEER or [sys.executable, peer_python]:
        if python == peer_python and not os.path.exists(peer_python):
            print("open_clip's loader failed here; building benchmarks/.peer-venv", flush=True)
            subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
            subprocess.run([peer_python, "-m", "pip", "install", "-q", "open_clip_torch", "pandas",
                            "webdataset<=0.2.86", "torch", "torchvision"], check=True)
        done, cpu = _child_cpu([python, "-c", PEER_SCRIPT, *argv])
        if done.returncode == 0:
            result = _cpu_figures(json.loads(done.stdout.strip().splitlines()[-1]), cpu)
            result["python"] = "this venv" if python == sys.executable else ".peer-venv"
            _WORKING_PEER[:] = [python]
            return result
        print(f"open_clip's loader failed with {python}:\n{done.stderr[-2000:]}", flush=True)
    raise RuntimeError("open_clip's get_wds_dataset could not run")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":  # one measurement of ours, in its own process
        spec, workers, batch_size, image_size, model, audio = argv[1:7]
        print(json.dumps(ours(spec, int(workers), int(batch_size), int(image_size), model, bool(int(audio)))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="open_clip transform output side")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip tokenizer of this model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating repetitions; medians reported")
    parser.add_argument("--work", help="folder for the catalogue and shards (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="align-throughput-")
    spec = make_shards(work, args.items, args.workers)
    common = dict(workers=args.workers, batch_size=args.batch_size, image_size=args.image_size, model=args.model)
    # Rounds alternate the pipelines so that load from other processes on a shared machine
    # hits both alike; the medians are reported.
    runs = {"ours": [], "openclip": [], "ours_audio": []}
    python = None
    for round_ in range(args.rounds):
        results = {"ours": ours_child(spec, args.items, audio=False, **common)}
        results["openclip"] = peer(spec, args.items, **common)
        results["ours_audio"] = ours_child(spec, args.items, audio=True, **common)
        python = results["openclip"]["python"]
        for name, result in results.items():
            runs[name].append(result)
        print(f"round {round_ + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{name} {r['sps']:.1f} samples/s, {r['cpu_ms_per_sample']:.2f} CPU ms/sample"
            for name, r in results.items()), flush=True)
    sps = {k: statistics.median(r["sps"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_ms_per_sample"] for r in v) for k, v in runs.items()}
    with_imports = {k: statistics.median(r["cpu_ms_per_sample_with_imports"] for r in v) for k, v in runs.items()}
    print(json.dumps({"ours_sps": round(sps["ours"], 1), "openclip_sps": round(sps["openclip"], 1),
                      "ratio": round(sps["ours"] / sps["openclip"], 3), "ours_audio_sps": round(sps["ours_audio"], 1),
                      "cpu_ms_per_sample": {k: round(v, 2) for k, v in cpu.items()},
                      "cpu_ratio": round(cpu["openclip"] / cpu["ours"], 3),
                      "cpu_ms_per_sample_with_imports": {k: round(v, 2) for k, v in with_imports.items()},
                      "cpu_ratio_with_imports": round(with_imports["openclip"] / with_imports["ours"], 3),
                      "import_cpu_s": {k: round(statistics.median(r["import_cpu"] for r in v), 2)
                                       for k, v in runs.items()},
                      "items": args.items,
                      "workers": args.workers, "batch_size": args.batch_size, "image_size": args.image_size,
                      "rounds": args.rounds, "peer_python": python}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
