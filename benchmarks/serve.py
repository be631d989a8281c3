"""`captionkit serve` with dynamic batching against one request at a time: requests/s, p50/p95.

Both runs start the same server (`python -m captionkit.serve`, a uvicorn subprocess) on the same
model and machine and load it with the same concurrent clients, each posting one real photo per
request (multipart, as curl does) and asking for exactly `--tokens` tokens (min = max new tokens).
Only `--max-batch-size` differs: 1 runs the requests one at a time, N lets the model worker gather
up to N waiting requests into one batch. Each run warms up first (WARMUP requests); captions are
checked to be the same in both runs (float32 batches are batch-invariant).

    python benchmarks/serve.py --out benchmarks/results/serve.json       # full-size BLIP-base
    python benchmarks/serve.py --quick --out /tmp/serve-quick.json       # tiny model, ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import images  # noqa: E402
import models  # noqa: E402

SRC = Path(__file__).resolve().parent.parent / "src"
WARMUP = 4
"""Requests sent (at once) before each measured run."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="blip-base", choices=sorted(models.FULL))
    parser.add_argument("--quick", action="store_true", help="the tiny test model instead")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="clients posting at once")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", default=str(common.DEFAULT_WORK))
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def photos(count: int = 8) -> list[tuple[str, bytes]]:
    """Real photos as JPEG files of their own size (what a client uploads)."""
    out = []
    for name, image in images.photos()[:count]:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=90)
        out.append((f"{name}.jpg", buffer.getvalue()))
    return out


@contextmanager
def server(model: Path, batch: int, args: argparse.Namespace, log: Path):
    """The server's URL while it runs in a subprocess."""
    command = [sys.executable, "-m", "captionkit.serve", "--model", str(model), "--port", "0",
               "--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(batch),
               "--max-wait-ms", str(args.max_wait_ms), "--queue-size", str(4 * args.concurrency),
               "--request-timeout", "3600"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("CAPTIONKIT_API_KEY", None)
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while not (found := re.search(r"Uvicorn running on (http://\S+:\d+)", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield found[1]
    finally:
        process.terminate()
        process.wait(60)


async def load(url: str, photos: list[tuple[str, bytes]], requests: int, concurrency: int,
               tokens: int) -> dict:
    """`requests` posts from `concurrency` clients; each request's latency and caption."""
    import httpx

    fields = {"max_new_tokens": str(tokens), "min_new_tokens": str(tokens)}
    latencies: list[float] = [0.0] * requests
    captions: list[str] = [""] * requests
    next_index = iter(range(requests))
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        before = _batches((await client.get("/metrics")).text)

        async def one_client() -> None:
            for index in next_index:
                name, data = photos[index % len(photos)]
                started = time.perf_counter()
                response = await client.post("/v1/caption", data=fields, files={"image": (name, data)})
                latencies[index] = time.perf_counter() - started
                response.raise_for_status()
                captions[index] = response.json()["results"][0]["caption"]

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        after = _batches((await client.get("/metrics")).text)
    ordered = sorted(latencies)
    images, batches = after[0] - before[0], after[1] - before[1]
    return {"requests": requests, "seconds": round(seconds, 3),
            "requests_per_second": round(requests / seconds, 4),
            "p50_s": round(statistics.median(ordered), 3),
            "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
            "mean_batch_images": round(images / batches, 2), "captions": captions}


def _batches(metrics: str) -> tuple[float, float]:
    """(images, batches) the caption worker has run so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        if family.name == "captionkit_batch_size":
            values = {s.name: s.value for s in family.samples if s.labels.get("model") == "caption"}
            return (values.get("captionkit_batch_size_sum", 0.0),
                    values.get("captionkit_batch_size_count", 0.0))
    return 0.0, 0.0


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    size = "tiny" if args.quick else "full"
    model = models.build(args.model, work / "models" / f"{args.model}-{size}", quick=args.quick)
    sample = photos()
    import torch

    result: dict = {"machine": common.machine(torch.device(args.device)), "settings": {
        "model": args.model, "architecture_of": models.FULL[args.model],
        "size": size, "requests": args.requests,
        "concurrency": args.concurrency, "tokens": args.tokens, "max_wait_ms": args.max_wait_ms,
        "device": args.device, "dtype": args.dtype, "photos": [name for name, _ in sample]}}
    runs = {}
    for label, batch in (("one_at_a_time", 1), ("dynamic_batching", args.max_batch_size)):
        work.mkdir(parents=True, exist_ok=True)
        with server(model, batch, args, work / f"serve-{label}.log") as url:
            asyncio.run(load(url, sample, WARMUP, WARMUP, args.tokens))
            runs[label] = asyncio.run(load(url, sample, args.requests, args.concurrency, args.tokens))
            runs[label]["max_batch_size"] = batch
        print(f"{label}: {runs[label]['requests_per_second']} requests/s, p50 {runs[label]['p50_s']} s, "
              f"p95 {runs[label]['p95_s']} s, mean batch {runs[label]['mean_batch_images']}", flush=True)
    one, batched = runs["one_at_a_time"], runs["dynamic_batching"]
    result["runs"] = runs
    result["summary"] = {
        "speedup_requests_per_second": round(one["seconds"] / batched["seconds"], 2),
        "p50_ratio": round(batched["p50_s"] / one["p50_s"], 2),
        "p95_ratio": round(batched["p95_s"] / one["p95_s"], 2),
        "identical_captions": batched["captions"] == one["captions"]}
    return result


def main() -> None:
    args = parse_args()
    result = run(args)
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
