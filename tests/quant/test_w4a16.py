"""W4A16: int4 groups in tinygemm's convention, stored plain, packed per device, refused clearly where it cannot run."""

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.specs import SpecError, build
from nvila.quant import int4_cpu
from nvila.quant._torchao import int4_cpu_pack
from nvila.quant.w4a16 import (
    W4A16,
    Int4WeightOnlyLinear,
    W4A16Config,
    dequantize_groups,
    pack_nibbles,
    pick_kernel,
    quantize_groups,
    split_nibble_blocks,
    unpack_by_probe,
    unpack_cpu,
    unpack_nibbles,
)
from tests.quant.rounding import int8_activations

NATIVE = pytest.mark.skipif(int4_cpu.missing() is not None, reason=f"nvila's int4 kernel: {int4_cpu.missing()}")


pytestmark = pytest.mark.usefixtures("native_ops")  # the kernels' ops, for the tests that call them directly


CPU_KERNELS = ["cpu", pytest.param("avx512_bf16", marks=NATIVE)]


def mlp(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 384), nn.GELU(), nn.Linear(384, width)).eval()


def test_group_values_round_to_the_nearest_step_of_their_stored_scale():
    weight = torch.randn(6, 256)
    q, scale, zero = quantize_groups(weight, 64, torch.bfloat16)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (6, 4)
    assert scale.dtype == zero.dtype == torch.bfloat16
    error = (dequantize_groups(q, scale, zero).float() - weight).reshape(6, 4, 64).abs()
    assert (error <= scale.float()[..., None] * 0.5 + 1e-2).all()  # half a step (and the bf16 rounding of w)


def test_clipping_narrows_each_group_to_a_fraction_of_its_largest_magnitude():
    weight = torch.zeros(1, 32)
    weight[0, 0] = 10.0
    weight[0, 1:] = torch.linspace(-1, 1, 31)
    q, scale, zero = quantize_groups(weight, 32, torch.float32, clip=torch.tensor([[0.5]]))
    assert dequantize_groups(q, scale, zero).max() == pytest.approx(5.0, rel=1e-5)


def test_nibbles_pack_two_values_a_byte_and_unpack_exactly():
    q = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (3, 5)
    assert torch.equal(packed[:, 0] & 15, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 1])
    assert torch.equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (16, 64)])  # full, partial and small blocks of rows
def test_the_cpu_kernels_packing_is_undone_exactly(shape):
    n, k = shape
    q = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = int4_cpu_pack(q)
    assert torch.equal(unpack_by_probe(int4_cpu_pack, packed, n, k).int(), q)  # any layout, slowly
    assert torch.equal(unpack_cpu(packed, n, k).int(), q)  # the layout torch documents, quickly


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_prefill_sized_calls_run_a_dense_bf16_matmul_that_agrees_with_the_int4_kernel(kernel):
    part = mlp()
    W4A16(W4A16Config(method="rtn", dense_rows=8, kernel=kernel)).quantize(part)
    layer, few, many = part[0], torch.randn(1, 4, 256), torch.randn(1, 8, 256)
    layer(few)  # packs
    dense = layer(many)
    layer.dense_rows = 0
    assert torch.allclose(dense.float(), layer(many).float(), atol=0.02, rtol=0.02)
    plain = layer.plain()
    exact = dequantize_groups(unpack_nibbles(plain["qweight"]), plain["scales"].float(), plain["zeros"].float())
    dense_weight = layer.dequantized(layer._packed)
    assert dense_weight.shape == (384, 256) and dense_weight.dtype == torch.bfloat16
    assert bool(((dense_weight.float() - exact).abs() <= exact.abs() * 2 ** -8).all())  # one bf16 rounding


