import pytest
import torch

from nvila.compressors.temporal import TemporalAverage, TemporalAverageConfig
from nvila.core.errors import SpecError
from nvila.core.specs import build


@pytest.mark.parametrize("frames,group", [(8, 4), (9, 4), (3, 4), (7, 1), (256, 8), (10, 3)])
def test_consecutive_groups_are_averaged_position_by_position(frames, group):
    video = torch.randn(frames, 5, 3)  # (F, tokens, C)
    pool = TemporalAverage(TemporalAverageConfig(group=group))
    out = pool(video)
    expected = torch.stack([video[i:i + group].mean(0) for i in range(0, frames, group)])
    assert out.shape[0] == -(-frames // group) == pool.output_frames(frames)
    torch.testing.assert_close(out, expected)


def test_a_partial_last_group_is_averaged_over_its_own_frames():
    video = torch.arange(10.0).reshape(10, 1)  # frames 0..9
    out = TemporalAverage(TemporalAverageConfig(group=4))(video)
    assert out.flatten().tolist() == [1.5, 5.5, 8.5]  # (8 + 9) / 2, not (8 + 9 + 0 + 0) / 4


def test_defaults_are_released_nvilas():
    config = TemporalAverageConfig()
    assert (config.group, config.where, config.frame_end) == (8, "after-projector", "\n")


def test_group_larger_than_the_frames_is_refused_naming_the_key_and_range(registry):
    with pytest.raises(SpecError, match=r"key 'group' = 16 is larger than the 8 frames.*valid range 1..8"):
        build("temporal", {"name": "temporal-average", "group": 16, "frames": 8}, registry)
    with pytest.raises(SpecError, match=r"key 'group' = 0 is out of range; valid range 1..frames"):
        build("temporal", {"name": "temporal-average", "group": 0}, registry)
    with pytest.raises(SpecError, match=r"key 'where' = 'before-llm' is not a stage"):
        build("temporal", {"name": "temporal-average", "where": "before-llm"}, registry)
