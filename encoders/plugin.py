"""Registers the built-in encoders, through the same hook a third-party package uses."""

from encoders.siglip import SiglipConfig, SiglipEncoder
from nvila_core import hookimpl
from nvila_core.registry import Registrar


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("encoder", "siglip", SiglipEncoder, SiglipConfig)
