"""Write tiny checkpoints in exactly the layout of the released NVILA models, with random weights.

    python scripts/write_tiny_released.py --variant nvila-8b --out /tmp/tiny-nvila-8b
    python scripts/write_tiny_released.py --variant nvila-lite --out /tmp/tiny-nvila-lite

The layout is the one NVlabs/VILA's ``LlavaMetaModel.save_pretrained`` writes (llava/model/llava_arch.py) and
Efficient-Large-Model/NVILA-8B ships (its config.json is copied verbatim in NVIDIA/TensorRT-LLM's
tests/unittest/_torch/modeling/test_modeling_vila.py): a top-level ``config.json`` (``LlavaConfig``, its
sub-configs as full dicts), and three Hugging Face folders written by transformers 4.46:

- ``llm/``: Qwen2ForCausalLM config (4.46 writes only non-default values, so an untied model has no
  ``tie_word_embeddings`` key), safetensors weights (sharded with an index for the 8B-like model, as the 8B's
  are), and the tokenizer with its chat template and VILA's added media tokens; the language model's
  ``vocab_size`` stops before those tokens, as the release's 151,648 against 151,651 tokens do;
- ``vision_tower/``: SiglipVisionModel config, weights named ``vision_model.*`` (4.46's module layout), the
  ``preprocessor_config.json`` of its SiglipImageProcessor;
- ``mm_projector/``: MultimodalProjector config (``mm_projector_type``) and weights ``layers.N.*`` (the
  save strips ``mm_projector.``; layer 0 is the parameter-free downsample block).

Weights are bfloat16, as released. Sizes are tiny; field names, key names and file names are the release's.
This file writes with safetensors and json directly, independently of nvila's converter, so that tests of
the converter read a layout nvila did not write itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "plugins" / "assets" / "tiny-tokenizer"
VILA_ADDED_TOKENS = ["<vila/sentinel>", "<image>", "<vila/video>"]  # llava/constants.py: sentinel + MEDIA_TOKENS

VARIANTS: dict[str, dict[str, Any]] = {
    # NVILA-8B: SigLIP under dynamic S2 (3 scales), mlp_downsample (STC 2x2), untied Qwen2 (Qwen2.5-7B).
    "nvila-8b": dict(
        image_size=32, patch_size=8, vision_hidden=32, vision_intermediate=64, vision_layers=3, vision_heads=2,
        llm_hidden=64, llm_intermediate=128, llm_layers=2, llm_heads=4, llm_kv_heads=1, tie=False,
        projector="mlp_downsample", top={"dynamic_s2": True, "image_aspect_ratio": "dynamic_s2", "s2": False,
                                          "s2_scales": "32,64,96", "s2_max_split_size": 32,
                                          "s2_resize_output_to_scale_idx": -1, "num_video_frames": 8},
        shards=2),
    # NVILA-Lite-2B: SigLIP with dynamic tiles and a thumbnail, mlp_downsample_3x3_fix (STC 3x3 on an odd grid,
    # padded as 32 -> 33 is in the release), tied Qwen2 (Qwen2.5-1.5B), TSP temporal pooling of video frames.
    "nvila-lite": dict(
        image_size=40, patch_size=8, vision_hidden=32, vision_intermediate=64, vision_layers=3, vision_heads=2,
        llm_hidden=48, llm_intermediate=96, llm_layers=2, llm_heads=6, llm_kv_heads=1, tie=True,
        projector="mlp_downsample_3x3_fix",
        top={"dynamic_s2": False, "image_aspect_ratio": "dynamic", "s2": False, "min_tiles": 1, "max_tiles": 12,
             "num_video_frames": 8,
             "image_encoder": '{"_target_": "llava.model.encoders.BasicImageEncoder"}',
             "video_encoder": '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[4, 1, 1]]}'},
        shards=1),
}


def _json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}


def _tokenizer(out: Path) -> tuple[int, int, int]:
    """The tokenizer in llm/ with VILA's added tokens: the language model's vocab size before them, BOS, EOS ids."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    new = [t for t in VILA_ADDED_TOKENS if t not in tokenizer.get_vocab()]
    vocab = len(tokenizer)
    tokenizer.add_tokens(new, special_tokens=True)
    tokenizer.save_pretrained(out / "llm")
    # transformers 4.46 keeps the chat template inside tokenizer_config.json (5.x writes a .jinja file beside it)
    template = out / "llm" / "chat_template.jinja"
    if template.exists():
        config = json.loads((out / "llm" / "tokenizer_config.json").read_text())
        config["chat_template"] = template.read_text()
        _json(out / "llm" / "tokenizer_config.json", config)
        template.unlink()
    return vocab, tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.eos_token_id


