from pathlib import Path

import pytest
import torch

from nvila.plugins import attention
from nvila.quant import int4_cpu, int8_cpu
from nvila.quant.w4a16 import pack_nibbles, quantize_groups
from nvila.workflows.bench.measure import torch_threads

KERNELS = {"int4": int4_cpu.KERNEL, "attention": attention.KERNEL, "int8": int8_cpu.KERNEL,
           "prefill attention": attention.PREFILL_KERNEL}


pytestmark = pytest.mark.usefixtures("native_ops")  # the kernels' ops, for the tests that call them directly


def needs(name: str):
    reason = KERNELS[name].missing()
    return pytest.mark.skipif(reason is not None, reason=f"nvila's {name} kernel: {reason}")


def mapped_files() -> set[str]:
    """The files this process has mapped (its shared libraries among them)."""
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}


def loaded_library(name: str) -> Path:
    """The shared library of a loaded kernel, as this process mapped it."""
    KERNELS[name].load()
    paths = {path for path in mapped_files() if path.endswith(f"/{KERNELS[name].name}.so")}
    assert len(paths) == 1, paths
    return Path(paths.pop())


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in KERNELS])
@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
def test_kernels_run_their_parallel_loops_on_torchs_openmp_threads(name):
    # at::parallel_for is an OpenMP pragma compiled into the kernel: without -fopenmp it ran on one thread whatever
    # torch.set_num_threads said. Built with it, the library calls OpenMP's parallel region, in torch's libgomp.
    assert b"GOMP_parallel" in loaded_library(name).read_bytes()
    runtimes = {path for path in mapped_files() if "gomp" in path}
    assert len(runtimes) == 1, runtimes  # one OpenMP runtime in the process, not a second beside torch's


@needs("int4")
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("activations", ["bf16", "int8"])
def test_the_int4_kernel_gives_the_same_answer_on_two_threads(rows, activations):
    if activations == "int8" and int4_cpu.int8_missing() is not None:  # a CPU with AVX512-BF16 but no VNNI
        pytest.skip(f"int8 activations: {int4_cpu.int8_missing()}")
    matmul = int4_cpu.matmul if activations == "bf16" else int4_cpu.matmul_a8
    torch.manual_seed(rows)
    q, scales, zeros = quantize_groups(torch.randn(300, 256), 128, torch.bfloat16)
    x = torch.randn(rows, 256).bfloat16()
    with torch_threads(1):
        one = matmul(x, pack_nibbles(q), scales, zeros)
    with torch_threads(2):
        two = matmul(x, pack_nibbles(q), scales, zeros)
    assert torch.equal(one, two)


@needs("attention")
def test_the_attention_kernel_gives_the_same_answer_on_two_threads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 64, generator=g)
    k, v = torch.randn(3, 2, 40, 64, generator=g), torch.randn(3, 2, 40, 64, generator=g)
    with torch_threads(1):
        one = torch.ops.nvila_attention.decode(q, k, v, None, 0.125)
    with torch_threads(2):
        two = torch.ops.nvila_attention.decode(q, k, v, None, 0.125)
    assert torch.equal(one, two)


@needs("int8")
@pytest.mark.parametrize("rows", [0, 1, 70])  # none (an empty batch), one, and more than one thread's share
def test_the_int8_linear_gives_the_same_answer_on_two_threads(rows):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 200).bfloat16(), torch.randint(-127, 128, (90, 200), dtype=torch.int8)
    scale, bias = torch.rand(90) / 100, torch.randn(90)
    with torch_threads(1):
        one = int8_cpu.linear(x, weight, scale, bias, "gelu_tanh")
    with torch_threads(2):
        two = int8_cpu.linear(x, weight, scale, bias, "gelu_tanh")
    assert one.shape == (rows, 90) and torch.equal(one, two)
