import torch

from nvila.compressors.tokenlearner import TokenLearner, TokenLearnerConfig


def test_each_token_is_a_weighted_mean_of_the_block():
    torch.manual_seed(0)
    learner = TokenLearner(TokenLearnerConfig(num_tokens=5, hidden=16), in_channels=6)
    v = torch.randn(6)
    out = learner(v.expand(2, 3, 4, 6))  # every position holds the same feature
    torch.testing.assert_close(out, v.expand(2, 5, 6))  # maps sum to one, so each token is v


def test_k_tokens_for_any_grid_and_the_maps_learn():
    learner = TokenLearner(TokenLearnerConfig(num_tokens=3), in_channels=8)
    for h, w in ((1, 1), (5, 7), (16, 16)):
        assert learner(torch.randn(2, h, w, 8)).shape == (2, 3, 8) == (2, *learner.output_shape((h, w), 8))
    learner(torch.randn(2, 4, 4, 8)).pow(2).sum().backward()
    assert learner.score[0].weight.grad.abs().sum() > 0


def test_tokens_depend_on_where_features_are():
    torch.manual_seed(0)
    learner = TokenLearner(TokenLearnerConfig(num_tokens=4), in_channels=8)
    grid = torch.randn(1, 4, 4, 8)
    shuffled = grid.flatten(1, 2)[:, torch.randperm(16)].unflatten(1, (4, 4))
    # a weighted mean over positions is order-invariant: only the content decides the weights
    torch.testing.assert_close(learner(grid), learner(shuffled))
    assert not torch.allclose(learner(grid), learner(grid * 2))
