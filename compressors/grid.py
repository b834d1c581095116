"""Checks shared by the compressors that merge k x k neighbourhoods of a feature grid (STC, average pooling)."""

from __future__ import annotations


def check_ratio(ratio: int) -> None:
    """Refuse a zero or negative merge ratio (from a config's ``__post_init__``)."""
    if ratio < 1:
        raise ValueError(f"key 'ratio' = {ratio} is out of range: it is the side k of the k x k neighbourhood "
                         "merged into one token; valid range 1..(smaller side of the feature grid)")


def merged_grid(ratio: int, block_size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of tokens after merging k x k neighbourhoods, the far edges padded (ceil division).

    Raises ValueError when k exceeds a side of the grid: such a block would be mostly padding.
    """
    h, w = block_size
    if ratio > min(h, w):
        raise ValueError(f"key 'ratio' = {ratio} is larger than the {h}x{w} feature grid; "
                         f"valid range 1..{min(h, w)}")
    return -(-h // ratio), -(-w // ratio)
