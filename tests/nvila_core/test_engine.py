"""The inference engine on a tiny real model: greedy decoding agrees with transformers' own generate, the KV
cache with a full forward, streams with finished answers, batches with requests run alone."""

import logging
import math

import pytest
import torch
from PIL import Image

from nvila.core.engine import ChatRequest, DecodingConfig, Engine, _Detokenizer, chat_turns
from nvila.core.errors import NvilaError
from nvila.core.interfaces import LanguageModel


@pytest.fixture(scope="module")
def model(varied_model):
    return varied_model


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


def image(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def requests():
    """Prompts of different lengths, with and without an image."""
    return [
        ChatRequest(user("<image>\nWhat shape is shown?"), images=[image(1)]),
        ChatRequest(user("hi")),
        ChatRequest([{"role": "system", "content": "Answer briefly."},
                     *user("Count the red squares in the picture, and say where each one is.")]),
    ]


def transformers_generate(model, engine, inputs, max_new_tokens, eos_token_id):
    """transformers' own greedy generate (with its KV cache) on the same input embeddings: (B, T) new ids."""
    return model.llm.model.generate(
        inputs_embeds=engine.embed(inputs), attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
        do_sample=False, use_cache=True, eos_token_id=eos_token_id, pad_token_id=engine.pad_token_id)


def trim(row, eos_token_id):
    """A transformers output row up to and including its first EOS (it pads finished rows afterwards)."""
    row = row.tolist()
    return row[:row.index(eos_token_id) + 1] if eos_token_id in row else row


def test_greedy_decoding_matches_transformers_generate(model, engine, requests):
    inputs = engine.inputs(requests)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths, left-padded
    reference = transformers_generate(model, engine, inputs, 12, engine.eos_token_id)
    answers = engine.generate(requests, DecodingConfig(max_new_tokens=12))
    assert [a.token_ids for a in answers] == [trim(r, engine.eos_token_id) for r in reference]
    assert len({tuple(a.token_ids) for a in answers}) == 3 and all(len(set(a.token_ids)) > 3 for a in answers)


def test_a_sequence_ending_at_eos_stops_while_the_others_go_on_as_in_transformers(model, engine, requests):
    free = engine.generate(requests, DecodingConfig(max_new_tokens=12))
    # take as EOS a token that request 0 emits fourth, first: it must end there, the others go on
    eos = next(t for i, t in enumerate(free[0].token_ids) if i >= 3 and t not in free[0].token_ids[:i])
    eos_engine = Engine(model)
    eos_engine.eos_token_id = eos
    inputs = engine.inputs(requests)
    reference = transformers_generate(model, engine, inputs, 12, eos)
    steps = list(eos_engine.stream(requests, DecodingConfig(max_new_tokens=12)))
    answers = eos_engine.collect(inputs, iter(steps))
    assert [a.token_ids for a in answers] == [trim(r, eos) for r in reference]
    first = answers[0]
    assert first.token_ids[-1] == eos and first.finish_reason == "stop"
    assert first.completion_tokens < 12
    running = [[e.request for e in s.events] for s in steps]
    assert all(0 in r for r in running[:first.completion_tokens])
    assert all(0 not in r for r in running[first.completion_tokens:]) and len(steps) > first.completion_tokens


def test_the_stream_yields_one_token_per_sequence_per_step_and_adds_up_to_generate(engine, requests):
    config = DecodingConfig(max_new_tokens=10)
    steps = list(engine.stream(requests, config))
    answers = engine.generate(requests, config)
    assert [s.index for s in steps] == list(range(10))
    assert all(sorted(e.request for e in s.events) == [0, 1, 2] for s in steps)
    assert all(s.seconds > 0 for s in steps)
    for i, answer in enumerate(answers):
        events = [e for s in steps for e in s.events if e.request == i]
        assert "".join(e.text for e in events) == answer.text
        assert [e.token_id for e in events] == answer.token_ids
        assert [e.finish_reason for e in events] == [None] * 9 + ["length"]
        assert answer.text == engine.tokenizer.decode(answer.token_ids, skip_special_tokens=True)


def test_a_batch_gives_each_request_the_answer_it_gets_alone(engine, requests):
    config = DecodingConfig(max_new_tokens=8)
    together = engine.generate(requests, config)
    alone = [engine.generate([r], config)[0] for r in requests]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert [a.prompt_tokens for a in together] == [a.prompt_tokens for a in alone]


def test_kv_cache_logits_equal_a_full_forward_without_cache(model, engine, requests):
    inputs = engine.inputs(requests)
    state = engine.prefill(inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(4):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            full = model(ids, mask, inputs["pixels"], inputs["grids"], position_ids=positions)["logits"][:, -1]
        torch.testing.assert_close(state.logits, full, atol=1e-4, rtol=1e-4)
        token = state.logits.argmax(-1)  # (B,)
        state = engine.step(state, token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)


def test_prefill_reports_its_parts(model, engine, requests):
    inputs = engine.inputs(requests)
    embeds = engine.embed(inputs)
    from_embeds, whole = engine.prefill(inputs, embeds), engine.prefill(inputs)
    torch.testing.assert_close(from_embeds.logits, whole.logits)
    assert whole.logits.shape == (3, model.llm.output_layer().out_features)
    assert whole.positions.tolist() == (inputs["attention_mask"].sum(1) - 1).tolist()
    answers = engine.generate(requests, DecodingConfig(max_new_tokens=3))
    assert answers[0].visual_tokens == model.tokens_per_block and answers[1].visual_tokens == 0
    assert [a.prompt_tokens for a in answers] == inputs["attention_mask"].sum(1).tolist()
    assert answers[0].prefill_s > 0 and answers[0].decode_tokens_per_s > 0


def test_a_seed_reproduces_a_sampled_answer_and_another_seed_changes_it(engine, requests):
    def sampled(seed, batch=requests):
        return engine.generate(batch, DecodingConfig(max_new_tokens=12, temperature=5.0, seed=seed))

    first, again, other = sampled(1), sampled(1), sampled(2)
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    assert all(a.token_ids != b.token_ids for a, b in zip(first, other))
    assert sampled(1, requests[1:2])[0].token_ids == first[1].token_ids  # its own generator, whatever the batch


def test_a_tiny_nucleus_samples_the_most_likely_token(engine, requests):
    greedy = engine.generate(requests, DecodingConfig(max_new_tokens=8))
    nucleus = engine.generate(requests, DecodingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))
    assert [a.token_ids for a in nucleus] == [a.token_ids for a in greedy]


def test_each_request_can_have_its_own_settings(engine, requests):
    configs = [DecodingConfig(max_new_tokens=2), DecodingConfig(max_new_tokens=6),
               DecodingConfig(max_new_tokens=4, temperature=2.0, seed=5)]
    steps = list(engine.stream(requests, configs))
    assert [sorted(e.request for e in s.events) for s in steps] == [[0, 1, 2]] * 2 + [[1, 2]] * 2 + [[1]] * 2
    answers = engine.generate(requests, configs)
    assert [a.completion_tokens for a in answers] == [2, 6, 4]
    assert all(a.finish_reason == "length" for a in answers)
    assert answers[2].token_ids == engine.generate(requests[2:], configs[2])[0].token_ids


def stop_across_tokens(engine, request):
    """A stop string that starts inside one token's text and ends inside the next one's, and the greedy answer."""
    steps = list(engine.stream([request], DecodingConfig(max_new_tokens=16)))
    pieces = [s.events[0].text for s in steps]
    text = "".join(pieces)
    for i in range(len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        stop = a[-2:] + b[:1]
        if len(a) >= 3 and b and text.find(stop) == len("".join(pieces[:i])) + len(a) - 2:
            return stop, text
    pytest.fail(f"no two neighbouring tokens to split a stop string across in {pieces}")


def test_a_stop_string_split_across_tokens_ends_the_answer_without_it(engine, requests):
    stop, text = stop_across_tokens(engine, requests[2])
    config = DecodingConfig(max_new_tokens=16, stop=("never seen here", stop))
    steps = list(engine.stream([requests[2]], config))
    (answer,) = engine.generate([requests[2]], config)
    assert answer.text == text[:text.index(stop)] and stop not in answer.text
    assert answer.finish_reason == "stop" and answer.completion_tokens < 16
    assert "".join(s.events[0].text for s in steps) == answer.text  # nothing of the stop string was streamed
    assert steps[-1].events[0].finish_reason == "stop"


def test_the_detokenizer_holds_back_a_possible_stop_string_and_unfinished_characters(model):
    tokenizer = model.tokenizer
    text = "red circle. STOP here, café ☕ ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    plain = _Detokenizer(tokenizer, ())
    deltas = [plain.add(t)[0] for t in ids] + [plain.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    stopping = _Detokenizer(tokenizer, (" STOP",))
    out = []
    for t in ids:
        delta, stopped = stopping.add(t)
        out.append(delta)
        if stopped:
            break
    assert stopped and "".join(out) == "red circle." and all("S" not in d for d in out)


def test_max_new_tokens_ends_an_answer_with_length(engine, requests):
    (answer,) = engine.generate(requests[:1], DecodingConfig(max_new_tokens=1))
    assert answer.completion_tokens == 1 and answer.finish_reason == "length" and math.isnan(answer.decode_tokens_per_s)


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number of at least 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -1}, "temperature must be 0 .greedy. or a positive number, got -1"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -3}, "seed must be a whole number"),
    ({"stop": ("",)}, "stop must be non-empty strings"),
])
def test_bad_settings_are_refused_with_a_clear_error(settings, message):
    with pytest.raises(NvilaError, match=f"Invalid decoding settings: .*{message}"):
        DecodingConfig(**settings)


