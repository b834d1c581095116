"""This package's config dataclasses, in a module that imports no torch.

`nvila plugins` imports every installed plugin's registering module, and with it whatever that module imports:
keeping the configs here, apart from the torch code in `pool.py`, lets it list and describe `my-pool` in a
fraction of a second. `pool.py` re-exports the config, so `from nvila_myplugin.pool import AveragePoolConfig`
works too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AveragePoolConfig:
    """k x k average pooling of each feature block; no parameters.

    The first line above is the summary `nvila plugins` shows; each field's docstring is what
    `nvila plugins --describe my-pool` shows."""

    stride: int = 2
    """Side k of the square window averaged into one token (2 keeps a quarter of the tokens)."""

    def __post_init__(self) -> None:
        # Runs when a spec is merged onto this config: the message reaches the user as a spec error.
        if self.stride < 1:
            raise ValueError(f"stride must be a positive integer, got {self.stride}")
