"""W8A8: int8 weights per output channel, int8 activations at run time, a kernel picked per device."""

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from nvila.core.errors import NvilaError
from nvila.quant import w8a8
from nvila.quant.w8a8 import W8A8, Int8DynamicLinear, W8A8Config, pick_kernel, quantize_int8

CPU_KERNELS = [k for k in ("onednn", "fbgemm", "torchao")
               if k == "torchao" or k in torch.backends.quantized.supported_engines]


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


def test_auto_picks_onednn_where_the_cpu_has_amx_and_fbgemm_elsewhere(monkeypatch):
    monkeypatch.setattr(w8a8, "is_x86", lambda: True)
    monkeypatch.setattr(w8a8, "cpu_has", lambda feature: feature == "amx")
    assert pick_kernel("auto", torch.device("cpu")) == "onednn"
    monkeypatch.setattr(w8a8, "cpu_has", lambda feature: False)
    assert pick_kernel("auto", torch.device("cpu")) == "fbgemm"
    monkeypatch.setattr(w8a8, "is_x86", lambda: False)
    assert pick_kernel("auto", torch.device("cpu")) == "onednn"
    assert pick_kernel("auto", torch.device("cuda")) == "torchao"


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
    part = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    W8A8(W8A8Config()).quantize(part)
    assert part[1].weight.dtype == torch.float32
