"""SDPA for transformers models, with decoding steps and bf16 prefill on CPUs run by nvila's own kernels.

A decoding step asks attention for one query per sequence against the whole cache. On CPUs torch's SDPA sends
that to its flash kernel, which is made for long query blocks: with one query it runs at about 1 GFLOP/s, 1.6 ms a
layer against a 1,000-token cache on one Zen 4 core, where ``softmax(q k^T) v`` as two matmuls takes 0.14 ms
(``nvila bench quant-decode``'s long-context rows). A VLM prompt holds hundreds to thousands of visual tokens, so
this decides decoding speed.

Prefill (many queries, no mask: a SigLIP tile's tokens, or a causal prompt) in bf16 on CPUs with AVX512-BF16 goes to
``csrc/prefill_attention.cpp``: torch's CPU flash kernel runs SigLIP's attention at 57-86 GFLOP/s on one Zen 5 core,
over half the vision tower's time; nvila's runs it 3.2x as fast, and causal prompts about 5x (vdpbf16ps on operands
packed for it; ``nvila bench attention``). Everything else (fp32, masks, training, GPUs) goes to transformers' own
SDPA function unchanged.

On CPUs with AVX-512, one call of ``csrc/decode_attention.cpp`` does the whole step per layer, reading each key and
value row once for all the heads that share it; as torch ops (the path elsewhere) the two matmuls alone cost about
30 us each in fixed costs at a short cache, 48 of them a step for a 24-layer model. Both paths compute what
transformers' ``eager`` attention computes, scores and softmax in fp32 (the kernel rounds only its output).
Registered as ``nvila_sdpa`` in transformers' attention and mask interfaces (the mask is SDPA's);
``Qwen2LMConfig(attn_implementation="sdpa")`` and ``SiglipConfig(attn_implementation="sdpa")`` run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from nvila.core.native import AVX512_FLAGS, NativeOps

NAME = "nvila_sdpa"
MATMUL_FROM = 48
"""Cache length from which eager decoding takes the matmul path where the kernel cannot run (torch's flash kernel
is faster below it, by overhead alone); a compiled step always takes it, as inductor fuses it."""
PREFILL_MAX_WIDTH = 512
"""The widest head the prefill kernel takes (its per-task buffers are sized for it)."""
KERNEL_HEAD_WIDTHS = (32, 64, 128, 256)
"""Head widths the kernel is built for (released Qwen2 sizes have 64 or 128; the tests' tiny models 32)."""


def _register_fake() -> None:
    @torch.library.register_fake("nvila_attention::decode")
    def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None,
          scaling: float) -> torch.Tensor:
        return query.new_empty(query.shape)


KERNEL = NativeOps("nvila_attention_cpu", Path(__file__).parent / "csrc" / "decode_attention.cpp",
                   "nvila's AVX-512 decoding attention kernel", "Decoding attention runs as torch matmuls instead.",
                   fakes=_register_fake)


def _register_prefill_fake() -> None:
    @torch.library.register_fake("nvila_prefill_attention::forward")
    def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, causal: bool) -> torch.Tensor:
        batch, heads, length, _ = query.shape
        return query.new_empty(batch, length, heads, value.shape[-1])


PREFILL_KERNEL = NativeOps("nvila_prefill_attention_cpu", Path(__file__).parent / "csrc" / "prefill_attention.cpp",
                           "nvila's AVX512-BF16 prefill attention kernel",
                           "Prefill attention runs as torch's SDPA instead.", flags=[*AVX512_FLAGS, "-mavx512bf16"],
                           needs_bf16=True, fakes=_register_prefill_fake)


@torch.compiler.assume_constant_result
def kernel_runs() -> bool:
    """Whether decoding attention runs nvila's kernel on this machine (building it the first time)."""
    return KERNEL.available()


@torch.compiler.assume_constant_result
def prefill_kernel_runs() -> bool:
    """Whether bf16 prefill attention runs nvila's kernel on this machine (building it the first time)."""
    return PREFILL_KERNEL.available()


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                      causal: bool) -> torch.Tensor | None:
    """Many queries without a mask by nvila's prefill kernel: ``query`` (B, H, L, D), ``key``/``value``
    (B, KVH, S, D), causal or not -> (B, L, H, D), as transformers' attention functions return; None where the kernel
    does not run (not a bf16 CPU inference call, or a machine without AVX512-BF16), for the caller's SDPA.

    Causal attention with more keys than queries (prefill into an empty static cache) keeps the first L keys, as
    transformers' SDPA function does."""
    tensors = (query, key, value)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # the kernel has no backward: training takes SDPA
    if not (all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in tensors)
            and query.shape[1] % key.shape[1] == 0 and max(query.shape[-1], value.shape[-1]) <= PREFILL_MAX_WIDTH
            and prefill_kernel_runs()):
        return None
    length = query.shape[2]
    if causal and key.shape[2] != length:
        if key.shape[2] < length:
            return None
        key, value = key[:, :, :length], value[:, :, :length]
    return torch.ops.nvila_prefill_attention.forward(query, key, value, scaling, causal)


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One query per sequence: ``query`` (B, H, 1, D), ``key``/``value`` (B, KVH, L, D), a boolean (True: attend)
    or additive mask broadcastable to (B, 1, 1, L) -> (B, 1, H, D), as transformers' attention functions return.

    nvila's kernel runs it where it can (AVX-512, fp32 or bf16, the kernel's head widths, a boolean mask or none);
    two torch matmuls elsewhere."""
    batch, heads, _, dim = query.shape
    if (kernel_runs() and query.dtype in (torch.float32, torch.bfloat16) and key.dtype == value.dtype == query.dtype
            and dim in KERNEL_HEAD_WIDTHS and key.stride(-1) == 1 and key.stride() == value.stride()
            and (attention_mask is None or attention_mask.dtype == torch.bool)):
        keep = None
        if attention_mask is not None:
            keep = attention_mask.reshape(attention_mask.shape[0], attention_mask.shape[-1]).expand(batch, -1)
        out = torch.ops.nvila_attention.decode(query.reshape(batch, heads, dim), key, value, keep, scaling)
        return out.reshape(batch, 1, heads, dim)
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # (B, KVH, G, D): the heads sharing a KV head
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # (B, KVH, G, L)
    if attention_mask is not None:
        mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, attention_mask.shape[-1])  # (B, 1, 1, L)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, KVH, G, D)
    return out.reshape(batch, 1, heads, value.shape[-1])


def nvila_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, but single-token queries on CPUs go to :func:`single_query_attention`
    (nvila's kernel, or two matmuls), and unmasked bf16 prefill on CPUs to :func:`prefill_attention`."""
    plain = dropout == 0.0 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if (query.shape[2] == 1 and query.device.type == "cpu" and plain and query.shape[1] % key.shape[1] == 0
            and (torch.compiler.is_compiling() or kernel_runs() or key.shape[2] >= MATMUL_FROM)):
        return single_query_attention(query, key, value, attention_mask, scale), None
    if query.shape[2] > 1 and attention_mask is None and plain and query.device.type == "cpu":
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = prefill_attention(query, key, value, scale, bool(causal))
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> str:
    """Register ``nvila_sdpa`` with transformers (idempotent); its name, for ``_attn_implementation``."""
    AttentionInterface.register(NAME, nvila_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
