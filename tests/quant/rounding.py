"""int8 rounding written from its definition, for checking the kernels against (not from them)."""

import torch


def int8_activations(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """``x`` (M, K) rounded to int8 per group of ``group`` columns and back, as llama.cpp's Q8 blocks (``group=K``:
    per row, as W8A8 rounds activations): written here from that definition (scale = the group's largest magnitude
    / 127, round half to even), not from the kernel."""
    m, k = x.shape
    g = x.float().reshape(m, k // group, group)
    scale = g.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(g * (1 / scale)).clamp(-127, 127) * scale).reshape(m, k)
