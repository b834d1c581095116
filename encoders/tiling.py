"""Tile grids: NVILA's aspect-ratio rule, and splitting and stitching images and feature maps by a grid.

Grids are ``(rows, cols)``; tiles and blocks are always laid out row-major (left to right, then top to
bottom), which is the order of NVILA's ``split_chessboard`` / ``merge_chessboard``.
"""

from __future__ import annotations

import torch


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) grid with ``min_tiles <= cols * rows <= max_tiles``, fewest tiles first.

    Built as a set in NVILA's order and sorted stably by tile count, so that grids with the same tile
    count keep the order NVILA iterates them in; that order decides exact ties between such grids.
    """
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """NVILA's tile grid ``(rows, cols)`` for a ``width`` x ``height`` image.

    Among the grids with ``min_tiles`` to ``max_tiles`` tiles, the one whose aspect ratio (cols / rows)
    is closest to the image's. On an exact tie, a later (larger) grid replaces the current choice when
    the image's area exceeds half of that grid's pixel area (``0.5 * tile**2 * cols * rows``).
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles} and {max_tiles}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def split_image(pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An image ``(3, rows*S, cols*S)`` -> its tiles ``(rows*cols, 3, S, S)``, row-major."""
    c, height, width = pixels.shape
    s_h, s_w = height // rows, width // cols
    x = pixels.reshape(c, rows, s_h, cols, s_w)  # (3, R, S, C, S)
    return x.permute(1, 3, 0, 2, 4).reshape(rows * cols, c, s_h, s_w)  # (R*C, 3, S, S)


def merge_blocks(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Row-major blocks ``(rows*cols, h, w, C)`` -> the stitched map ``(rows*h, cols*w, C)``."""
    _, h, w, c = blocks.shape
    x = blocks.reshape(rows, cols, h, w, c)  # (R, C, h, w, Ch)
    return x.permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)  # (R*h, C*w, Ch)


def split_map(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A feature map ``(rows*h, cols*w, C)`` -> row-major blocks ``(rows*cols, h, w, C)``."""
    height, width, c = features.shape
    h, w = height // rows, width // cols
    x = features.reshape(rows, h, cols, w, c)  # (R, h, C, w, Ch)
    return x.permute(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)  # (R*C, h, w, Ch)


def area_weights(size_in: int, size_out: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(size_out, size_in): row ``i`` averages the inputs ``floor(i * in / out)`` to ``ceil((i + 1) * in / out)``,
    the window of area interpolation (``F.interpolate(mode="area")``, that is ``adaptive_avg_pool``)."""
    i = torch.arange(size_out)
    start = (i * size_in) // size_out  # floor
    end = ((i + 1) * size_in + size_out - 1) // size_out  # ceil
    j = torch.arange(size_in)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])  # (out, in)
    return (inside / (end - start)[:, None]).to(dtype=dtype, device=device)


def area_resize(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A map ``(H, W, C)`` -> ``(height, width, C)``, area-interpolated as ``F.interpolate(mode="area")`` does it.

    Area interpolation is separable and linear, so each axis is one product with :func:`area_weights` over the
    channel-last map, or, where the size grows by a whole factor (every window one input), a repeat.
    ``F.interpolate`` on a (1, C, H, W) view runs a channel-first pooling kernel and returns channel-first, which
    took 5x longer on the CPU with 1152 channels at NVILA's sizes, and as long again to turn back.
    """
    h_in, w_in, c = features.shape
    if height % h_in == 0:
        x = features.repeat_interleave(height // h_in, dim=0)  # (height, W, C)
    else:
        weights = area_weights(h_in, height, features.dtype, features.device)  # (height, H)
        x = (weights @ features.reshape(h_in, w_in * c)).reshape(height, w_in, c)  # (height, W, C)
    if width % w_in == 0:
        return x.repeat_interleave(width // w_in, dim=1)  # (height, width, C)
    return area_weights(w_in, width, features.dtype, features.device) @ x  # per row: (height, width, C)
