"""Quantized linear layers: plain integer tensors in the state dict, the kernel's own layout at run time.

A quantized checkpoint must load without unpickling anything, onto whatever device serves it. So a layer's
state dict holds integers and scales as ordinary tensors (what safetensors stores), and the layout a kernel
wants (fbgemm or oneDNN packed weights, torchao's int4 tile layouts and tensor subclasses) is made from them
when the layer first runs, on the device it runs on. Packing drops the plain tensors, so the weights are held
once. Saving, moving or reloading a packed layer first unpacks it, exactly (tests check the round trip).
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nvila.core.errors import NvilaError


class PackedLinear(nn.Module, ABC):
    """A linear layer ``y = x W^T + b`` whose weight is integers plus scales, packed for its kernel on first use.

    ``PACKED`` names the plain buffers that packing consumes; other buffers (bias, an input scale) stay as they are.
    """

    PACKED: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._packed: Any = None

    @abstractmethod
    def pack(self, plain: dict[str, torch.Tensor]) -> Any:
        """The kernel's form of the plain tensors (on their device); raise NvilaError if the device has no kernel."""

    @abstractmethod
    def unpack(self, packed: Any) -> dict[str, torch.Tensor]:
        """The plain tensors back from the kernel's form, exactly as they were packed."""

    @abstractmethod
    def matmul(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        """``x`` (..., in_features) times the packed weight, plus the bias: (..., out_features)."""

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = self.pack({k: self._buffers[k] for k in self.PACKED})
            for k in self.PACKED:
                self._buffers[k] = None  # the packed form replaces them
            _mark_static(self._packed)
        return self.matmul(x, self._packed)

    def plain(self) -> dict[str, torch.Tensor]:
        """The plain tensors of the packed weight, whether or not the layer has packed them yet."""
        if self._packed is None:
            return {k: self._buffers[k] for k in self.PACKED}
        return self.unpack(self._packed)

    def unpack_(self) -> None:
        """Go back to the plain tensors (packing again on the next forward)."""
        if self._packed is not None:
            for k, v in self.unpack(self._packed).items():
                self._buffers[k] = v
            self._packed = None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            for k, v in self.unpack(self._packed).items():
                destination[prefix + k] = v

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.unpack_()  # the saved integers are copied into the plain buffers, and packed again when next used
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable, recurse: bool = True) -> PackedLinear:
        self.unpack_()  # .to(device) and friends: a layout packed for one device does not move to another
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.is_packed}"


def _mark_static(packed: Any) -> None:
    """Tell ``torch.compile`` that the packed tensors' shapes never change.

    They are plain attributes, not parameters or buffers, so a step compiled with dynamic shapes (compiled
    decoding) would take each of their sizes as a symbol and check every stride at every call: over 1,000 guards,
    evaluated in Python, about 2 ms of a mid-size model's decoding step.
    """
    for tensor in torch.utils._pytree.tree_leaves(packed):
        if isinstance(tensor, torch.Tensor):
            torch._dynamo.mark_static(tensor)
            if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (torchao's): its inner tensors too
                for name in tensor.__tensor_flatten__()[0]:
                    torch._dynamo.mark_static(getattr(tensor, name))


def linear_layers(part: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``part`` by qualified name, minus those matching a ``skip`` pattern.

    A pattern is matched (fnmatch) against the whole name and against its last component, so ``lm_head``
    and ``*.mlp.*`` both work.
    """
    skip = list(skip)
    return {name: m for name, m in part.named_modules() if isinstance(m, nn.Linear) and type(m) is nn.Linear
            and not any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in skip)}


def cast_floating(part: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``part`` in ``dtype``, in place: what a quantizer leaves unquantized (norms,
    embeddings, attention) then computes in the dtype its quantized layers take and return."""
    for param in part.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


def replace_layer(part: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at the qualified ``name`` inside ``part``."""
    parent, _, child = name.rpartition(".")
    setattr(part.get_submodule(parent) if parent else part, child, layer)


def check_widths(layers: dict[str, nn.Linear], multiple: int, setting: str, where: str) -> None:
    """Refuse layers whose input width ``multiple`` does not divide, naming each and the setting to change."""
    bad = [f"{name} (in_features {m.in_features})" for name, m in layers.items() if m.in_features % multiple]
    if bad:
        raise NvilaError(f"{where}: {setting} {multiple} does not divide the input width of {len(bad)} layer(s): "
                         f"{', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}. Choose a {setting} that divides "
                         "every quantized layer's width, or leave those layers out with `skip`.")
