"""AWQ: statistics from calibration, and scales that beat round-to-nearest where a few channels dominate."""

import pytest
import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.quant import awq
from nvila.quant.w4a16 import W4A16, W4A16Config, fake_quant


def salient_inputs(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Activations whose first 8 of 256 channels are 30x larger, as LLM activations have a few outlier channels."""
    x = torch.randn(rows, 256, generator=generator)
    x[:, :8] *= 30
    return x


def test_collect_sees_every_token_and_keeps_a_sample_of_rows():
    layer = nn.Linear(16, 4)
    batches = [torch.randn(3, 5, 16) for _ in range(4)]
    stats = awq.collect(layer, {"": layer}, lambda: [layer(b) for b in batches], rows=7)[""]
    every = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats.tokens == 60 and torch.allclose(stats.abs_mean, every.abs().mean(0), atol=1e-6)
    assert stats.rows.shape == (7, 16) and all((every == r).all(1).any() for r in stats.rows)
    assert not layer._forward_pre_hooks  # hooks are removed


def test_the_search_never_does_worse_than_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g)
    stats = awq.ActivationStats(salient_inputs(1000, g).abs().mean(0), salient_inputs(128, g), 1000)
    found = awq.search(weight, stats, fake_quant(128, torch.bfloat16), 128)
    assert found.error <= found.error_rtn and found.scale.shape == (256,) and found.clip.shape == (64, 2)
    assert found.alpha > 0  # the salient channels get finer steps
    assert found.scale[:8].mean() > found.scale[8:].mean()


def test_awq_beats_round_to_nearest_on_held_out_activations_with_salient_channels():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    calibration, held_out = salient_inputs(512, g), salient_inputs(256, g)
    with torch.no_grad():
        reference = layer(held_out)

    @torch.no_grad()
    def error(method):
        part = nn.Sequential(nn.Linear(256, 128))
        part[0].load_state_dict(layer.state_dict())
        W4A16(W4A16Config(method=method)).quantize(part, lambda: part(calibration))
        return float(((part(held_out).float() - reference) ** 2).mean())

    assert error("awq") < 0.8 * error("rtn")


def test_without_calibration_awq_keeps_unit_scales_so_checkpoints_still_load():
    part = nn.Sequential(nn.Linear(128, 128))
    W4A16(W4A16Config()).quantize(part)
    assert torch.equal(part[0].input_scale, torch.ones(128, dtype=torch.bfloat16))


def test_a_layer_calibration_never_reaches_is_refused():
    part = nn.ModuleDict({"used": nn.Linear(128, 128), "unused": nn.Linear(128, 128)})
    with pytest.raises(NvilaError, match="never ran 1 layer.*unused.*method: rtn"):
        W4A16(W4A16Config()).quantize(part, lambda: part["used"](torch.randn(4, 128)))
