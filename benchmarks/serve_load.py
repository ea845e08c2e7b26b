"""``align serve`` under load: the service over the demo index on 127.0.0.1, a bounded load (8
concurrent clients, text queries for --seconds, then image queries for --seconds): QPS, p50 and
p99 latency, errors; then a burst of malformed requests, all of which must be answered 4xx, and
the service must still answer afterwards.

The server is a subprocess started as a user would (``python -m align.cli serve``), once with
micro-batching (``--max-batch 32 --max-wait-ms 5``, the defaults) and, as the peer, once with
``--max-batch 1`` (every request its own forward: what a plain FastAPI endpoint calling the model
does). Queries are the demo catalogue's held-out titles and photos (data/demo/test.csv). Each
client sends its next request as soon as the last is answered (closed loop), so QPS is the
throughput of the machine shared by the server and the clients: on a 2-core machine they compete.
The batcher's mean batch size comes from the server's /healthz.

    make demo && python benchmarks/serve_load.py [--seconds 60] [--clients 8] [--index runs/demo/items]

The last line is JSON: {"text_qps", "text_p50_ms", "text_p99_ms", "image_qps", "image_p50_ms",
"image_p99_ms", "errors", "malformed_4xx", "malformed_total", "alive_after", "text_mean_batch",
"image_mean_batch", "peer": {the same figures with --max-batch 1}}.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def queries(catalogue: str) -> Tuple[List[str], List[Tuple[str, bytes]]]:
    """(the catalogue's titles, (file name, bytes) of its photos)."""
    folder = os.path.dirname(os.path.abspath(catalogue))
    with open(catalogue, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    titles = [row["title"] for row in rows if row.get("title")]
    images = []
    for row in rows:
        if row.get("image"):
            with open(os.path.join(folder, row["image"]), "rb") as handle:
                images.append((os.path.basename(row["image"]), handle.read()))
    return titles, images


class Server:
    """``python -m align.cli serve`` in a subprocess, stopped on exit."""

    def __init__(self, index: str, port: int, extra: List[str]) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve_load_{port}.log"), "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "align.cli", "serve", "--index", index,
                                         "--port", str(port), "--log-level", "warning", *extra],
                                        cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> Dict[str, Any]:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"align serve exited with {self.process.returncode}:\n{self.log.read()[-3000:]}")
            try:
                answer = httpx.get(f"{self.url}/healthz", timeout=5)
                if answer.status_code == 200:
                    return answer.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"align serve did not answer /healthz within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def percentile(values: List[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


