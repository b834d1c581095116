"""Video through the model: frames encoded in one batch, compressed, projected, pooled over time, spliced."""

import pytest
import torch
from PIL import Image

from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.core.processor import IGNORE_INDEX, collate


def tiny_model(tiny_spec, registry, **temporal):
    torch.manual_seed(0)
    spec = {**tiny_spec, "temporal": {"name": "temporal-average", **temporal}}
    return NvilaModel(spec, registry).eval()


def frames(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def ask(model, videos, images=(), text="<video>\nWhat happens?"):
    turns = [{"from": "human", "value": text}, {"from": "gpt", "value": "a circle"}]
    return model.processor.encode(turns, images, videos=videos)


def test_a_video_expands_to_pooled_frames_each_ended_by_a_newline(tiny_spec, registry):
    model = tiny_model(tiny_spec, registry, group=2, frame_end="\n")
    enc = ask(model, [frames(5)])
    newline = model.tokenizer("\n", add_special_tokens=False).input_ids
    ids = enc.input_ids.tolist()
    start = ids.index(model.video_token_id)
    frame = [model.video_token_id] * model.tokens_per_block + newline  # 4 tokens (STC 2x2 of 4x4) + "\n"
    assert ids[start:start + 3 * len(frame)] == frame * 3  # ceil(5 / 2) = 3 pooled frames
    assert model.processor.video_tokens(5) == 3 * len(frame) == ids.count(model.video_token_id) + 3 * len(newline)
    assert (enc.labels[start:start + 3 * len(frame)] == IGNORE_INDEX).all()
    assert enc.videos.shape == (5, 3, 32, 32) and enc.video_grids == [(5, 1, 1)]


def test_nvila_pooling_averages_projected_frame_tokens_and_keeps_a_partial_last_group(tiny_spec, registry):
    model = tiny_model(tiny_spec, registry, group=2, where="after-projector")
    enc = ask(model, [frames(5)])
    with torch.no_grad():
        pooled = model.video_tokens(enc.videos, enc.video_grids).unflatten(0, (3, -1))  # (F', n, D)
        per_frame = model.visual_tokens(enc.videos, [(1, 1)] * 5).unflatten(0, (5, -1))  # (F, n, D)
    torch.testing.assert_close(pooled[0], per_frame[:2].mean(0))
    torch.testing.assert_close(pooled[2], per_frame[4])  # the fifth frame alone, not diluted by padding


def test_where_decides_the_stage_that_is_pooled(tiny_spec, registry):
    out = {}
    for where in ("after-encoder", "after-compressor", "after-projector"):
        model = tiny_model(tiny_spec, registry, group=3, where=where)
        enc = ask(model, [frames(6)])
        with torch.no_grad():
            out[where] = model.video_tokens(enc.videos, enc.video_grids)
    # STC is a linear reshape, so pooling before or after it is the same; the projector's MLP is not linear
    torch.testing.assert_close(out["after-encoder"], out["after-compressor"])
    assert not torch.allclose(out["after-compressor"], out["after-projector"], atol=1e-4)


def test_videos_and_images_in_one_batch_reach_the_language_model(tiny_spec, registry):
    model = tiny_model(tiny_spec, registry, group=4)
    a = ask(model, [frames(8, seed=1)], images=frames(1), text="<image>\n<video>\nSame?")
    b = ask(model, [frames(3, seed=2), frames(4, seed=3)], text="<video><video>\nWhich?")
    batch = collate([a, b], model.tokenizer.pad_token_id)
    assert batch["video_grids"] == [(8, 1, 1), (3, 1, 1), (4, 1, 1)] and batch["videos"].shape[0] == 15
    with torch.no_grad():
        out = model(**batch)
        alone = model(**collate([b], model.tokenizer.pad_token_id))
        other = model(**{**batch, "videos": batch["videos"].flip(-1)})
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["logits"][1, : alone["logits"].shape[1]], alone["logits"][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["logits"], other["logits"])
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["grids"],
                         max_new_tokens=2, videos=batch["videos"], video_grids=batch["video_grids"])
    assert new.shape[0] == 2


def test_images_do_not_pass_through_the_temporal_compressor(tiny_spec, registry):
    image = frames(1)
    logits = []
    for group in (1, 8):
        model = tiny_model(tiny_spec, registry, group=group)
        batch = collate([ask(model, [], images=image, text="<image>\nWhat?")], model.tokenizer.pad_token_id)
        with torch.no_grad():
            logits.append(model(**batch)["logits"])
    torch.testing.assert_close(*logits)


def test_a_group_larger_than_the_frames_is_refused_when_the_model_is_built(tiny_spec, registry):
    with pytest.raises(NvilaError, match=r"(?s)temporal.*'group' = 8 is larger than the 4 frames.*valid range 1..4"):
        tiny_model(tiny_spec, registry, group=8, frames=4)


def test_a_video_without_placeholder_is_refused(tiny_spec, registry):
    model = tiny_model(tiny_spec, registry)
    with pytest.raises(ValueError, match=r"0 <video> placeholder\(s\) but 1 video\(s\)"):
        ask(model, [frames(2)], text="no placeholder here")
