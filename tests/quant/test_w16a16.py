"""W16A16: a part cast to 16-bit floats where the machine computes them fast, decided again wherever it loads
(in a whole model's serving mix: tests/nvila_core/test_quant_spec.py)."""

import pytest
import torch
from torch import nn

from nvila.quant import w8a8
from nvila.quant.configs import W16A16Config
from nvila.quant.w16a16 import W16A16


def projector_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 32)).eval()


@pytest.mark.parametrize("fast,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_casts_where_bf16_is_fast_and_keeps_fp32_elsewhere(monkeypatch, fast, expected):
    monkeypatch.setattr(w8a8, "bf16_is_fast", lambda: fast)
    part = projector_like()
    layers = W16A16(W16A16Config()).quantize(part)
    assert layers == ["0", "1", "3"]  # the modules holding weights, cast or not, so the part is never "empty"
    assert {p.dtype for p in part.parameters()} == {expected}


def test_a_named_dtype_applies_everywhere(monkeypatch):
    monkeypatch.setattr(w8a8, "bf16_is_fast", lambda: False)
    part = projector_like()
    x = torch.randn(3, 64)
    reference = part(x)
    W16A16(W16A16Config(dtype="fp16")).quantize(part)
    out = part(x)  # fp32 in, as a caller computing in fp32 passes it: the part computes in fp16
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=2e-2)


def test_an_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="dtype must be one of auto, bf16, fp16, got 'int3'"):
        W16A16Config(dtype="int3")