async def load(url: str, kind: str, payloads: List[Any], seconds: float, clients: int) -> Dict[str, Any]:
    """``clients`` closed-loop clients sending ``payloads`` round robin for ``seconds``."""
    import httpx

    latencies: List[float] = []
    errors: List[str] = []
    counter = iter(range(10 ** 12))
    stop_at = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            payload = payloads[next(counter) % len(payloads)]
            start = time.perf_counter()
            try:
                if kind == "text":
                    answer = await http.post("/search", json={"text": payload, "k": 10})
                else:
                    answer = await http.post("/search", files={"image": payload}, data={"k": "10"})
                ok = answer.status_code == 200 and len(answer.json()["results"]) == 10
                if not ok:  # a failed answer is no served query: counted once, no latency
                    errors.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
            except httpx.HTTPError as error:
                errors.append(repr(error))
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return {"requests": len(latencies) + len(errors), "qps": len(latencies) / elapsed,
            "p50_ms": 1000 * percentile(latencies, 50) if latencies else float("nan"),
            "p99_ms": 1000 * percentile(latencies, 99) if latencies else float("nan"),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def malformed_requests(image: bytes) -> List[Dict[str, Any]]:
    """One of each kind of bad request the service must refuse with a 4xx."""
    return [
        {"content": b'{"text": "red", ', "headers": {"content-type": "application/json"}},
        {"json": ["not", "an", "object"]},
        {"json": {"text": ""}},
        {"json": {"text": "star", "k": 0}},
        {"json": {"text": "star", "k": 100000}},
        {"json": {"text": "star", "k": "ten"}},
        {"json": {"text": "star", "where": "scarf"}},
        {"json": {"query": "star"}},
        {"files": {"image": ("broken.png", image[: len(image) // 3])}},
        {"files": {"image": ("noise.png", os.urandom(2048))}},
        {"files": {"audio": ("noise.wav", b"RIFF\x00\x00\x00\x00WAVEjunk")}},
        {"files": {"video": ("clip.mp4", b"1234")}},
        {"files": {"image": ("p.png", image)}, "data": {"text": "star"}},
        {"files": {"image": ("huge.png", b"\x89PNG" + bytes(11 * 1024 * 1024))}},  # over the 10 MiB default
        {"content": b"\xff\xfe garbage", "headers": {"content-type": "text/plain"}},
    ]


async def malformed_burst(url: str, image: bytes, rounds: int, clients: int) -> Dict[str, Any]:
    """Every malformed request ``rounds`` times, ``clients`` at a time; then is the service alive?"""
    import httpx

    requests = malformed_requests(image) * rounds
    statuses: List[int] = []
    gate = asyncio.Semaphore(clients)

    async def send(http: httpx.AsyncClient, request: Dict[str, Any]) -> None:
        async with gate:
            try:
                statuses.append((await http.post("/search", **request)).status_code)
            except httpx.HTTPError:
                statuses.append(0)

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(send(http, request) for request in requests))
        health = await http.get("/healthz")
        good = await http.post("/search", json={"text": "small blue striped star", "k": 5})
    alive = health.status_code == 200 and good.status_code == 200 and len(good.json()["results"]) == 5
    return {"malformed_total": len(requests), "malformed_4xx": sum(400 <= s < 500 for s in statuses),
            "alive_after": alive}


def batching(before: Dict[str, Any], after: Dict[str, Any], modality: str) -> Optional[float]:
    """Mean rows a forward of ``modality`` between two /healthz answers."""
    old = before["batching"]["by_modality"].get(modality, {"forwards": 0, "rows": 0})
    new = after["batching"]["by_modality"].get(modality, {"forwards": 0, "rows": 0})
    forwards = new["forwards"] - old["forwards"]
    return (new["rows"] - old["rows"]) / forwards if forwards else None


def run_service(index: str, extra: List[str], titles: List[str], images: List[Tuple[str, bytes]],
                seconds: float, clients: int, burst_rounds: int) -> Dict[str, Any]:
    import httpx

    server = Server(index, free_port(), extra)
    try:
        started = time.perf_counter()
        server.wait_ready()
        ready_s = time.perf_counter() - started
        figures: Dict[str, Any] = {"ready_s": ready_s}
        for kind, payloads in (("text", titles), ("image", images)):
            before = httpx.get(f"{server.url}/healthz", timeout=30).json()
            result = asyncio.run(load(server.url, kind, payloads, seconds, clients))
            after = httpx.get(f"{server.url}/healthz", timeout=30).json()
            figures.update({f"{kind}_{name}": value for name, value in result.items()})
            figures[f"{kind}_mean_batch"] = batching(before, after, kind)
        figures.update(asyncio.run(malformed_burst(server.url, images[0][1], burst_rounds, clients)))
        figures["errors"] = figures["text_errors"] + figures["image_errors"]
        return figures
    finally:
        server.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=os.path.join(REPO, "runs", "demo", "items"),
                        help="an `align index` or `align embed` folder (default: the demo's items)")
    parser.add_argument("--catalogue", default=os.path.join(REPO, "data", "demo", "test.csv"),
                        help="the manifest whose titles and photos are the queries")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of text load, then of image load")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--burst-rounds", type=int, default=10, help="times each malformed request is sent")
    parser.add_argument("--no-peer", action="store_true", help="skip the --max-batch 1 run")
    args = parser.parse_args(argv)
    titles, images = queries(args.catalogue)
    print(f"{len(titles)} titles, {len(images)} photos from {args.catalogue}; index {args.index}; "
          f"{args.clients} clients, {args.seconds:g} s a phase; {os.cpu_count()} CPUs shared by server and clients",
          flush=True)
    runs = {"batched": run_service(args.index, ["--max-batch", "32", "--max-wait-ms", "5"], titles, images,
                                   args.seconds, args.clients, args.burst_rounds)}
    if not args.no_peer:
        runs["max-batch 1"] = run_service(args.index, ["--max-batch", "1"], titles, images, args.seconds,
                                          args.clients, args.burst_rounds)
    rows = [("text QPS", "text_qps", "{:.1f}"), ("text p50 ms", "text_p50_ms", "{:.1f}"),
            ("text p99 ms", "text_p99_ms", "{:.1f}"), ("text mean batch", "text_mean_batch", "{:.2f}"),
            ("image QPS", "image_qps", "{:.1f}"), ("image p50 ms", "image_p50_ms", "{:.1f}"),
            ("image p99 ms", "image_p99_ms", "{:.1f}"), ("image mean batch", "image_mean_batch", "{:.2f}"),
            ("errors under load", "errors", "{}"), ("malformed answered 4xx", "malformed_4xx", "{}"),
            ("malformed sent", "malformed_total", "{}"), ("alive after burst", "alive_after", "{}"),
            ("server ready s", "ready_s", "{:.1f}")]
    names = list(runs)
    print(f"{'':24}" + "".join(f"{name:>14}" for name in names))
    for label, key, spec in rows:
        print(f"{label:24}" + "".join(f"{(spec.format(runs[n][key]) if runs[n][key] is not None else '-'):>14}"
                                     for n in names))
    for name in names:
        for kind in ("text", "image"):
            if runs[name][f"{kind}_first_error"]:
                print(f"{name} {kind}: first error: {runs[name][f'{kind}_first_error']}")
    keys = ["text_qps", "text_p50_ms", "text_p99_ms", "image_qps", "image_p50_ms", "image_p99_ms", "errors",
            "malformed_4xx", "malformed_total", "alive_after", "text_mean_batch", "image_mean_batch"]

    def rounded(value: Any) -> Any:
        return round(value, 2) if isinstance(value, float) else value

    summary = {key: rounded(runs["batched"][key]) for key in keys}
    if "max-batch 1" in runs:
        summary["peer"] = {"max_batch": 1, **{key: rounded(runs["max-batch 1"][key]) for key in keys}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
