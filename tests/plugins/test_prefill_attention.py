"""Prefill attention: unmasked bf16 queries on CPUs by nvila's kernel, equal to SDPA in fp64 and to transformers'
eager attention in the models that run it; everything else (training, fp32, masks, no kernel) on SDPA unchanged."""

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from nvila.encoders.configs import SiglipConfig
from nvila.encoders.siglip import SiglipEncoder
from nvila.plugins import attention
from nvila.plugins.configs import Qwen2LMConfig
from nvila.plugins.qwen2 import Qwen2LM

KERNEL = pytest.mark.skipif(attention.PREFILL_KERNEL.missing() is not None,
                            reason=f"nvila's prefill attention kernel: {attention.PREFILL_KERNEL.missing()}")


pytestmark = pytest.mark.usefixtures("native_ops")  # the kernel's ops, for the tests that call them directly


def qkv(batch, heads, kv_heads, length, keys, dim, seed=0):
    """bf16 query (laid out as projections are, (B, L, H, D) transposed), key and value."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=g).bfloat16().transpose(1, 2)
    k = (torch.randn(batch, kv_heads, keys, dim, generator=g) * 2).bfloat16()
    v = torch.randn(batch, kv_heads, keys, dim, generator=g).bfloat16()
    return q, k, v


def exact(q, k, v, scaling, causal):  # (B, L, H, D), in fp64 from the same bf16 inputs
    out = scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scaling, is_causal=causal,
                                       enable_gqa=True)
    return out.transpose(1, 2)


@KERNEL
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "length", "keys", "dim"), [
    (4, 4, 37, 53, 72),     # SigLIP's head width; lengths no multiple of any block
    (6, 2, 100, 100, 64),   # grouped heads (Qwen2)
    (2, 1, 300, 300, 128),  # several key blocks, a partial last one
    (3, 3, 2, 7, 5),        # an odd width, fewer keys than a tile
    (2, 2, 33, 33, 256),
])
def test_the_kernel_equals_sdpa_in_fp64(causal, heads, kv_heads, length, keys, dim):
    if causal and length != keys:
        keys = length
    q, k, v = qkv(2, heads, kv_heads, length, keys, dim, seed=dim + length)
    out = torch.ops.nvila_prefill_attention.forward(q, k, v, dim ** -0.5, causal)
    assert out.dtype == torch.bfloat16 and out.shape == (2, length, heads, dim)
    # bf16 softmax weights into the second product (as torch's flash kernel), one rounding of the output
    torch.testing.assert_close(out.double(), exact(q, k, v, dim ** -0.5, causal), atol=1.5e-2, rtol=1.5e-2)


@KERNEL
def test_one_thread_and_two_give_the_same_answer_and_refusals_say_what_is_wrong():
    q, k, v = qkv(1, 4, 2, 70, 70, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.nvila_prefill_attention.forward(q, k, v, 0.125, True)
        torch.set_num_threads(2)
        two = torch.ops.nvila_prefill_attention.forward(q, k, v, 0.125, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    with pytest.raises(RuntimeError, match="takes bf16 query, key and value"):
        torch.ops.nvila_prefill_attention.forward(q.float(), k.float(), v.float(), 0.125, False)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        torch.ops.nvila_prefill_attention.forward(q[:, :3], k, v, 0.125, False)
    with pytest.raises(RuntimeError, match="causal prefill attention needs as many queries as keys"):
        torch.ops.nvila_prefill_attention.forward(q[:, :, :5], k, v, 0.125, True)


@KERNEL
@torch.no_grad()
def test_causal_prefill_into_a_longer_cache_keeps_the_first_keys_as_transformers_sdpa_does():
    q, k, v = qkv(1, 4, 2, 20, 32, 64)  # an empty static cache of 32 slots, 20 filled
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    ours, _ = attention.nvila_sdpa(module, q, k, v, None)
    torch.testing.assert_close(ours.double(), exact(q, k[:, :, :20], v[:, :, :20], 0.125, True),
                               atol=1.5e-2, rtol=1.5e-2)


def test_the_kernel_is_not_used_for_training_fp32_masks_or_where_it_cannot_run(monkeypatch):
    q, k, v = qkv(1, 2, 2, 16, 16, 32)
    module = torch.nn.Module()
    module.is_causal = False
    # a training step: gradients reach the inputs through SDPA
    trained = q.clone().requires_grad_()
    out, _ = attention.nvila_sdpa(module, trained, k, v, None)
    out.float().sum().backward()
    assert trained.grad is not None and attention.prefill_attention(trained, k, v, 0.1, False) is None
    # fp32, a mask: not the kernel's
    assert attention.prefill_attention(q.float(), k.float(), v.float(), 0.1, False) is None
    masked, _ = attention.nvila_sdpa(module, q, k, v, torch.ones(1, 1, 16, 16, dtype=torch.bool))
    torch.testing.assert_close(masked, scaled_dot_product_attention(q, k, v).transpose(1, 2))
    # a machine that cannot build it: transformers' SDPA function, the same answer within bf16's rounding
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert attention.prefill_attention(q, k, v, 0.1, False) is None
    with torch.no_grad():
        fallback, _ = attention.nvila_sdpa(module, q, k, v, None)
    torch.testing.assert_close(fallback, scaled_dot_product_attention(q, k, v).transpose(1, 2))


@KERNEL
@torch.no_grad()
def test_siglip_and_qwen2_in_bf16_run_the_kernel_and_match_transformers_eager(monkeypatch):
    ran, kernel = [], attention.prefill_attention

    def watched(*args):
        out = kernel(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(attention, "prefill_attention", watched)
    torch.manual_seed(0)
    tower = SiglipEncoder(SiglipConfig(hidden_size=144, num_heads=2, intermediate_size=256, num_layers=3)).eval()
    tower = tower.bfloat16()
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size).bfloat16()
    ours = tower.vision(pixel_values=pixels).last_hidden_state
    assert ran and all(ran)
    tower.vision.config._attn_implementation = "eager"
    torch.testing.assert_close(ours, tower.vision(pixel_values=pixels).last_hidden_state, atol=0.1, rtol=0.05)

    ran.clear()
    torch.manual_seed(0)
    llm = Qwen2LM(Qwen2LMConfig(attn_implementation="sdpa")).eval().bfloat16()
    embeds = torch.randn(1, 40, llm.hidden_size).bfloat16()
    logits = llm(embeds)
    assert ran and all(ran)
    llm.model.config._attn_implementation = "eager"
    torch.testing.assert_close(logits, llm(embeds), atol=0.1, rtol=0.05)
