"""Token merging itself: hand-worked matches, exact means, exact token counts, raster order."""

import pytest
import torch

from nvila_tome.merge import TokenMerging, TokenMergingConfig, merge_tokens


def test_the_most_similar_pairs_merge_first_and_survivors_keep_raster_order():
    # raster positions 0..3, A = {0, 2}, B = {1, 3}; cos(t2, t3) = 1 beats cos(t0, t1) = 0.995
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 2.0]]])  # (1, 4, 2)
    out, size = merge_tokens(x, target=2, merge_fraction=0.5)  # one merge per round
    # round 1: t2 -> t3 = (0, 1.5); round 2 (A = {t0, t23}, B = {t1}): t0 -> t1 = (1, 0.05)
    assert torch.allclose(out, torch.tensor([[[1.0, 0.05], [0.0, 1.5]]]))
    assert size.flatten().tolist() == [2.0, 2.0]


def test_size_weighted_merges_are_means_of_the_originals():
    x = torch.randn(3, 36, 5)
    out, size = merge_tokens(x, target=5, merge_fraction=0.3)
    assert out.shape == (3, 5, 5) and size.sum(dim=(1, 2)).tolist() == [36.0] * 3
    # each output token is the mean of the originals it stands for, so size-weighted sums are conserved
    assert torch.allclose((out * size).sum(1), x.sum(1), atol=1e-5)


def test_plain_means_weight_each_merge_equally():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])  # (1, 3, 2): A = {t0, t2}, B = {t1}
    # round 1: t0 -> t1 (size 2); round 2: the pair merges into t2
    weighted, _ = merge_tokens(x, target=1, size_weighted=True)
    plain, size = merge_tokens(x, target=1, size_weighted=False)
    assert torch.allclose(weighted, x.mean(1, keepdim=True))  # (2/3, 1.1/3): the mean of the originals
    assert torch.allclose(plain, torch.tensor([[[0.5, 0.525]]]))  # mean of (1, 0.05) and (0, 1)
    assert size.item() == 3.0  # sizes count originals either way


@pytest.mark.parametrize("h, w, ratio, fraction", [(6, 6, 4, 0.5), (5, 7, 3, 1.0), (4, 4, 1, 0.5), (1, 3, 8, 0.1)])
def test_output_shape_is_exact(h, w, ratio, fraction):
    compressor = TokenMerging(TokenMergingConfig(ratio=ratio, merge_fraction=fraction))
    tokens = compressor(torch.randn(2, h, w, 8))
    assert tuple(tokens.shape) == (2, *compressor.output_shape((h, w), 8))


def test_low_precision_blocks_merge_in_float32_and_come_back_in_their_dtype():
    blocks = torch.randn(2, 16, 16, 4)
    compressor = TokenMerging(TokenMergingConfig())
    tokens = compressor(blocks.bfloat16())
    assert tokens.dtype == torch.bfloat16
    assert torch.allclose(tokens.float(), compressor(blocks.bfloat16().float()), atol=1e-2)


def test_ratio_one_keeps_every_token_in_order():
    blocks = torch.randn(2, 3, 4, 6)
    assert torch.equal(TokenMerging(TokenMergingConfig(ratio=1))(blocks), blocks.flatten(1, 2))


def test_gradients_reach_every_original_token():
    x = torch.randn(2, 16, 3, requires_grad=True)
    out, size = merge_tokens(x, target=4)
    (out * size).sum().backward()  # each original counts once in its merged token's mean times size
    assert torch.allclose(x.grad, torch.ones_like(x.grad))


@pytest.mark.parametrize("bad", [{"ratio": 0}, {"merge_fraction": 0.0}, {"merge_fraction": 1.5}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TokenMergingConfig(**bad)
