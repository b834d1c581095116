import torch

from nvila.compressors.perceiver import PerceiverConfig, PerceiverResampler


def test_k_latents_for_any_grid_and_width():
    for channels in (8, 12, 30):
        resampler = PerceiverResampler(PerceiverConfig(num_latents=5, depth=2, heads=3, head_dim=4),
                                       in_channels=channels)
        for h, w in ((1, 1), (3, 5), (8, 8)):
            out = resampler(torch.randn(2, h, w, channels))
            assert out.shape == (2, *resampler.output_shape((h, w), channels)) == (2, 5, channels)


def test_latents_read_the_features_and_everything_trains():
    torch.manual_seed(0)
    resampler = PerceiverResampler(PerceiverConfig(num_latents=4, depth=2), in_channels=16)
    a, b = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 16)
    assert not torch.allclose(resampler(a), resampler(b))
    resampler(a).pow(2).sum().backward()
    assert resampler.latents.grad.abs().sum() > 0
    assert all(p.grad is not None for p in resampler.parameters())


def test_cross_attention_treats_the_features_as_a_set():
    torch.manual_seed(0)
    resampler = PerceiverResampler(PerceiverConfig(num_latents=3, depth=3), in_channels=8).eval()
    grid = torch.randn(2, 3, 5, 8)
    shuffled = grid.flatten(1, 2)[:, torch.randperm(15)].unflatten(1, (3, 5))
    torch.testing.assert_close(resampler(grid), resampler(shuffled), atol=1e-5, rtol=1e-5)