def _llm(out: Path, v: dict[str, Any], tokens: tuple[int, int, int], shards: int) -> dict[str, Any]:
    vocab, bos, eos = tokens
    hf = Qwen2Config(vocab_size=vocab, hidden_size=v["llm_hidden"], intermediate_size=v["llm_intermediate"],
                     num_hidden_layers=v["llm_layers"], num_attention_heads=v["llm_heads"],
                     num_key_value_heads=v["llm_kv_heads"], tie_word_embeddings=v["tie"], rope_theta=1000000.0,
                     max_position_embeddings=32768, rms_norm_eps=1e-6)
    state = _bf16(Qwen2ForCausalLM(hf).state_dict())
    if v["tie"]:
        state.pop("lm_head.weight")  # transformers saves a tied output layer once, as the embedding
    config = {  # transformers 4.46's to_diff_dict of a Qwen2Config: non-default values only
        "architectures": ["Qwen2ForCausalLM"], "bos_token_id": bos, "eos_token_id": eos,
        "hidden_size": v["llm_hidden"], "intermediate_size": v["llm_intermediate"], "max_position_embeddings": 32768,
        "max_window_layers": v["llm_layers"], "model_max_length": 8192, "model_type": "qwen2",
        "num_attention_heads": v["llm_heads"], "num_hidden_layers": v["llm_layers"],
        "num_key_value_heads": v["llm_kv_heads"], "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": None, "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16", "transformers_version": "4.46.0", "use_cache": True, "vocab_size": vocab,
    }
    if v["tie"]:
        config["tie_word_embeddings"] = True  # 4.46's Qwen2Config default is False, so only True is written
    _json(out / "llm" / "config.json", config)
    _json(out / "llm" / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos,
                                                   "transformers_version": "4.46.0"})
    keys = list(state)
    if shards == 1:
        save_file(state, str(out / "llm" / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, size = {}, 0
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(out / "llm" / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
            size += sum(t.numel() * t.element_size() for t in part.values())
        _json(out / "llm" / "model.safetensors.index.json", {"metadata": {"total_size": size},
                                                             "weight_map": weight_map})
    return {**config, "_name_or_path": "./llm", "tie_word_embeddings": v["tie"]}


def _vision_tower(out: Path, v: dict[str, Any]) -> dict[str, Any]:
    hf = SiglipVisionConfig(hidden_size=v["vision_hidden"], intermediate_size=v["vision_intermediate"],
                            num_hidden_layers=v["vision_layers"], num_attention_heads=v["vision_heads"],
                            image_size=v["image_size"], patch_size=v["patch_size"], vision_use_head=False)
    state = SiglipVisionModel(hf).state_dict()
    with torch.no_grad():  # LayerNorms start at 1 and 0; make them random too, so that a misplaced one shows
        for key, value in state.items():
            if "norm" in key:
                value.add_(torch.randn_like(value) * 0.1)
    released = {f"vision_model.{k}": t for k, t in _bf16(state).items()}  # transformers 4.46's module names
    (out / "vision_tower").mkdir(parents=True, exist_ok=True)
    save_file(released, str(out / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["SiglipVisionModel"], "hidden_act": "gelu_pytorch_tanh", "hidden_size": v["vision_hidden"],
        "image_size": v["image_size"], "intermediate_size": v["vision_intermediate"], "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model", "num_attention_heads": v["vision_heads"], "num_channels": 3,
        "num_hidden_layers": v["vision_layers"], "num_image_tokens": 256, "patch_size": v["patch_size"],
        "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0", "vision_use_head": False,
    }
    _json(out / "vision_tower" / "config.json", config)
    _json(out / "vision_tower" / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"height": v["image_size"], "width": v["image_size"]}})
    return {**config, "_name_or_path": "./vision_tower"}


def _projector(out: Path, v: dict[str, Any], mm_hidden: int) -> dict[str, Any]:
    """NVILA's MultimodalProjector layers (multimodal_projector/base_projector.py), weights only."""
    d = v["llm_hidden"]
    if v["projector"] == "mlp_downsample":  # [DownSampleBlock, LN(4C), Linear(4C, D), GELU, Linear(D, D)]
        layers = {1: torch.nn.LayerNorm(4 * mm_hidden), 2: torch.nn.Linear(4 * mm_hidden, d), 4: torch.nn.Linear(d, d)}
    else:  # mlp_downsample_3x3_fix: [DownSample3x3, LN(9C), L(9C, 3C), GELU, LN(3C), L(3C, D), GELU, L(D, D)]
        layers = {1: torch.nn.LayerNorm(9 * mm_hidden), 2: torch.nn.Linear(9 * mm_hidden, 3 * mm_hidden),
                  4: torch.nn.LayerNorm(3 * mm_hidden), 5: torch.nn.Linear(3 * mm_hidden, d), 7: torch.nn.Linear(d, d)}
    state = {}
    for index, layer in layers.items():
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.add_(torch.randn_like(param) * 0.1)
                state[f"layers.{index}.{name}"] = param
    (out / "mm_projector").mkdir(parents=True, exist_ok=True)
    save_file(_bf16(state), str(out / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MultimodalProjector"], "mm_projector_type": v["projector"],
              "model_type": "v2l_projector", "torch_dtype": "bfloat16", "transformers_version": "4.46.0"}
    _json(out / "mm_projector" / "config.json", config)
    return {**config, "_name_or_path": "./mm_projector"}


def write_released(out: str | Path, variant: str = "nvila-8b", seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``variant`` (see :data:`VARIANTS`) in the released layout at ``out``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v, out = VARIANTS[variant], Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    scales = len(v["top"]["s2_scales"].split(",")) if v["top"].get("dynamic_s2") else 1
    mm_hidden = v["vision_hidden"] * scales
    llm_cfg = _llm(out, v, _tokenizer(out), v["shards"])
    vision_cfg = _vision_tower(out, v)
    projector_cfg = _projector(out, v, mm_hidden)
    top = {  # NVILA-8B's config.json fields (TensorRT-LLM's verbatim copy), at tiny sizes
        "_attn_implementation_autoset": True, "_name_or_path": str(out), "architectures": ["LlavaLlamaModel"],
        "chat_template": None, "drop_path_rate": 0.0, "fps": 0.0, "hidden_size": v["llm_hidden"],
        "interpolate_mode": "linear", "llm_cfg": llm_cfg, "mm_hidden_size": mm_hidden,
        "mm_projector_cfg": projector_cfg, "mm_projector_lr": None, "mm_use_im_patch_token": True,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "cls_patch", "mm_vision_select_layer": -2,
        "model_dtype": "torch.bfloat16", "model_type": "llava_llama", "num_time_tokens": 0,
        "resume_path": str(out), "soft_ce_std": 1.0, "time_token_format": "<t{t}>", "time_token_ids": [],
        "transformers_version": "4.46.0", "tune_language_model": True, "tune_mm_projector": True,
        "tune_vision_tower": True, "vision_resolution": -1, "vision_tower_cfg": vision_cfg, **v["top"],
    }
    _json(out / "config.json", top)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="nvila-8b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_released(args.out, args.variant, args.seed))


if __name__ == "__main__":
    main()
