"""Registers the built-in encoders, through the same hook a third-party package uses.

Each factory is registered lazily, by module and name, and imported when a model first builds it: listing and
describing components (``nvila plugins``) then reads only the torch-free configs.
"""

from nvila.core import hookimpl
from nvila.core.registry import Registrar, lazy
from nvila.encoders.configs import (
    DynamicTilesConfig,
    DynS2Config,
    PatchesConfig,
    S2Config,
    SiglipConfig,
    TimmViTConfig,
)


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("encoder", "siglip", lazy("nvila.encoders.siglip", "SiglipEncoder"), SiglipConfig)
    registry.add("encoder", "timm-vit", lazy("nvila.encoders.timm_vit", "TimmViTEncoder"), TimmViTConfig)
    registry.add("encoder", "s2", lazy("nvila.encoders.s2", "S2Encoder"), S2Config)
    registry.add("encoder", "dyns2", lazy("nvila.encoders.dyns2", "DynS2Encoder"), DynS2Config)
    registry.add("encoder", "patches", lazy("nvila.encoders.patches", "PatchesEncoder"), PatchesConfig)
    registry.add("encoder", "dynamic-tiles", lazy("nvila.encoders.dynamic_tiles", "DynamicTilesEncoder"),
                 DynamicTilesConfig)
