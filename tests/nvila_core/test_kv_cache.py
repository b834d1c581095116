"""The growing KV cache: decoding writes in place into spare room, with the answers of transformers' concatenation."""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from nvila.core import kv_cache
from nvila.plugins.configs import Qwen2LMConfig
from nvila.plugins.qwen2 import Qwen2LM


def prefilled(model, length=40):
    embeds = torch.randn(2, length, model.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _, cache = model.forward_with_cache(embeds, mask, positions)
    return cache, mask, positions[:, -1:]


def decode(model, cache, mask, position, steps, reserve):
    logits = []
    for i in range(steps):
        if reserve:
            kv_cache.reserve(cache, 1)
        token = torch.randn(2, 1, model.hidden_size, generator=torch.Generator().manual_seed(100 + i))
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        out, cache = model.forward_with_cache(token, mask, position + i + 1, cache)
        logits.append(out)
    return torch.cat(logits, 1), cache


@torch.no_grad()
def test_decoding_in_place_equals_concatenating_through_a_reallocation(monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_ROOM", 4)
    torch.manual_seed(0)
    model = Qwen2LM(Qwen2LMConfig()).eval()
    cache, mask, position = prefilled(model)
    assert all(isinstance(layer, kv_cache.GrowingLayer) for layer in cache.layers)
    plain = DynamicCache(config=model.model.config)
    for ours, theirs in zip(cache.layers, plain.layers):  # the same prompt state, appended to by torch.cat
        theirs.lazy_initialization(ours.keys, ours.values)
        theirs.keys, theirs.values = ours.keys.clone(), ours.values.clone()
    assert type(plain.layers[0]) is DynamicLayer
    rooms = []
    steps = 30  # past the first room (40 // 2 = 20 positions), so one reallocation happens
    expected, _ = decode(model, plain, mask, position, steps, reserve=False)
    kv_cache.reserve(cache, 1)
    rooms.append(cache.layers[0].key_room.data_ptr())
    got, cache = decode(model, cache, mask, position, steps, reserve=True)
    rooms.append(cache.layers[0].key_room.data_ptr())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == 40 + steps and layer.keys.data_ptr() == layer.key_room.data_ptr()
    assert rooms[0] != rooms[1]  # it grew once


@torch.no_grad()
def test_a_layer_whose_keys_were_replaced_gets_fresh_room():
    torch.manual_seed(0)
    model = Qwen2LM(Qwen2LMConfig()).eval()
    cache, _, _ = prefilled(model)
    kv_cache.reserve(cache, 1)
    kept = model.select_cache(cache, torch.tensor([1]), start=7)  # drop the first sequence and its padding
    layer = kept.layers[0]
    assert layer.key_room is None and layer.keys.shape == (1, 2, 33, 32)
    kv_cache.reserve(kept, 1)
    assert torch.equal(layer.key_room[:, :, :33], layer.keys) and layer.key_room.shape[-2] >= 34
