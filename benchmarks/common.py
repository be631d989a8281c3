"""What the benchmarks share: the machine's description and matmul peak, FLOP counts, memory."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

DEFAULT_WORK = Path(os.environ.get("CAPTIONKIT_BENCH_DIR", Path.home() / ".cache" / "captionkit-bench"))
GEMM_SIZE = 2048
GPU_GEMM_SIZE = 8192
"""A 2048 product takes ~20 us on an H100, too short to hide the launch: measure GPUs on 8192."""


def machine(device: torch.device) -> dict:
    """The hardware and software a result was measured on, and how busy the machine was."""
    import PIL
    import transformers

    from captionkit.device import cpu_has_fast_bf16, usable_cpus

    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "usable_cpus": usable_cpus(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_fast_bf16": cpu_has_fast_bf16(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "device": str(device), "load_average": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """The best GFLOP/s of a square GEMM in `dtype`, the ceiling any model in that dtype can reach.
    The size grows to GEMM_SIZE (GPU_GEMM_SIZE on CUDA) while a product stays under 0.1 s: a CPU
    without bf16 units takes a minute for one 2048 product in bf16."""
    limit = GPU_GEMM_SIZE if device.type == "cuda" else GEMM_SIZE
    size, took = 256, 0.0
    with torch.inference_mode():
        while True:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            a @ b  # warm-up
            started = time.perf_counter()
            a @ b
            synchronize(device)
            took = time.perf_counter() - started
            if size >= limit or took > 0.1:
                break
            size *= 2
        flops, best = 2 * size ** 3, 0.0
        deadline = time.perf_counter() + seconds
        while not best or time.perf_counter() < deadline:
            started = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, flops / (time.perf_counter() - started) / 1e9)
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(run) -> int:
    """FLOPs of the matrix multiplications (linear, bmm, conv, attention) that `run()` performs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        run()
    return counter.get_total_flops()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far.

    VmHWM, not ru_maxrss: Linux carries a parent's peak into ru_maxrss across fork and exec.
    """
    with open("/proc/self/status") as status:  # Linux, like rss_mb
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def save(result: dict, out: str | None) -> None:
    """Write a benchmark's result as JSON to `out` (its folder made), when one is given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