@pytest.mark.parametrize("rows", [128, 144], ids=["whole blocks, read in place", "a short last block, gathered"])
def test_the_dense_weight_is_the_exact_dequantization_within_one_bf16_rounding(rows):
    part = nn.Sequential(nn.Linear(256, rows))
    W4A16(W4A16Config(method="rtn", kernel="cpu")).quantize(part)
    layer = part[0]
    layer(torch.randn(1, 256))  # packs
    assert bool(split_nibble_blocks(rows)) == (rows == 128)
    plain = layer.plain()
    exact = dequantize_groups(unpack_nibbles(plain["qweight"]), plain["scales"].float(), plain["zeros"].float())
    dense = layer.dense_weight(layer._packed)
    assert dense.shape == (rows, 256) and dense.dtype == torch.bfloat16
    assert bool(((dense.float() - exact).abs() <= exact.abs() * 2 ** -8).all())  # bf16 keeps 8 significant bits


def test_output_widths_the_cpu_kernel_cannot_block_are_padded_and_cut_back(tmp_path):
    part, x = nn.Sequential(nn.Linear(64, 40)), torch.randn(3, 64)  # 40 rows: not a multiple of 16
    W4A16(W4A16Config(method="rtn", group_size=32)).quantize(part)  # 'auto' takes torch's kernel for groups of 32
    before = part.state_dict()["0.qweight"].clone()
    out = part(x)
    assert out.shape == (3, 40) and part[0].is_packed
    assert torch.equal(part.state_dict()["0.qweight"], before)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_the_cpu_kernels_compute_what_the_int4_values_say(kernel):
    part, x = mlp(), torch.randn(3, 5, 256)
    reference = part(x)
    W4A16(W4A16Config(method="rtn", kernel=kernel)).quantize(part)
    layer = part[0]
    plain = layer.plain()
    expected = nn.functional.linear(x.bfloat16().float(), dequantize_groups(
        unpack_nibbles(plain["qweight"]), plain["scales"], plain["zeros"]).float(), layer.bias.float())
    with torch.no_grad():
        out = layer(x)
        whole = part(x)
    assert layer._running == kernel and out.dtype == torch.bfloat16 and out.shape == (3, 5, 384)
    assert torch.allclose(out.float(), expected, atol=0.02, rtol=0.02)
    assert (whole.float() - reference).norm() / reference.norm() < 0.15


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_state_dict_is_plain_and_survives_packing_and_reloading(method, tmp_path):
    part, x = mlp(), torch.randn(4, 256)
    calibrate = (lambda: part(torch.randn(32, 256))) if method == "awq" else None
    W4A16(W4A16Config(method=method)).quantize(part, calibrate)
    before = {k: v.clone() for k, v in part.state_dict().items()}
    expected = {"0.qweight", "0.scales", "0.zeros", "0.bias", "2.qweight", "2.scales", "2.zeros", "2.bias"}
    expected |= {"0.input_scale", "2.input_scale"} if method == "awq" else set()
    assert set(before) == expected and before["0.qweight"].dtype == torch.uint8
    out = part(x)
    assert part[0].is_packed
    after = part.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    save_model(part, str(tmp_path / "w.safetensors"))
    fresh = mlp()
    W4A16(W4A16Config(method=method)).quantize(fresh)  # no calibration: unit scales, same keys
    load_model(fresh, str(tmp_path / "w.safetensors"))
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_the_reference_kernel_agrees_with_the_cpu_kernels(kernel):
    x = torch.randn(4, 256)
    cpu, reference = mlp(), mlp()
    W4A16(W4A16Config(method="rtn", kernel=kernel)).quantize(cpu)
    W4A16(W4A16Config(method="rtn", kernel="reference")).quantize(reference)
    assert torch.allclose(cpu(x).float(), reference(x).float(), atol=0.03, rtol=0.03)


def test_the_rest_of_the_part_moves_to_16_bits_but_buffers_stay():
    part = mlp()
    part.register_buffer("inv_freq", torch.ones(4))  # like a rotary embedding's, which must stay fp32
    part.insert(1, nn.LayerNorm(384))
    W4A16(W4A16Config(method="rtn")).quantize(part)
    assert part[1].weight.dtype == torch.bfloat16 and part.inv_freq.dtype == torch.float32


def test_a_group_size_that_does_not_divide_a_width_is_refused_naming_the_layer():
    part = nn.Sequential(nn.Linear(256, 96), nn.Linear(96, 8))
    with pytest.raises(NvilaError, match=r"group_size 128 does not divide .* 1 \(in_features 96\)"):
        W4A16(W4A16Config()).quantize(part)
    with pytest.raises(SpecError, match="group_size must be one of 32, 64, 128"):
        build("quantizer", {"name": "w4a16", "group_size": 100})


