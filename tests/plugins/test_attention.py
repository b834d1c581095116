"""Decoding attention: single-token queries on CPUs by nvila's kernel or two matmuls, equal to SDPA and to
transformers' eager."""

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from nvila.plugins import attention
from nvila.plugins.configs import Qwen2LMConfig
from nvila.plugins.qwen2 import Qwen2LM


def qkv(dtype, batch=2, heads=6, kv_heads=2, length=37, dim=16):  # dim 16: the matmul path; the kernel's: 32+
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("dim", [16, 64])  # the matmul path; the kernel's where it runs (not for additive masks)
def test_a_single_query_equals_sdpa_with_grouped_heads_and_padding(dtype, mask, dim):
    q, k, v = qkv(dtype, dim=dim)
    keep = torch.ones(2, 1, 1, k.shape[2], dtype=torch.bool)
    keep[1, ..., :9] = False  # the second sequence is left-padded by 9
    given = {"none": None, "bool": keep,
             "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask]
    out = attention.single_query_attention(q, k, v, given, scaling=0.25)  # (B, 1, H, D)
    expected = scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=None if mask == "none" else keep,
                                            scale=0.25, enable_gqa=True)  # (B, H, 1, D)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.transpose(1, 2), atol=tolerance, rtol=tolerance)


KERNEL = pytest.mark.skipif(attention.KERNEL.missing() is not None,
                            reason=f"nvila's attention kernel: {attention.KERNEL.missing()}")


@KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", attention.KERNEL_HEAD_WIDTHS)
@pytest.mark.parametrize("length", [1, 16, 17, 300])
def test_the_kernel_equals_sdpa_in_fp64_for_every_head_width_and_block_of_heads(dtype, dim, length):
    g = torch.Generator().manual_seed(dim + length)
    batch, heads, kv_heads = 2, 14, 2  # 7 heads a KV head: a full block of heads and a shorter one
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype) * 2
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, :length // 2] = False  # the second sequence left-padded
    for mask in (None, keep):
        out = torch.ops.nvila_attention.decode(q, k, v, mask, dim ** -0.5)
        expected = scaled_dot_product_attention(q[:, :, None].double(), k.double(), v.double(), enable_gqa=True,
                                                attn_mask=None if mask is None else mask[:, None, None])[:, :, 0]
        assert out.dtype == dtype
        tolerance = 2e-6 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
        torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@KERNEL
def test_the_kernel_reads_a_cache_through_its_strides_and_refuses_what_it_cannot_read():
    q, k, v = qkv(torch.bfloat16, dim=64)
    wide_k, wide_v = torch.zeros(2, 2, 50, 64, dtype=torch.bfloat16), torch.zeros(2, 2, 50, 64, dtype=torch.bfloat16)
    wide_k[:, :, :k.shape[2]], wide_v[:, :, :k.shape[2]] = k, v  # a preallocated cache, partly filled
    sliced = torch.ops.nvila_attention.decode(q[:, :, 0], wide_k[:, :, :k.shape[2]], wide_v[:, :, :k.shape[2]], None,
                                              0.125)
    assert torch.equal(sliced, torch.ops.nvila_attention.decode(q[:, :, 0], k, v, None, 0.125))
    with pytest.raises(RuntimeError, match="head width must be 32, 64, 128 or 256"):
        torch.ops.nvila_attention.decode(*(t[..., :48] for t in (q[:, :, 0], k, v)), None, 0.125)
    with pytest.raises(RuntimeError, match="all be bf16 or all fp32"):
        torch.ops.nvila_attention.decode(q[:, :, 0], k.float(), v, None, 0.125)
    with pytest.raises(RuntimeError, match=r"keep must be a \(B, L\) bool mask"):
        torch.ops.nvila_attention.decode(q[:, :, 0], k, v, torch.ones(2, 3, dtype=torch.bool), 0.125)


@KERNEL
def test_without_a_compiler_decoding_attention_takes_the_matmul_path_with_the_same_answer(monkeypatch):
    q, k, v = qkv(torch.float32, dim=64)
    keep = torch.ones(2, 1, 1, k.shape[2], dtype=torch.bool)
    keep[0, ..., :4] = False
    before = attention.single_query_attention(q, k, v, keep, scaling=0.125)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "'no-such-compiler' is not on PATH" in attention.KERNEL.missing() and not attention.kernel_runs()
    after = attention.single_query_attention(q, k, v, keep, scaling=0.125)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def language_model(implementation):
    torch.manual_seed(0)
    return Qwen2LM(Qwen2LMConfig(attn_implementation=implementation)).eval()


@torch.no_grad()
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_decoding_over_a_long_padded_cache_equals_transformers_eager_attention(compiled):
    ours, eager = language_model("sdpa"), language_model("eager")
    assert ours.model.config._attn_implementation == attention.NAME
    length = attention.MATMUL_FROM + 12  # past the length from which eager decoding takes the matmul path
    embeds = torch.randn(2, length, ours.hidden_size)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.compile(ours.forward_with_cache, dynamic=True, fullgraph=True) if compiled else ours.forward_with_cache
    results = []
    for model, run in ((ours, step), (eager, eager.forward_with_cache)):
        _, cache = model.forward_with_cache(embeds, mask, positions)
        logits = []
        for i in range(3):
            token = torch.randn(2, 1, ours.hidden_size, generator=torch.Generator().manual_seed(i))
            mask = torch.cat([mask[:, :length + i], torch.ones(2, 1, dtype=torch.long)], 1)
            out, cache = run(token, mask, positions[:, -1:] + i + 1, cache)
            logits.append(out)
        results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_fp32_prefill_runs_transformers_own_sdpa_unchanged():  # bf16 prefill: test_prefill_attention.py
    ours = language_model("sdpa")
    embeds = torch.randn(2, attention.MATMUL_FROM + 4, ours.hidden_size)
    before = ours(embeds)
    ours.model.config._attn_implementation = "sdpa"  # transformers' SDPA function itself
    assert torch.equal(before, ours(embeds))


@torch.no_grad()
def test_a_checkpoint_loads_with_it_too(tmp_path):
    built = language_model("sdpa")
    built.model.save_pretrained(tmp_path)
    loaded = Qwen2LM(Qwen2LMConfig(checkpoint=str(tmp_path))).eval()  # transformers' from_pretrained takes the name
    assert loaded.model.config._attn_implementation == attention.NAME
    embeds = torch.randn(1, 5, built.hidden_size)
    assert torch.equal(built(embeds), loaded(embeds))
