"""Continuous batching on a tiny real model: requests that join a running decode at different steps, leave it
when they finish, or are cancelled, each get the answer the engine gives them alone."""

import pytest
import torch
from PIL import Image

from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.core.errors import NvilaError
from nvila.core.interfaces import LanguageModel
from nvila.core.scheduler import Scheduler


@pytest.fixture(scope="module")
def engine(varied_model):
    return Engine(varied_model)


def image(seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())


def user(text):
    return [{"role": "user", "content": text}]


REQUESTS = [
    ChatRequest(user("<image>\nWhat shape is shown?"), images=[image(1)]),
    ChatRequest(user("hi")),
    ChatRequest([{"role": "system", "content": "Answer briefly."},
                 *user("Count the red squares in the picture, and say where each one is.")]),
    ChatRequest(user("<image>\n<image>\nWhich is bigger?"), images=[image(2), image(3)]),
    ChatRequest(user("Tell me a long story about a blue circle.")),
]


def alone(engine, request, config):
    return engine.generate([request], config)[0].token_ids


def run(scheduler, arrivals, cancel_at=None):
    """Submit (step, request, config) arrivals at their steps; run to the end. Token ids per sequence id."""
    engine = scheduler.engine
    tokens, reasons, ids = {}, {}, {}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or not scheduler.idle:
        while pending and pending[0][0] <= step:
            _, i, config = pending.pop(0)
            ids[i] = scheduler.submit(engine.encode(REQUESTS[i]), config)
        if cancel_at and step == cancel_at[0]:
            scheduler.cancel(ids[cancel_at[1]])
        tick = scheduler.step()
        assert not tick.failed
        for event in tick.events:
            tokens.setdefault(event.request, []).append(event.token_id)
            if event.finish_reason:
                reasons[event.request] = event.finish_reason
        step += 1
        assert step < 500
    return {i: tokens.get(s, []) for i, s in ids.items()}, {i: reasons.get(s) for i, s in ids.items()}


def test_requests_joining_at_different_steps_get_the_answers_they_get_alone(engine):
    configs = [DecodingConfig(max_new_tokens=n) for n in (9, 4, 12, 7, 15)]
    scheduler = Scheduler(engine, max_batch=8)
    got, reasons = run(scheduler, [(0, 0, configs[0]), (0, 1, configs[1]), (2, 2, configs[2]),
                                   (3, 3, configs[3]), (9, 4, configs[4])])
    for i, config in enumerate(configs):
        assert got[i] == alone(engine, REQUESTS[i], config), i
        assert reasons[i] in ("stop", "length")
    assert scheduler.peak_batch >= 3 and scheduler.idle


def test_a_full_batch_makes_requests_wait_and_prefills_one_per_step(engine):
    config = DecodingConfig(max_new_tokens=5)
    scheduler = Scheduler(engine, max_batch=2)
    for i in range(4):
        scheduler.submit(engine.encode(REQUESTS[i]), config)
    first = scheduler.step()
    assert first.admitted == (0,) and first.batch == 1 and scheduler.waiting == 3
    second = scheduler.step()
    assert second.admitted == (1,) and second.batch == 2 and scheduler.waiting == 2
    got, _ = {}, None
    while not scheduler.idle:
        tick = scheduler.step()
        assert tick.batch <= 2
        for event in tick.events:
            got.setdefault(event.request, []).append(event.token_id)
    assert scheduler.peak_batch == 2
    assert got[3] == alone(engine, REQUESTS[3], config)


def test_several_requests_can_be_prefilled_together(engine):
    config = DecodingConfig(max_new_tokens=6)
    scheduler = Scheduler(engine, max_batch=8, prefill_batch=3)
    got, _ = run(scheduler, [(0, i, config) for i in range(4)])
    assert all(got[i] == alone(engine, REQUESTS[i], config) for i in range(4))


def test_a_cancelled_sequence_leaves_the_batch_and_the_others_go_on(engine):
    config = DecodingConfig(max_new_tokens=12)
    scheduler = Scheduler(engine, max_batch=8)
    got, reasons = run(scheduler, [(0, 0, config), (0, 2, config), (1, 4, config)], cancel_at=(4, 2))
    # admitted at step 1 (one prefill per step), a token at steps 1-3, then gone at 4 without a finish
    assert len(got[2]) == 3 and reasons[2] is None
    assert got[0] == alone(engine, REQUESTS[0], config) and got[4] == alone(engine, REQUESTS[4], config)
    queued = scheduler.submit(engine.encode(REQUESTS[1]), config)
    scheduler.cancel(queued)
    assert scheduler.step().events == () and scheduler.idle  # a waiting request can be cancelled too