def test_every_problem_in_the_settings_is_reported_at_once():
    with pytest.raises(NvilaError, match="max_new_tokens.*temperature.*top_p"):
        DecodingConfig(max_new_tokens=-1, temperature=-1, top_p=2)


def test_a_single_stop_string_is_accepted_as_a_tuple_of_one():
    assert DecodingConfig(stop="###").stop == ("###",)


def frames(n, seed=0):
    return [image(seed + i) for i in range(n)]


def test_images_and_a_video_in_one_conversation_as_parts_or_placeholders(engine):
    video, pictures = frames(8, seed=10), [image(3), image(4)]
    parts = ChatRequest([{"role": "user", "content": [
        {"type": "image", "image": pictures[0]}, {"type": "video", "video": video},
        {"type": "image", "image": pictures[1]}, {"type": "text", "text": "What changes?"}]}])
    placeholders = ChatRequest(user("<image>\n<video>\n<image>\nWhat changes?"), images=pictures, videos=[video])
    assert chat_turns(parts)[0] == chat_turns(placeholders)[0]
    config = DecodingConfig(max_new_tokens=6)
    a, b = engine.generate([parts], config)[0], engine.generate([placeholders], config)[0]
    assert a.token_ids == b.token_ids
    per_block = engine.model.tokens_per_block
    assert a.visual_tokens == (2 + engine.model.temporal.output_frames(8)) * per_block
    blue = [Image.new("RGB", (32, 32), (0, 0, 255))] * 8
    other = ChatRequest(placeholders.messages, images=pictures, videos=[blue])
    logits = [engine.prefill(engine.inputs([r])).logits for r in (placeholders, other)]
    assert not torch.allclose(*logits)  # the video reaches the answer