def test_a_device_without_the_kernel_is_refused_naming_the_alternative():
    with pytest.raises(NvilaError, match="kernel: reference"):
        pick_kernel("auto", torch.device("mps"))
    if not torch.cuda.is_available():
        with pytest.raises(NvilaError, match="compute capability 8.0.*no CUDA GPU.*'reference'"):
            W4A16(W4A16Config(kernel="cuda")).check_available(torch.device("cpu"))
    with pytest.raises(NvilaError, match="bf16 activations"):
        W4A16(W4A16Config(dtype="fp16")).check_available(torch.device("cpu"))
    W4A16(W4A16Config(dtype="fp16", kernel="reference")).check_available(torch.device("cpu"))


@NATIVE
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # one row (decoding); blocks of four activation rows and the rest
@pytest.mark.parametrize("group_size", [64, 128])
def test_nvilas_kernel_is_the_exact_product_within_fp32_accumulation(rows, group_size):
    torch.manual_seed(rows)
    n, k = 134, 512  # 134 output rows: blocks of four and a remainder of two
    q, scales, zeros = quantize_groups(torch.randn(n, k), group_size, torch.bfloat16)
    x = torch.randn(rows, k).bfloat16()
    exact = x.double() @ dequantize_groups(q, scales.double(), zeros.double()).t()  # (rows, N)
    out = int4_cpu.matmul(x, pack_nibbles(q), scales, zeros)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert bool(((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3 * exact.abs().max()).all())
    dense = int4_cpu.dequantize(pack_nibbles(q), scales, zeros)
    expected = dequantize_groups(q, scales.float(), zeros.float())
    assert bool(((dense.float() - expected).abs() <= expected.abs() * 2 ** -8).all())


VNNI = pytest.mark.skipif(int4_cpu.int8_missing() is not None, reason=f"int8 activations: {int4_cpu.int8_missing()}")


@VNNI
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n", [134, 896])  # blocks of four output rows and a remainder of two; a model's width
def test_int8_activations_give_the_dequantized_weight_times_the_dequantized_activations(rows, n):
    torch.manual_seed(rows + n)
    k = 640  # five groups of 128
    q, scales, zeros = quantize_groups(torch.randn(n, k), 128, torch.bfloat16)
    x = torch.randn(rows, k).bfloat16()
    x[0, :128] = 0  # a group of zeros: scale 1, nothing divided by zero
    expected = int8_activations(x).double() @ dequantize_groups(q, scales.double(), zeros.double()).t()
    out = int4_cpu.matmul_a8(x, pack_nibbles(q), scales, zeros)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert bool(((out.double() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-4 * expected.abs().max()).all())
    exact = x.double() @ dequantize_groups(q, scales.double(), zeros.double()).t()
    assert float((out.double() - exact).norm() / exact.norm()) < 0.02  # what int8 activations cost


@VNNI
@pytest.mark.parametrize("m, n", [(40, 134), (97, 896)])  # an output width that is no multiple of 16; a model's
def test_the_int8_gemm_of_prefill_multiplies_int8_rows_by_the_weight_widened_to_int8_per_channel(m, n):
    torch.manual_seed(m + n)
    k = 640
    q, scales, zeros = quantize_groups(torch.randn(n, k), 128, torch.bfloat16)
    x = torch.randn(m, k).bfloat16()
    x[1] = 0  # a row of zeros: scale 1, nothing divided by zero
    weight = dequantize_groups(q, scales.float(), zeros.float())  # (N, K) fp32, as the kernel widens it
    expected = int8_activations(x, group=k).double() @ int8_activations(weight, group=k).double().t()  # rows
    out = int4_cpu.matmul_int8_gemm(x, pack_nibbles(q), scales, zeros)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert bool(((out.double() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-3 * expected.abs().max()).all())
    assert not out[1].any()
    exact = x.double() @ weight.double().t()
    assert float((out.double() - exact).norm() / exact.norm()) < 0.02  # what int8 rounding costs


@VNNI
def test_the_int8_activation_kernel_is_asked_for_by_name_runs_decoding_and_refuses_what_it_cannot_run(monkeypatch):
    device = torch.device("cpu")
    assert pick_kernel("auto", device) != "avx512_vnni"  # it changes the numbers: never picked for the user
    parts, x, long = {"avx512_bf16": mlp(), "avx512_vnni": mlp()}, torch.randn(1, 1, 256), torch.randn(1, 40, 256)
    out = {}
    for kernel, part in parts.items():
        W4A16(W4A16Config(method="rtn", kernel=kernel)).quantize(part)
        with torch.no_grad():
            out[kernel] = part[0](x), part[0](long)  # 40 rows: prefill-sized
        assert part[0]._running == kernel
    (a16, a16_long), (a8, a8_long) = out["avx512_bf16"], out["avx512_vnni"]
    assert 0 < float((a8.float() - a16.float()).norm() / a16.float().norm()) < 0.02  # decoding: int8 activations
    assert 0 < float((a8_long.float() - a16_long.float()).norm() / a16_long.float().norm()) < 0.02  # prefill too
    with pytest.raises(NvilaError, match="per group of 128.*groups of 64; use kernel 'avx512_bf16'"):
        W4A16(W4A16Config(kernel="avx512_vnni", group_size=64)).check_available(device)
    with pytest.raises(NvilaError, match="runs on CPUs, not on meta"):
        pick_kernel("avx512_vnni", torch.device("meta"))
    monkeypatch.setattr(int4_cpu, "has_vnni", lambda: False)
    with pytest.raises(NvilaError, match="needs a CPU with AVX512-VNNI.*use kernel 'avx512_bf16' or 'auto'"):
        W4A16(W4A16Config(kernel="avx512_vnni")).check_available(device)


def test_auto_picks_nvilas_kernel_only_where_the_cpu_runs_avx512_bf16(monkeypatch):
    device = torch.device("cpu")
    assert pick_kernel("auto", device) == ("avx512_bf16" if int4_cpu.missing() is None else "cpu")
    assert pick_kernel("auto", device, group_size=32) == "cpu"  # its groups are multiples of 64
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert pick_kernel("auto", device) == "cpu"
    with pytest.raises(NvilaError, match="AVX2.*kernel 'cpu'"):
        W4A16(W4A16Config(kernel="avx512_bf16")).check_available(device)


def test_without_a_cpp_compiler_auto_takes_torchs_kernel_and_a_request_for_nvilas_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert pick_kernel("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(NvilaError, match="'no-such-compiler' is not on PATH.*install g\\+\\+.*kernel 'cpu'"):
        W4A16(W4A16Config(kernel="avx512_bf16")).check_available(torch.device("cpu"))


def test_nvilas_kernel_refuses_groups_of_32_naming_torchs_kernel():
    with pytest.raises(NvilaError, match="groups of 64 or 128, not 32.*kernel 'cpu'"):
        W4A16(W4A16Config(kernel="avx512_bf16", group_size=32)).check_available(torch.device("cpu"))


def test_the_output_layer_is_kept_by_default():
    part = nn.ModuleDict({"body": nn.Linear(128, 128), "lm_head": nn.Linear(128, 512)})
    assert W4A16(W4A16Config(method="rtn")).quantize(part) == ["body"]
    assert isinstance(part["body"], Int4WeightOnlyLinear) and type(part["lm_head"]) is nn.Linear


@pytest.mark.gpu
def test_w4a16_runs_tinygemm_on_cuda_and_unpacks_exactly():
    part, x = mlp(), torch.randn(4, 256)
    W4A16(W4A16Config(method="rtn")).quantize(part)
    reference = part(x).float()  # the CPU kernel
    before = {k: v.clone() for k, v in part.state_dict().items()}
    part.to("cuda")
    out = part(x.cuda()).float().cpu()
    assert part[0]._running == "cuda"
    assert torch.allclose(out, reference, atol=0.03, rtol=0.03)
    after = {k: v.cpu() for k, v in part.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
