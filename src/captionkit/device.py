"""Choose where a model runs and in which precision."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from pathlib import Path

import torch

from captionkit.errors import OptionError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
RECYCLED_BELOW = 16 << 20  # bytes: smaller freed blocks stay in the heap for reuse
KEPT_FREE_AT_TOP = 64 << 20  # bytes of free heap top kept before glibc trims it


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16); otherwise bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def usable_cpus() -> int:
    """The CPUs this process may run on: fewer than the machine's under `taskset` or a cpuset."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 2


def default_workers() -> int:
    """Decoding threads: the CPUs this process may run on, plus two to cover file reads, at most 8.

    Not the machine's core count: under `taskset` or a container's cpuset, threads for every core
    would only take turns on the allowed ones (torch sizes its own thread pool the same way).
    """
    return min(8, usable_cpus() + 2)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` means the first CUDA GPU, else Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise OptionError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: no CUDA GPU is visible to torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("--device mps: Apple's Metal backend is not available here")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the hardware runs it fast, fp16 on older GPUs, else float32."""
    if name != "auto":
        dtype = getattr(torch, name)
        if device.type == "cpu" and dtype is torch.float16:
            raise OptionError("--dtype float16 is not supported on the CPU: use bfloat16 or float32")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every linear layer for a dynamically quantized int8 one, in place (CPU, float32 model).

    Weights become int8 once; activations are quantized per call with a scale taken from the whole
    batch, so a caption can depend slightly on its batch-mates. On CPUs with VNNI or AMX int8 units
    BLIP-base generates ~1.6x faster than float32 (benchmarks/RESULTS.md).
    """
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:
        raise OptionError(f"--quantize int8 needs torch.ao.quantization, which torch {torch.__version__} "
                          "no longer has") from err
    with warnings.catch_warnings():
        # torch deprecates these kernels in favour of torchao, whose CPU path is slower than float32.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


@functools.lru_cache(maxsize=1)
def set_malloc_thresholds() -> bool:
    """Have glibc recycle freed blocks under 16 MiB and give bigger ones straight back to the OS.

    Memory fresh from the OS costs a page fault per 4 KiB on first touch, so recycling the blocks a
    model allocates and frees on every call is faster (with one-image vision passes, BLIP-base
    ~1.06x); giving batch-sized blocks (a batch's attention caches) back keeps peak RSS near what is
    live, which glibc's defaults do not: they raise the threshold after the first big free, and
    big blocks then fragment heaps that never shrink (benchmarks/RESULTS.md). True when applied;
    other C libraries are left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, RECYCLED_BELOW)
                    and libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_AT_TOP))
    except (OSError, AttributeError):  # musl and others have no libc.so.6 or no mallopt
        return False