def test_llava_turns_and_a_conversation_history_are_accepted(engine):
    history = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
               {"from": "human", "value": "And the shape?"}]
    (answer,) = engine.generate([ChatRequest(history, images=[image()])], DecodingConfig(max_new_tokens=3))
    assert answer.completion_tokens == 3


@pytest.mark.parametrize(("request_", "message"), [
    (ChatRequest([]), "at least one message"),
    (ChatRequest([{"role": "robot", "content": "hi"}]), "role 'robot' is not one of system, user, assistant"),
    (ChatRequest([{"role": "user", "content": 3}]), "content must be text or a list of parts"),
    (ChatRequest([{"role": "user", "content": [{"type": "audio"}]}]), "content part .* is not one of"),
    (ChatRequest(user("hi"), images=[image()]), r"0 <image> placeholder\(s\) but 1 image\(s\)"),
    (ChatRequest([*user("hi"), {"role": "assistant", "content": "hello"}]), "last message is the assistant's"),
    (ChatRequest([{"role": "user", "content": [{"type": "image", "image": image()}]}], images=[image()]),
     "either as content parts or in the request's images"),
])
def test_malformed_requests_are_refused_with_a_clear_error(engine, request_, message):
    with pytest.raises(NvilaError, match=message):
        engine.generate([request_])


def test_a_bad_request_in_a_batch_is_named(engine, requests):
    with pytest.raises(NvilaError, match="request 1: "):
        engine.generate([requests[0], ChatRequest([])])


def test_the_nvila_model_generate_wrapper_goes_through_the_engine(model, engine, requests):
    inputs = engine.inputs(requests)
    new = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixels"], inputs["grids"],
                         max_new_tokens=5)
    assert new.tolist() == [a.token_ids for a in engine.generate(requests, DecodingConfig(max_new_tokens=5))]


def test_a_language_model_without_a_kv_cache_still_generates_the_same_answer(model, engine, requests, caplog):
    class NoCache(type(model.llm)):
        forward_with_cache = LanguageModel.forward_with_cache

    reference = engine.generate(requests, DecodingConfig(max_new_tokens=6))
    original = model.llm.__class__
    model.llm.__class__ = NoCache
    try:
        with caplog.at_level(logging.WARNING):
            answers = engine.generate(requests, DecodingConfig(max_new_tokens=6))
    finally:
        model.llm.__class__ = original
    assert [a.token_ids for a in answers] == [a.token_ids for a in reference]
    assert "NoCache has no KV cache" in caplog.text and "recomputes the whole sequence" in caplog.text


def test_a_system_message_the_chat_template_refuses_is_a_clear_error(engine, requests):
    tokenizer = engine.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + original)
    try:
        with pytest.raises(NvilaError, match="chat template refused the conversation: System role not supported"):
            engine.generate([requests[2]])
        assert engine.generate([requests[1]], DecodingConfig(max_new_tokens=2))[0].completion_tokens == 2
    finally:
        tokenizer.chat_template = original
