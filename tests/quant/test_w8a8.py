"""W8A8: int8 weights per output channel, int8 activations at run time, a kernel picked per device."""

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from nvila.core.errors import NvilaError
from nvila.quant import int8_cpu, w8a8
from nvila.quant.w8a8 import W8A8, Int8DynamicLinear, W8A8Config, pick_kernel, quantize_int8
from tests.quant.rounding import int8_activations

CPU_KERNELS = [k for k in ("onednn", "fbgemm", "torchao")
               if k == "torchao" or k in torch.backends.quantized.supported_engines]
if int8_cpu.missing() is None and w8a8.cpu_has("vnni"):
    CPU_KERNELS.append("avx512_vnni")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()


def test_int8_values_are_symmetric_per_output_channel():
    weight = torch.randn(8, 16) * torch.arange(1, 9)[:, None]  # rows of different magnitudes
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(scale, weight.abs().amax(1) / 127)
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_each_cpu_kernel_computes_the_int8_product(kernel):
    part = mlp()
    x = torch.randn(5, 7, 64)  # (B, L, K): any leading dimensions
    reference = part(x)
    W8A8(W8A8Config(kernel=kernel)).quantize(part)
    with torch.no_grad():
        out = part(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert (out - reference).norm() / reference.norm() < 0.03


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_state_dict_is_plain_and_survives_packing_saving_and_moving(kernel, tmp_path):
    part, x = mlp(), torch.randn(4, 64)
    W8A8(W8A8Config(kernel=kernel)).quantize(part)
    before = {k: v.clone() for k, v in part.state_dict().items()}
    assert {k: v.dtype for k, v in before.items() if k.endswith("weight")} == {"0.weight": torch.int8,
                                                                              "2.weight": torch.int8}
    out = part(x)
    assert part[0].is_packed
    after = part.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    save_model(part, str(tmp_path / "w.safetensors"))
    fresh = mlp()
    W8A8(W8A8Config(kernel=kernel)).quantize(fresh)
    load_model(fresh, str(tmp_path / "w.safetensors"))
    assert torch.equal(fresh(x), out)
    part.to("cpu")  # a packed layer unpacks to move, and packs again when next used
    assert not part[0].is_packed and torch.equal(part(x), out)


def test_auto_picks_onednn_with_amx_nvilas_kernel_with_vnni_and_fbgemm_elsewhere(monkeypatch):
    monkeypatch.setattr(w8a8, "is_x86", lambda: True)
    monkeypatch.setattr(w8a8, "cpu_has", lambda feature: feature in ("amx", "vnni"))
    assert pick_kernel("auto", torch.device("cpu")) == "onednn"
    monkeypatch.setattr(w8a8, "cpu_has", lambda feature: feature == "vnni")
    assert pick_kernel("auto", torch.device("cpu")) == ("avx512_vnni" if int8_cpu.available() else "fbgemm")
    monkeypatch.setattr(int8_cpu, "available", lambda: False)  # no compiler, or torch at AVX2
    assert pick_kernel("auto", torch.device("cpu")) == "fbgemm"
    monkeypatch.setattr(w8a8, "cpu_has", lambda feature: False)
    assert pick_kernel("auto", torch.device("cpu")) == "fbgemm"
    monkeypatch.setattr(w8a8, "is_x86", lambda: False)
    assert pick_kernel("auto", torch.device("cpu")) == "onednn"
    assert pick_kernel("auto", torch.device("cuda")) == "torchao"


def test_nvilas_int8_kernel_is_refused_where_it_cannot_run_naming_the_alternative(monkeypatch):
    with pytest.raises(NvilaError, match="runs on CPUs, not on meta; use kernel 'auto'"):
        pick_kernel("avx512_vnni", torch.device("meta"))
    monkeypatch.setattr(int8_cpu.KERNEL, "missing", lambda: "torch runs this CPU at AVX2")
    with pytest.raises(NvilaError, match="AVX2.*kernel 'auto'"):
        W8A8(W8A8Config(kernel="avx512_vnni")).check_available(torch.device("cpu"))
    if int8_cpu.available():  # built: only the CPU's int8 dot products are missing
        monkeypatch.undo()
        monkeypatch.setattr(w8a8, "cpu_has", lambda feature: False)
        with pytest.raises(NvilaError, match="needs a CPU with AVX512-VNNI.*use kernel 'auto'"):
            W8A8(W8A8Config(kernel="avx512_vnni")).check_available(torch.device("cpu"))


def test_a_device_without_a_kernel_is_refused_naming_the_alternative():
    with pytest.raises(NvilaError, match="kernel: torchao"):
        pick_kernel("auto", torch.device("mps"))
    with pytest.raises(NvilaError, match="CPUs only"):
        pick_kernel("onednn", torch.device("cuda"))
    if not torch.cuda.is_available():
        with pytest.raises(NvilaError, match="no CUDA GPU|has none"):
            W8A8(W8A8Config(kernel="torchao")).check_available(torch.device("cuda"))


def test_skip_leaves_matching_layers_in_full_precision():
    part = mlp()
    names = W8A8(W8A8Config(skip=["2"])).quantize(part)
    assert names == ["0"] and isinstance(part[0], Int8DynamicLinear) and type(part[2]) is nn.Linear


def test_a_bad_kernel_name_is_refused():
    with pytest.raises(ValueError, match="kernel must be one of"):
        W8A8Config(kernel="vnni")


@pytest.mark.gpu
def test_w8a8_runs_torchao_int8_on_cuda():
    part, x = mlp(), torch.randn(16, 64)
    reference = part(x)
    W8A8(W8A8Config()).quantize(part)
    before = {k: v.clone() for k, v in part.state_dict().items()}
    part.to("cuda")
    out = part(x.cuda()).cpu()
    assert part[0]._running == "torchao"
    assert (out - reference).norm() / reference.norm() < 0.03
    after = {k: v.cpu() for k, v in part.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype,expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_rest_of_the_tower_computes_in_the_chosen_dtype(dtype, expected):
    part = mlp()
    part.insert(1, nn.LayerNorm(96))
    W8A8(W8A8Config(dtype=dtype)).quantize(part)
    assert part[1].weight.dtype == expected
    assert part(torch.randn(2, 64).to(expected)).dtype == expected


def test_auto_dtype_follows_the_cpus_bf16_instructions(monkeypatch):
    monkeypatch.setattr(w8a8, "cpu_has", lambda feature: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    part = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    W8A8(W8A8Config()).quantize(part)
    assert part[1].weight.dtype == torch.float32


@pytest.mark.skipif(int8_cpu.missing() is not None or not w8a8.cpu_has("vnni"),
                    reason=f"nvila's int8 linear: {int8_cpu.missing() or 'no AVX512-VNNI'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
@pytest.mark.parametrize(("rows", "k", "n"), [
    (37, 200, 50),  # K and N no multiples of 16
    (600, 40, 8200),  # products beyond one GEMM call's share (4M sums): 511 rows a call, then 89
])
@pytest.mark.usefixtures("native_ops")
def test_nvilas_int8_linear_rounds_each_row_and_applies_bias_and_activation_in_one_pass(dtype, activation, rows, k, n):
    torch.manual_seed(0)
    x, weight = torch.randn(rows, k).to(dtype), torch.randn(n, k)
    x[3] = 0  # a row of zeros: scale 1, nothing divided by zero
    q, scale = quantize_int8(weight)
    bias = torch.randn(n)
    out = int8_cpu.linear(x, q, scale, bias, activation)
    expected = int8_activations(x, group=k).double() @ (q.double() * scale.double()[:, None]).t() + bias.double()
    if activation == "gelu_tanh":
        expected = nn.functional.gelu(expected, approximate="tanh")
    assert out.dtype == dtype and out.shape == (rows, n)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    assert ((out.double() - expected).abs() <= expected.abs() * ulp + 1e-4).all()


def test_a_gelu_after_a_quantized_layer_is_taken_into_it_as_siglips_mlp_has_it():
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMLP

    config = SiglipVisionConfig(hidden_size=64, intermediate_size=96)  # hidden_act: gelu_pytorch_tanh
    torch.manual_seed(0)
    reference, x = SiglipMLP(config).eval(), torch.randn(2, 9, 64)
    with torch.no_grad():
        expected = reference(x)
    for kernel in CPU_KERNELS:  # every kernel takes it: nvila's in its output pass, the others right after
        mlp_ = SiglipMLP(config).eval()
        mlp_.load_state_dict(reference.state_dict())
        W8A8(W8A8Config(kernel=kernel)).quantize(mlp_)
        assert mlp_.fc1.activation == "gelu_tanh" and isinstance(mlp_.activation_fn, nn.Identity)
        assert mlp_.fc2.activation == "none"
        with torch.no_grad():
            assert (mlp_(x) - expected).norm() / expected.norm() < 0.03, kernel
    assert not w8a8.is_gelu_tanh(nn.GELU()) and w8a8.is_gelu_tanh(nn.GELU(approximate="tanh"))
