"""Visual tokens of a multi-block image reach the LLM row by row across the whole map, as NVILA orders them."""

import torch

from nvila.core.model import NvilaModel


def tiny_dyns2_model(registry, tiny_spec, compressor):
    spec = {**tiny_spec, "compressor": compressor,
            "encoder": {"name": "dyns2", "base": {"name": "patches", "image_size": 32, "patch_size": 8},
                        "scales": [32, 64], "max_tiles": 4}}
    return NvilaModel(spec, registry)


def reassemble(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The image's feature map from its row-major blocks (M, h, w, C) -> (rows*h, cols*w, C), written out."""
    return torch.cat([torch.cat(list(blocks[r * cols:(r + 1) * cols]), dim=1) for r in range(rows)], dim=0)


def test_identity_tokens_are_the_whole_map_read_row_by_row(registry, tiny_spec):
    model = tiny_dyns2_model(registry, tiny_spec, {"name": "identity"})
    blocks = torch.randn(2 * 3, 4, 4, 5)  # an image with a 2 x 3 grid of 4 x 4 blocks
    stitched = model._stitch(model.compressor(blocks), [(2, 3)])
    torch.testing.assert_close(stitched, reassemble(blocks, 2, 3).flatten(0, 1), rtol=0, atol=0)


def test_stc_tokens_are_the_stc_of_the_whole_map_read_row_by_row(registry, tiny_spec):
    # NVILA compresses each tile-sized block, projects, then merges the blocks back: with block sides that
    # are multiples of k this is the STC of the whole map, which is what we check against
    model = tiny_dyns2_model(registry, tiny_spec, {"name": "stc", "ratio": 2})
    blocks = torch.randn(3 * 2, 4, 4, 5)
    whole = model.compressor(reassemble(blocks, 3, 2)[None])[0]  # (N, 4C)
    torch.testing.assert_close(model._stitch(model.compressor(blocks), [(3, 2)]), whole, rtol=0, atol=0)


def test_learned_query_compressors_keep_block_order(registry, tiny_spec):
    model = tiny_dyns2_model(registry, tiny_spec, {"name": "tokenlearner"})
    tokens = torch.randn(4, 8, 6)
    torch.testing.assert_close(model._stitch(tokens, [(2, 2)]), tokens.flatten(0, 1))
