"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales searched before int4 rounding.

A few input channels carry much larger activations than the rest, and rounding errors on their weights cost
the most. AWQ scales each input channel ``k`` of a weight up by ``s_k = mean|x_k|^alpha`` before quantizing
and the activations down by the same factor at run time, which keeps ``x W^T`` unchanged in full precision
but gives the salient channels finer steps. ``alpha`` is searched on calibration activations, per layer, to
minimise the layer's output error after quantization.

This implementation is generic over any part made of ``nn.Linear`` layers: it hooks each layer, keeps the
mean |x| of every input channel over all calibration tokens and a uniform sample of whole input rows, and
measures each layer's own output error (the released AWQ measures a block's output and folds the scales into
the preceding norm or linear; here the inverse scale is kept as a per-layer input multiplier instead, which
needs no knowledge of the architecture). Weight clipping (AWQ's second search) is also searched per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.interfaces import Calibration

log = logging.getLogger(__name__)


@dataclass
class ActivationStats:
    """What calibration saw at one layer's input."""

    abs_mean: torch.Tensor
    """(K,) mean |x| of each input channel over every calibration token."""
    rows: torch.Tensor
    """(R, K) input rows sampled uniformly from all calibration tokens."""
    tokens: int
    """Calibration tokens seen."""


class _Recorder:
    """A forward pre-hook that accumulates per-channel mean |x| and keeps a uniform sample of rows (reservoir)."""

    def __init__(self, width: int, rows: int, generator: torch.Generator) -> None:
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.tokens, self.capacity, self.generator = 0, rows, generator
        self.kept = torch.empty(0, width)
        self.keys = torch.empty(0)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()  # (M, K)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]
        keys = torch.rand(x.shape[0], generator=self.generator)  # the R smallest of uniform keys: a uniform sample
        keys, rows = torch.cat([self.keys, keys]), torch.cat([self.kept, x])
        order = keys.argsort()[:self.capacity]
        self.keys, self.kept = keys[order], rows[order]

    def stats(self) -> ActivationStats:
        return ActivationStats((self.abs_sum / max(self.tokens, 1)).float(), self.kept, self.tokens)


def collect(part: nn.Module, layers: dict[str, nn.Linear], calibrate: Calibration, rows: int,
            seed: int = 0) -> dict[str, ActivationStats]:
    """Run ``calibrate`` once with every layer hooked; what each layer's input looked like."""
    generator = torch.Generator().manual_seed(seed)
    recorders = {name: _Recorder(layer.in_features, rows, generator) for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(recorders[name]) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            calibrate()
    finally:
        for h in handles:
            h.remove()
    unseen = [name for name, r in recorders.items() if r.tokens == 0]
    if unseen:
        raise NvilaError(f"AWQ calibration never ran {len(unseen)} layer(s) ({', '.join(unseen[:4])}): the calibration "
                         "samples do not reach them. Use round-to-nearest (`method: rtn`) or skip those layers.")
    return {name: r.stats() for name, r in recorders.items()}


FakeQuant = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]
"""(weight (N, K), clip ratio per group (N, K/group) or one for all) -> the weight quantized and dequantized (N, K)."""


@dataclass
class Search:
    """The outcome of AWQ's search for one layer."""

    scale: torch.Tensor
    """(K,) per-input-channel scale s: the weight is quantized as W * s and the input multiplied by 1 / s."""
    clip: torch.Tensor
    """(N, K/group) fraction of each group's range kept before rounding (1: nothing clipped)."""
    alpha: float
    error: float
    """Mean squared output error on the sampled rows, after the search."""
    error_rtn: float
    """The same for plain round-to-nearest (s = 1, no clipping)."""


@torch.no_grad()
def search(weight: torch.Tensor, stats: ActivationStats, fake_quant: FakeQuant, group_size: int, grid: int = 20,
           clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> Search:
    """AWQ's two searches for one layer's weight (N, K): the scale exponent alpha over ``grid`` steps in [0, 1),
    then, with that scale, a clipping ratio for each group of each output channel."""
    w = weight.detach().float()  # (N, K)
    n, k = w.shape
    x = stats.rows  # (R, K)
    reference = x @ w.T  # (R, N)

    def error(scale: torch.Tensor, clip: torch.Tensor | float) -> float:
        w_q = fake_quant(w * scale, clip) / scale  # (N, K): what the quantized layer computes with
        return float(((x @ w_q.T - reference) ** 2).mean())

    ones = torch.ones(k)
    error_rtn = error(ones, 1.0)
    best = (error_rtn, 0.0, ones)
    for i in range(1, grid):
        alpha = i / grid
        scale = stats.abs_mean.clamp(min=1e-4).pow(alpha)  # (K,)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centred around 1, as AWQ does
        e = error(scale, 1.0)
        if e < best[0]:
            best = (e, alpha, scale)
    error_scaled, alpha, scale = best

    # Clipping, per (output channel, group): each group's share of the output error, as AWQ measures it
    groups = k // group_size
    xg = x.reshape(-1, groups, group_size)  # (R, G, g)
    best_err = torch.full((n, groups), float("inf"))
    clip = torch.ones(n, groups)
    for ratio in clip_grid:
        delta = (fake_quant(w * scale, ratio) / scale - w).reshape(n, groups, group_size)  # (N, G, g)
        err = torch.einsum("rgk,ngk->rng", xg, delta).pow(2).mean(0)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        clip = torch.where(better, torch.full_like(clip, ratio), clip)
    error_clipped = error(scale, clip)
    if error_clipped > error_scaled:  # the groups' errors interact; keep clipping only where it helps overall
        return Search(scale, torch.ones(n, groups), alpha, error_scaled, error_rtn)
    return Search(scale, clip, alpha, error_clipped, error_rtn)
