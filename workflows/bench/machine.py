"""The machine a report was measured on: CPU model and the instruction-set flags that decide speed (AVX2,
AVX-512, bf16 and AMX units), cores, memory, GPU, library versions. Every report carries it, so that a figure
is never quoted without the machine it came from."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_int8", "avx_vnni", "fma", "asimd", "sve", "bf16", "i8mm")
"""The CPU flags a report lists (x86 and Arm): the vector and matrix units torch's kernels choose between."""
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""Flags of CPUs with bf16 arithmetic in hardware (x86's AVX512-BF16 and AMX, Arm's BF16). Without any of
them torch emulates bf16 matmuls on a CPU, far slower than fp32 (docs/benchmarks.md, API notes section 4)."""
LIBRARIES = ("torch", "transformers", "lightning", "torchao", "nvila")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm) or the given text;
    empty where the file does not exist (macOS, Windows)."""
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def has_bf16_hardware(flags: set[str]) -> bool:
    """Whether the CPU computes bf16 in hardware (see :data:`BF16_FLAGS`)."""
    return any(flag in flags for flag in BF16_FLAGS)


def aten_runs_bf16_kernels() -> bool:
    """False where torch runs its AVX2 (or older) x86 kernels, which emulate bf16: an AVX2-only CPU, or
    ``ATEN_CPU_CAPABILITY=avx2`` on a newer one (there some bf16 kernels even refuse to run)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability not in ("AVX2", "NO AVX") and not (capability == "DEFAULT" and _x86())


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_computes_bf16() -> bool:
    """bf16 matmuls run in hardware here: the CPU has the units and torch runs the kernels that use them."""
    return has_bf16_hardware(cpu_flags()) and aten_runs_bf16_kernels()


def cpu_model(cpuinfo: str | None = None) -> str:
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib(meminfo: str | None = None) -> float | None:
    """Total memory in GiB (``MemTotal`` of ``/proc/meminfo``), None where unknown."""
    text = meminfo if meminfo is not None else _read("/proc/meminfo")
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> list[dict[str, Any]]:
    """Name, memory and compute capability of each visible CUDA GPU."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}"})
    return found


def describe_machine(cpuinfo: str | None = None, meminfo: str | None = None) -> dict[str, Any]:
    """Everything a report says about the machine, as plain JSON values."""
    flags = cpu_flags(cpuinfo)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(cpuinfo),
        "cpu_flags": [flag for flag in FLAGS_OF_NOTE if flag in flags],
        "bf16_hardware": has_bf16_hardware(flags) and (cpuinfo is not None or aten_runs_bf16_kernels()),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "memory_gib": memory_gib(meminfo),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
    }


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine as Markdown list items."""
    flags = ", ".join(machine["cpu_flags"]) or "none of note"
    bf16 = "yes" if machine["bf16_hardware"] else "no (bf16 matmuls are emulated, slower than fp32)"
    load = machine.get("load_average")
    gpu_text = "; ".join(f"{g['name']} ({g['memory_gib']} GiB, compute capability {g['capability']})"
                         for g in machine.get("gpus") or []) or "none"
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    memory = f"{machine['memory_gib']} GiB" if machine.get("memory_gib") else "unknown"
    return [
        f"- CPU: {machine['cpu']}; flags: {flags}; bf16 in hardware: {bf16}",
        f"- cores: {machine['cores']} ({machine['usable_cores']} usable by this process), torch threads: "
        f"{machine['torch_threads']}" + (f", load average (1/5/15 min): {' / '.join(map(str, load))}" if load else ""),
        f"- memory: {memory}",
        f"- GPU: {gpu_text}",
        f"- software: Python {machine['python']}, {versions}; {machine['os']}",
    ]


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a shell line (``nvila ...`` when it is the ``nvila`` command)."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "python"
    if program == "nvila" or argv[0].endswith(("workflows/commands.py", "nvila/workflows/commands.py")):
        program = "nvila"
    return shlex.join([program, *argv[1:]])
