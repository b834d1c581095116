"""The public test kit catches a compressor that breaks its contract (so passing it means something)."""

import pytest
import torch

from nvila.compressors.identity import IdentityConfig
from nvila.core.interfaces import Compressor, Quantizer
from nvila.core.registry import Registry
from nvila.core.testing import ContractError, check_component


class MiscountingCompressor(Compressor):
    """Pools to a fixed 2x2 grid but claims one token per 2x2 block (wrong for odd grids)."""

    def __init__(self, config, in_channels=None):
        super().__init__()

    def output_shape(self, block_size, channels):
        return (block_size[0] // 2) * (block_size[1] // 2), channels

    def forward(self, blocks):
        x = torch.nn.functional.adaptive_avg_pool2d(blocks.permute(0, 3, 1, 2), (blocks.shape[1] // 2,
                                                                                 -(-blocks.shape[2] // 2)))
        return x.flatten(2).transpose(1, 2)  # (M, n, C)


class BatchMixingCompressor(Compressor):
    """Right shapes, but normalises over the whole batch, so a block's tokens depend on its neighbours."""

    def __init__(self, config, in_channels=None):
        super().__init__()

    def output_shape(self, block_size, channels):
        return block_size[0] * block_size[1], channels

    def forward(self, blocks):
        return (blocks - blocks.mean(0)).flatten(1, 2)  # (M, h*w, C)


def refusal_of(kind, factory):
    """The kit's verdict on a plugin of ``kind`` built by ``factory`` (raises ContractError when it refuses)."""
    registry = Registry()
    registrar = registry.registrar("broken-plugin", "0.1")
    registrar.add(kind, "broken", factory, IdentityConfig)
    registrar.commit()
    check_component(registry.get(kind, "broken"), registry)


@pytest.mark.parametrize("factory,message", [(MiscountingCompressor, "output_shape promised"),
                                             (BatchMixingCompressor, "depend on the other blocks")])
def test_the_kit_refuses_broken_compressors(factory, message):
    with pytest.raises(ContractError, match=message):
        refusal_of("compressor", factory)


class ZeroingQuantizer(Quantizer):
    """'Quantizes' by zeroing every weight: the outputs are nothing like full precision."""

    def __init__(self, config):
        pass

    def quantize(self, part, calibrate=None):
        names = [n for n, m in part.named_modules() if isinstance(m, torch.nn.Linear)]
        for m in part.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data.zero_()
        return names


class TorchAoQuantizer(Quantizer):
    """torch.ao's dynamic int8 modules: fast, but their state dict holds quantized tensors (pickled to save)."""

    def __init__(self, config):
        pass

    def quantize(self, part, calibrate=None):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(part, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        return ["0", "2"]


@pytest.mark.parametrize("factory,message", [(ZeroingQuantizer, "'quantized output' check: relative error"),
                                             (TorchAoQuantizer, "'plain state dict' check")])
def test_the_kit_refuses_broken_quantizers(factory, message):
    with pytest.raises(ContractError, match=message):
        refusal_of("quantizer", factory)
