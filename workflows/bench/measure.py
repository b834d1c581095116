"""How every benchmark measures: wall-clock time (best of N and median, the GPU drained before each reading)
and peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the heap in use on a CPU).

Peak memory on a CPU is the CPU's counterpart of the GPU figure: the peak of the heap bytes in use
(glibc's ``mallinfo2``: allocated and not yet freed), sampled every few milliseconds on a background thread,
above a baseline taken before the measured work. It counts weights, gradients, optimizer state and
activations. Resident memory would also count freed blocks that glibc keeps for reuse (up to 0.5 GB of the
last training step's activations in ``nvila bench peft``), and forcing glibc to return them (a fixed mmap
threshold) slows every step by page faults; so resident memory is only the fallback where glibc is not
the allocator, and :data:`MEMORY_GAUGE` says which one a report used.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


def on_gpu(device: str | torch.device | None = None) -> bool:
    """Whether timings must wait for CUDA: the device is a CUDA one, or (no device given) CUDA is in use."""
    if device is None:
        return torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (nothing to wait for on a CPU)."""
    if on_gpu(device):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds of several runs of the same work. ``best`` is the figure to quote on a shared machine (other
    processes only ever add time, as ``timeit`` advises); ``median`` shows how noisy the runs were."""

    samples: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)


class Stopwatch:
    """``with Stopwatch(device) as watch: work()`` then ``watch.seconds``; the GPU is drained at both ends."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
              device: str | torch.device | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times, each timed on its own."""
    return time_interleaved({"fn": fn}, repeats, warmup, device)["fn"]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                     device: str | torch.device | None = None) -> dict[str, Timing]:
    """Time several pieces of work round by round (a, b, a, b, ...), so that noise from other processes
    hits all of them alike; the first ``warmup`` rounds are dropped."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            with Stopwatch(device) as watch:
                fn()
            if round_index >= warmup:
                samples[name].append(watch.seconds)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _glibc_mallinfo2()
MEMORY_GAUGE = "heap in use (glibc mallinfo2)" if _MALLINFO2 else "resident memory"
"""What peak memory means on this machine's CPU."""


def memory_gauge(device: str | torch.device | None = None) -> str:
    """The name of what :class:`PeakMemory` reads on ``device``."""
    return "torch.cuda.max_memory_allocated" if on_gpu(device) else MEMORY_GAUGE


def cpu_memory_mb() -> float:
    """Heap bytes in use (allocated and not yet freed) by this process; resident memory without glibc."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return (info.uordblks + info.hblkhd) / 2**20  # in the heaps' chunks + in mmapped chunks
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (for the resident-memory fallback, which counts it)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: resident memory may overstate a little
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory (MB) during a ``with`` block.

    On a GPU: ``torch.cuda.max_memory_allocated`` (reset on entry), everything allocated on the GPU. On a
    CPU: the largest :func:`cpu_memory_mb` seen by a sampling thread, minus ``since`` (a reading taken
    before the measured work began, e.g. before the model was built; by default, on entry).
    """

    def __init__(self, device: str | torch.device | None = None, since: float | None = None,
                 interval: float = 0.002) -> None:
        self.device, self.interval, self.gpu = device, interval, on_gpu(device)
        self.since = cpu_memory_mb() if since is None else since
        self.peak_mb = 0.0
        self._highest = self.since
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._highest = max(self._highest, cpu_memory_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._highest = max(self.since, cpu_memory_mb())
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gpu:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._highest = max(self._highest, cpu_memory_mb())
        self.peak_mb = self._highest - self.since


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run a block with ``count`` torch intra-op threads (``None``: leave them as they are)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
