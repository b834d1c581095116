"""Registers the built-in encoders, through the same hook a third-party package uses."""

from nvila.core import hookimpl
from nvila.core.registry import Registrar
from nvila.encoders.dynamic_tiles import DynamicTilesConfig, DynamicTilesEncoder
from nvila.encoders.dyns2 import DynS2Config, DynS2Encoder
from nvila.encoders.patches import PatchesConfig, PatchesEncoder
from nvila.encoders.s2 import S2Config, S2Encoder
from nvila.encoders.siglip import SiglipConfig, SiglipEncoder
from nvila.encoders.timm_vit import TimmViTConfig, TimmViTEncoder


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("encoder", "siglip", SiglipEncoder, SiglipConfig)
    registry.add("encoder", "timm-vit", TimmViTEncoder, TimmViTConfig)
    registry.add("encoder", "s2", S2Encoder, S2Config)
    registry.add("encoder", "dyns2", DynS2Encoder, DynS2Config)
    registry.add("encoder", "patches", PatchesEncoder, PatchesConfig)
    registry.add("encoder", "dynamic-tiles", DynamicTilesEncoder, DynamicTilesConfig)
