"""Temporal averaging: a video's frames, in consecutive groups of g, become one frame each (g x fewer tokens).

Tokens at the same position are averaged within each group. Released NVILA does this to the *projected*
frame tokens (``where: after-projector``), with g = 8 over 256 frames, and ends each pooled frame with
the embedding of a newline token (``frame_end``); those are this config's defaults. Pooling earlier
(``after-encoder``, ``after-compressor``) runs the later stages on fewer frames, which is cheaper; for a
linear spatial compressor such as STC, ``after-encoder`` and ``after-compressor`` give the same tokens.

Frame counts that are not a multiple of g: NVILA's pooling reshapes the frames to ``(-1, g)`` and fails.
Here the last group holds the remaining ``F mod g`` frames and is averaged over those frames alone (no
zero frames or repeated frames dilute or bias it), so ``ceil(F / g)`` frames come out.
"""

from __future__ import annotations

import torch

from nvila.compressors.configs import TemporalAverageConfig
from nvila.core.interfaces import TemporalCompressor


class TemporalAverage(TemporalCompressor):
    """Mean over consecutive groups of g frames, position by position; no parameters."""

    def __init__(self, config: TemporalAverageConfig) -> None:
        super().__init__()
        self.group, self.where, self.frame_end = config.group, config.where, config.frame_end

    def output_frames(self, frames: int) -> int:
        if frames < 1:
            raise ValueError(f"a video needs at least one frame, got {frames}")
        return -(-frames // self.group)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        f, g = frames.shape[0], self.group
        whole = f - f % g
        pooled = frames[:whole].unflatten(0, (whole // g, g)).mean(1)  # (F // g, *rest)
        if whole < f:  # the last, partial group: averaged over its own F mod g frames
            pooled = torch.cat([pooled, frames[whole:].mean(0, keepdim=True)])  # (ceil(F / g), *rest)
        return pooled
