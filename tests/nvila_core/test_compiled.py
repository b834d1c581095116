"""Compiled decoding (``Engine(model, compile_decode=True)``): the same answers as eager decoding, one compile per
batch shape (not one per step as the cache grows), and a clear refusal where torch.compile cannot build kernels."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from nvila.core import compiled
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.core.errors import NvilaError

REQUESTS = [ChatRequest([{"role": "user", "content": "hi"}]),
            ChatRequest([{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Count the red squares in the picture, and say where."}])]


@pytest.mark.slow
def test_compiled_decoding_answers_as_eager_decoding_and_compiles_once_per_batch_shape(varied_model):
    torch._dynamo.reset()
    eager, fast = Engine(varied_model), Engine(varied_model, compile_decode=True)
    config = DecodingConfig(max_new_tokens=12)
    fast.warm_up((1, 2))
    counters.clear()
    for batch in ([REQUESTS[0]], REQUESTS, [REQUESTS[1]]):
        assert [a.token_ids for a in fast.generate(batch, config)] == \
               [a.token_ids for a in eager.generate(batch, config)]
    assert counters["stats"]["unique_graphs"] == 0  # after the warm-up, a growing cache compiles nothing new


@pytest.mark.slow
def test_compiled_decoding_writes_into_the_growing_cache_and_grows_it_without_compiling_again(varied_model):
    eager, fast = Engine(varied_model), Engine(varied_model, compile_decode=True)
    fast.warm_up((2,))
    counters.clear()
    slow_state = eager.prefill(eager.inputs(REQUESTS))
    fast_state = copy.deepcopy(slow_state)  # steps write into the cache in place: each engine gets its own
    capacities, after_growth = [], 0
    while after_growth < 3:  # until the prompts' room (half again what they hold) has run out and grown
        token = slow_state.logits.argmax(-1)
        slow_state, fast_state = eager.step(slow_state, token), fast.step(fast_state, token)
        torch.testing.assert_close(fast_state.logits, slow_state.logits, rtol=1e-4, atol=1e-4)
        layer = fast_state.cache.layers[0]
        assert layer.keys.data_ptr() == layer.key_room.data_ptr()  # the step wrote into the room
        capacities.append(layer.key_room.shape[-2])
        after_growth += capacities[-1] != capacities[0]
        assert len(capacities) < 200
    assert counters["stats"]["unique_graphs"] == 0  # and never compiled again


@pytest.mark.slow
def test_compiled_logits_match_eager_logits(varied_model):
    eager, fast = Engine(varied_model), Engine(varied_model, compile_decode=True)
    state = eager.prefill(eager.inputs(REQUESTS))
    token = state.logits.argmax(-1)
    fast_state = copy.deepcopy(state)  # a step writes into its cache in place
    torch.testing.assert_close(fast.step(fast_state, token).logits, eager.step(state, token).logits, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.slow
def test_two_models_of_one_class_each_run_their_own_compiled_step(varied_model):
    quantized = copy.deepcopy(varied_model)
    quantized.quantize({"llm": {"name": "w4a16", "method": "rtn", "group_size": 32}})  # other layers, same class
    for model in (varied_model, quantized):
        eager, fast = Engine(model), Engine(model, compile_decode=True)
        state = eager.prefill(eager.inputs(REQUESTS[:1]))
        token = state.logits.argmax(-1)
        a, b = fast.step(copy.deepcopy(state), token).logits, eager.step(state, token).logits  # each its own cache
        # fp32: the same sums in another order; W4A16's 16-bit activations: compiled kernels skip some of eager's
        # roundings to bf16 between ops (measured: 3e-7 and 1.0e-2 relative)
        tolerance = 1e-5 if model is varied_model else 3e-2
        assert float((a - b).norm() / b.norm()) < tolerance and torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_step_that_cannot_be_captured_whole_is_refused_by_name():
    class Unsplittable:
        def forward_with_cache(self, x):
            torch._dynamo.graph_break()
            return x + 1

    with pytest.raises(NvilaError, match="Unsplittable's decoding step cannot be compiled as one graph"):
        compiled.compile_step(Unsplittable(), torch.device("cpu"))(torch.ones(2))


def test_without_a_cpu_compiler_compiling_is_refused_naming_what_to_install(varied_model, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(NvilaError, match=r"needs a C\+\+ compiler.*g\+\+.*drop --compile"):
        Engine(varied_model, compile_decode=True)


def test_a_device_torch_compile_has_no_backend_for_is_refused():
    with pytest.raises(NvilaError, match="runs on CPUs and CUDA GPUs, not on mps"):
        compiled.check_compilable(torch.device("mps"))