def test_a_seeded_sample_does_not_depend_on_its_batch_mates(engine):
    sampled = DecodingConfig(max_new_tokens=10, temperature=3.0, seed=7)
    scheduler = Scheduler(engine)
    got, _ = run(scheduler, [(0, 1, DecodingConfig(max_new_tokens=4)), (2, 2, sampled)])
    assert got[2] == alone(engine, REQUESTS[2], sampled)


def test_join_and_keep_give_the_logits_of_each_sequence_alone(engine):
    states = [engine.prefill(engine.inputs([r])) for r in REQUESTS[:3]]
    reference = [s.logits for s in states]
    states = [engine.prefill(engine.inputs([r])) for r in REQUESTS[:3]]
    joined = engine.join(states)
    assert joined.attention_mask.shape == (3, max(s.attention_mask.shape[1] for s in states))
    torch.testing.assert_close(joined.logits, torch.cat(reference))
    tokens = joined.logits.argmax(-1)
    stepped = engine.step(joined, tokens)
    for i in range(3):
        one = engine.step(engine.prefill(engine.inputs([REQUESTS[i]])), tokens[i:i + 1])
        torch.testing.assert_close(stepped.logits[i:i + 1], one.logits, atol=1e-4, rtol=1e-4)
    kept = engine.keep(stepped, [1])  # the shortest prompt: its left padding is cut off
    assert kept.attention_mask.shape[1] == int(kept.attention_mask.sum()) and kept.attention_mask.all()
    again = engine.step(kept, tokens[1:2])
    one = engine.step(engine.step(engine.prefill(engine.inputs([REQUESTS[1]])), tokens[1:2]), tokens[1:2])
    torch.testing.assert_close(again.logits, one.logits, atol=1e-4, rtol=1e-4)


def test_the_recomputing_cache_of_a_backbone_without_kv_cache_joins_too(varied_model, engine):
    class NoCache(type(varied_model.llm)):
        forward_with_cache = LanguageModel.forward_with_cache
        select_cache = LanguageModel.select_cache
        concat_caches = LanguageModel.concat_caches

    config = DecodingConfig(max_new_tokens=5)
    reference = [alone(engine, REQUESTS[i], config) for i in (1, 2)]
    original = varied_model.llm.__class__
    varied_model.llm.__class__ = NoCache
    try:
        got, _ = run(Scheduler(engine), [(0, 1, config), (2, 2, config)])
    finally:
        varied_model.llm.__class__ = original
    assert [got[1], got[2]] == reference


def test_a_failing_prefill_fails_its_request_only(engine, monkeypatch):
    config = DecodingConfig(max_new_tokens=6)
    scheduler = Scheduler(engine)
    first = scheduler.submit(engine.encode(REQUESTS[1]), config)
    scheduler.step()
    real = engine.prefill

    def broken(inputs, embeds=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "prefill", broken)
    second = scheduler.submit(engine.encode(REQUESTS[2]), config)
    tick = scheduler.step()
    monkeypatch.setattr(engine, "prefill", real)
    assert tick.failed == {second: "prefill failed: RuntimeError: out of memory"}
    assert [e.request for e in tick.events] == [first]
    while not scheduler.idle:
        scheduler.step()


@pytest.mark.parametrize("settings", [{"max_batch": 0}, {"prefill_batch": 1.5}, {"prefill_tokens": 0}])
def test_bad_batch_settings_are_refused(engine, settings):
    with pytest.raises(NvilaError, match="must be a whole number of at least 1"):
        Scheduler(engine, **settings)


def test_a_prefill_holds_at_most_prefill_tokens_once_padded_and_a_longer_prompt_goes_alone(engine):
    config = DecodingConfig(max_new_tokens=3)
    lengths = [len(engine.encode(r).input_ids) for r in REQUESTS[:3]]
    scheduler = Scheduler(engine, max_batch=8, prefill_batch=8, prefill_tokens=2 * max(lengths))
    for i in range(3):
        scheduler.submit(engine.encode(REQUESTS[i]), config)
    assert len(scheduler.step().admitted) == 2  # a third prompt would pad the prefill past the budget
    assert len(scheduler.step().admitted) == 1
    alone_too_long = Scheduler(engine, max_batch=8, prefill_batch=8, prefill_tokens=1)
    for i in range(2):
        alone_too_long.submit(engine.encode(REQUESTS[i]), config)
    assert [len(alone_too_long.step().admitted) for _ in range(2)] == [1, 1]
