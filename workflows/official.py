"""Released NVILA checkpoints in and out: the one place where the official layout is mapped to nvila's.

The released layout (NVlabs/VILA ``LlavaMetaModel.save_pretrained``, llava/model/llava_arch.py; shipped as
Efficient-Large-Model/NVILA-8B, NVILA-Lite-2B, NVILA-15B and their video variants)::

    config.json           LlavaConfig (llava/model/configuration_llava.py), sub-configs copied in as dicts
    llm/                  Qwen2ForCausalLM (transformers 4.46 files), tokenizer and chat template
    vision_tower/         SiglipVisionModel, weights named vision_model.*, preprocessor_config.json
    mm_projector/         MultimodalProjector: mm_projector_type, weights layers.N.*

How each part maps (official source file: what it does -> nvila):

- ``image_aspect_ratio: dynamic_s2`` (SiglipVisionTowerDynamicS2, mm_utils.dynamic_s2_preprocess,
  LlavaMetaModel.merge_features_for_dynamic_s2) -> encoder ``dyns2`` with ``s2_scales``, ``max_tiles``;
  ``dynamic`` (mm_utils.dynamic_preprocess, thumbnail) -> ``dynamic-tiles``; ``resize`` or none -> ``siglip``.
  SigLIP features come from ``mm_vision_select_layer`` (``feature_layer``); decoding is ``convert("RGB")``
  (``alpha: drop``, ``exif_rotate: false``).
- ``mm_projector_type`` (multimodal_projector/base_projector.py): ``mlp_downsample`` and
  ``mlp_downsample_2x2_fix`` -> ``stc`` 2 + ``mlp``; ``mlp_downsample_3x3_fix`` -> ``stc`` 3 + ``mlp-3x3``;
  ``linear`` / ``mlp1x_gelu`` -> ``identity`` + ``linear``; ``mlp2x_gelu`` -> ``identity`` + ``mlp`` without
  its LayerNorm. The builder's other types have no nvila projector and are refused by name.
- ``image_encoder`` (encoders/image/basic.py, BasicImageEncoder.end_tokens, default "\\n") -> ``image_end``;
  ``video_encoder`` BasicVideoEncoder / TSPVideoEncoder ``pool_sizes [[g, 1, 1]]`` (encoders/video/tsp.py,
  pooled after the projector, each frame ending with end_tokens) -> ``temporal-average`` with ``group`` g.
- Inference (LlavaMetaForCausalLM.generate_content): only a prompt's single image is tiled
  (``single_image_tiling``); ``dynamic`` writes ``<image>\\n`` once per tile (``tile_end: "\\n"``); the data
  path drops the newline after a media token (``strip_media_newline``).
- The language model: ``vocab_size`` stops before VILA's added tokens; loading resizes the embeddings to the
  tokenizer's length as ``llava/model/builder.py`` does (``resize_token_embeddings``, whose transformers
  4.46 default fills new rows with the mean of the old ones; its 1e-9-scaled noise is left out here).
  4.46 config files omit ``tie_word_embeddings`` when false: it is read with 4.46's default and written
  explicitly. SigLIP weights are read with and without the ``vision_model.`` prefix.

Released tensors that the nvila model does not compute with (SigLIP's layers after the feature layer, its
final LayerNorm) and the released config's fields are kept in :class:`Released`, so that export writes back
exactly what was read. Every file is read with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec, NvilaModel

log = logging.getLogger(__name__)

CONFIG = "config.json"
PARTS = ("llm", "vision_tower", "mm_projector")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# -- projector types: every name NVILA's builder accepts (multimodal_projector/base_projector.py) ----------------
DOWNSAMPLE = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
NO_NVILA_PROJECTOR = ("identity", "mlp_downsample_3x3_s2", "mlp_downsample_3x3_s2_new")
MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")

# -- top-level config fields: what each one means here ------------------------------------------------------------
TRAINING_ONLY = {
    "tune_language_model", "tune_mm_projector", "tune_vision_tower", "mm_projector_lr", "vision_tower_lr",
    "drop_path_rate", "soft_ce_std", "resume_path", "_name_or_path", "transformers_version",
    "_attn_implementation_autoset", "mm_use_im_patch_token", "interpolate_mode", "time_token_format",
    "time_token_ids", "model_dtype", "architectures", "model_type", "fps", "num_video_frames",
    "torch_dtype", "llm_cfg", "vision_tower_cfg", "mm_projector_cfg", "hidden_size", "mm_hidden_size",
}
"""Fields read elsewhere (sub-configs, checks) or that do not change what the model computes from its inputs."""
UNDERSTOOD = {
    "dynamic_s2", "image_aspect_ratio", "s2", "s2_scales", "s2_max_split_size", "s2_resize_output_to_scale_idx",
    "min_tiles", "max_tiles", "video_max_tiles", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_use_im_start_end", "vision_resolution", "chat_template", "image_encoder", "video_encoder",
    "num_time_tokens", "ps3", "look_close_mode", "num_look_close", "num_token_look_close",
    "top_down_prompt_head_type", "high_res_pos_embed", "ps3_dynamic_aspect_ratio", "mm_low_res_token_num",
    "mm_scale_num",
} | TRAINING_ONLY


@dataclass
class Released:
    """What a released checkpoint holds besides the nvila model, kept so that export writes it back."""

    config: dict[str, Any]
    """The top-level config.json as read (its unknown fields included)."""
    unused: dict[str, torch.Tensor] = field(default_factory=dict)
    """Released tensors the nvila model does not compute with, as ``part/name`` (e.g. SigLIP's last layer)."""
    report: list[str] = field(default_factory=list)
    """Fields that were not understood, or understood but not used; each with the reason."""

    @property
    def dtype(self) -> torch.dtype:
        name = str(self.config.get("model_dtype", "torch.bfloat16")).removeprefix("torch.")
        return DTYPES.get(name, torch.bfloat16)


def is_official(directory: str | Path) -> bool:
    """Whether ``directory`` looks like a released NVILA checkpoint (config.json beside llm/)."""
    directory = Path(directory)
    return (directory / CONFIG).is_file() and (directory / "llm").is_dir()


# -- reading ------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NvilaError(f"'{path}' is missing: a released NVILA checkpoint has config.json and the folders "
                         f"{', '.join(PARTS)}, each with its own config.json.") from None
    except json.JSONDecodeError as exc:
        raise NvilaError(f"'{path}' is not valid JSON: {exc}") from None


def read_configs(directory: str | Path) -> dict[str, dict[str, Any]]:
    """The top-level config and each part's config (the part folder's own file, which the official loader
    reads; the copy inside config.json when the folder has none): ``{"top", "llm", "vision_tower", ...}``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NvilaError(f"'{directory}' is not a directory.")
    if not (directory / CONFIG).is_file():
        raise NvilaError(f"'{directory}' is not a checkpoint: no config.json (a released NVILA checkpoint) and no "
                         "spec.yaml (an nvila checkpoint).")
    top = _read_json(directory / CONFIG)
    configs = {"top": top}
    for part in PARTS:
        path = directory / part / CONFIG
        if path.is_file():
            configs[part] = _read_json(path)
        elif isinstance(top.get(f"{part}_cfg"), dict):
            configs[part] = top[f"{part}_cfg"]
        else:
            raise NvilaError(f"'{directory}' is not a released NVILA checkpoint: '{path}' is missing and "
                             f"config.json has no {part}_cfg.")
    return configs


def _parse_encoder(value: Any, field_name: str) -> dict[str, Any]:
    """A LlavaConfig image_encoder / video_encoder value (a JSON string or a dict with _target_)."""
    default = {"image_encoder": "BasicImageEncoder", "video_encoder": "BasicVideoEncoder"}[field_name]
    if value is None:
        return {"_target_": f"llava.model.encoders.{default}"}
    try:
        parsed = json.loads(value) if isinstance(value, str) else dict(value)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise NvilaError(f"config.json: field '{field_name}' = {value!r} is not a JSON object.") from None
    return parsed


def official_spec(configs: dict[str, dict[str, Any]], directory: str | Path = "") -> tuple[ModelSpec, list[str]]:
    """The :class:`ModelSpec` that computes what a released checkpoint computes, and the report of the fields
    that were not understood (kept, and written back on export) or knowingly not used."""
    top, llm, vision, projector = configs["top"], configs["llm"], configs["vision_tower"], configs["mm_projector"]
    where = Path(directory)
    report: list[str] = []

    def refuse(file: str, key: str, value: Any, why: str) -> NvilaError:
        return NvilaError(f"{where / file}: field '{key}' = {value!r}: {why}")

    archs = top.get("architectures") or []
    if not set(archs) & {"LlavaLlamaModel", "LlavaLlamaForCausalLM"}:
        raise refuse(CONFIG, "architectures", archs, "not an NVILA model (LlavaLlamaModel); nvila reads the "
                     "released NVILA layout only")
    for key, bad in (("ps3", True), ("mm_use_im_start_end", True)):
        if top.get(key) == bad:
            raise refuse(CONFIG, key, bad, "not supported by nvila (NVILA models do not use it)")
    if (top.get("video_max_tiles") or 1) > 1:
        raise refuse(CONFIG, "video_max_tiles", top["video_max_tiles"], "tiled video frames are not supported")
    if top.get("num_time_tokens"):
        raise refuse(CONFIG, "num_time_tokens", top["num_time_tokens"], "time tokens are not supported")
    if top.get("chat_template") is not None:
        raise refuse(CONFIG, "chat_template", top["chat_template"], "names a template file of the VILA repository, "
                     "not of this checkpoint; nvila uses the tokenizer's own template in llm/")
    if top.get("vision_resolution", -1) not in (-1, None, vision.get("image_size")):
        raise refuse(CONFIG, "vision_resolution", top["vision_resolution"], "resizing SigLIP's position embeddings "
                     "is not supported")
    unknown = sorted(set(top) - UNDERSTOOD)
    report += [f"config.json: field '{k}' is not understood by nvila; kept and written back on export" for k in unknown]
    if top.get("fps"):
        report.append(f"config.json: fps {top['fps']} (frame sampling by rate) is not used; sample frames yourself")

    # vision tower
    v_arch = (vision.get("architectures") or [None])[0]
    if (v_arch or vision.get("model_type")) not in ("SiglipVisionModel", "siglip_vision_model"):
        raise refuse("vision_tower/config.json", "architectures", vision.get("architectures"),
                     "nvila reads SigLIP vision towers only (SiglipVisionModel)")
    for key, expected in (("hidden_act", "gelu_pytorch_tanh"), ("layer_norm_eps", 1e-6), ("num_channels", 3)):
        if vision.get(key, expected) != expected:
            raise refuse("vision_tower/config.json", key, vision[key], f"nvila's siglip encoder uses {expected!r}")
    select = top.get("mm_vision_select_feature", "patch")
    if select != "cls_patch":  # SigLIP has no class token: "patch" would drop the first patch (feature_select)
        raise refuse(CONFIG, "mm_vision_select_feature", select, "nvila keeps every SigLIP token ('cls_patch')")
    _check_preprocessor(where, vision)
    siglip = {"name": "siglip", "image_size": vision["image_size"], "patch_size": vision["patch_size"],
              "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
              "num_layers": vision["num_hidden_layers"], "num_heads": vision["num_attention_heads"],
              "feature_layer": top.get("mm_vision_select_layer", -2), "alpha": "drop", "exif_rotate": False}
    decode = {"alpha": "drop", "exif_rotate": False}
    aspect = top.get("image_aspect_ratio")
    tile_end = None
    if top.get("dynamic_s2") or aspect == "dynamic_s2":
        scales = [int(s) for s in str(top.get("s2_scales", "")).split(",") if s.strip()]
        if top.get("s2_max_split_size", vision["image_size"]) != vision["image_size"]:
            raise refuse(CONFIG, "s2_max_split_size", top["s2_max_split_size"], "must be SigLIP's image_size "
                         f"{vision['image_size']}")
        if top.get("s2_resize_output_to_scale_idx", 0) not in (-1, len(scales) - 1):
            raise refuse(CONFIG, "s2_resize_output_to_scale_idx", top["s2_resize_output_to_scale_idx"],
                         "dynamic S2 in nvila resizes to the largest scale (-1)")
        encoder = {"name": "dyns2", "scales": scales, "max_tiles": top.get("max_tiles", 12), "base": siglip,
                   **decode}
    elif aspect == "dynamic":
        encoder = {"name": "dynamic-tiles", "min_tiles": top.get("min_tiles", 1), "max_tiles": top.get("max_tiles", 12),
                   "thumbnail": True, "base": siglip, **decode}
        tile_end = "\n"  # generate_content writes "<image>\n" once per tile
    elif top.get("s2"):
        raise refuse(CONFIG, "s2", True, "square S2 (s2wrapper) is not supported; NVILA uses dynamic_s2")
    elif aspect in (None, "resize"):
        encoder = siglip
    else:
        raise refuse(CONFIG, "image_aspect_ratio", aspect, "supported: dynamic_s2, dynamic, resize")
    scales_n = len(encoder.get("scales", [1]))
    if top.get("mm_hidden_size") not in (None, vision["hidden_size"] * scales_n):
        raise refuse(CONFIG, "mm_hidden_size", top["mm_hidden_size"],
                     f"does not match the vision tower: {vision['hidden_size']} x {scales_n} scale(s)")

    # projector
    kind = projector.get("mm_projector_type")
    compressor, proj = _projector_spec(kind, where)

    # language model
    l_arch = (llm.get("architectures") or [None])[0]
    if (l_arch or llm.get("model_type")) not in ("Qwen2ForCausalLM", "qwen2"):
        raise refuse("llm/config.json", "architectures", llm.get("architectures"),
                     "nvila's language backbone is Qwen2 (Qwen2ForCausalLM)")
    for key, expected in (("hidden_act", "silu"), ("rope_scaling", None), ("use_sliding_window", False)):
        if llm.get(key, expected) != expected:
            raise refuse("llm/config.json", key, llm[key], f"nvila's qwen2 backbone uses {expected!r}")
    if top.get("hidden_size") not in (None, llm["hidden_size"]):
        raise refuse(CONFIG, "hidden_size", top["hidden_size"], f"llm/config.json says {llm['hidden_size']}")
    lm = {"name": "qwen2", "hidden_size": llm["hidden_size"], "intermediate_size": llm["intermediate_size"],
          "num_layers": llm["num_hidden_layers"], "num_heads": llm["num_attention_heads"],
          "num_kv_heads": llm.get("num_key_value_heads", llm["num_attention_heads"]),
          "max_position_embeddings": llm.get("max_position_embeddings", 32768),
          # transformers 4.46 writes only non-default values, and its Qwen2 default is untied: state it
          "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
          "vocab_size": llm["vocab_size"], "rope_theta": float(llm.get("rope_theta", 10000.0)),
          "rms_norm_eps": float(llm.get("rms_norm_eps", 1e-6))}

    # image and video encoders (end tokens, temporal pooling)
    image_encoder = _parse_encoder(top.get("image_encoder"), "image_encoder")
    if not str(image_encoder.get("_target_", "")).endswith("BasicImageEncoder") or image_encoder.get("start_tokens"):
        raise refuse(CONFIG, "image_encoder", top.get("image_encoder"), "nvila supports BasicImageEncoder without "
                     "start_tokens")
    video_encoder = _parse_encoder(top.get("video_encoder"), "video_encoder")
    target = str(video_encoder.get("_target_", ""))
    if video_encoder.get("start_tokens") or video_encoder.get("sep_tokens"):
        raise refuse(CONFIG, "video_encoder", top.get("video_encoder"), "start_tokens / sep_tokens are not supported")
    if target.endswith("TSPVideoEncoder"):
        pools = video_encoder.get("pool_sizes") or [[1, 1, 1]]
        if len(pools) != 1 or list(pools[0][1:]) != [1, 1]:
            raise refuse(CONFIG, "video_encoder", top.get("video_encoder"), "nvila pools time only: pool_sizes "
                         "[[g, 1, 1]]")
        group = int(pools[0][0])
    elif target.endswith("BasicVideoEncoder"):
        group = 1
    else:
        raise refuse(CONFIG, "video_encoder", top.get("video_encoder"), "supported: BasicVideoEncoder, "
                     "TSPVideoEncoder")
    frames = top.get("num_video_frames")
    temporal = {"name": "temporal-average", "group": group, "where": "after-projector",
                "frame_end": video_encoder.get("end_tokens", "\n"),
                "frames": frames if frames and frames >= group else None}

    spec = ModelSpec(
        encoder=encoder, compressor=compressor, temporal=temporal, projector=proj, llm=lm,
        precision={"name": "bf16"} if "bfloat16" in str(top.get("model_dtype", "")) else {"name": "fp32"},
        max_length=int(llm.get("model_max_length") or llm.get("tokenizer_model_max_length") or 4096),
        image_end=image_encoder.get("end_tokens", "\n"), tile_end=tile_end, strip_media_newline=True,
        single_image_tiling=True)
    return spec, report


def _projector_spec(kind: Any, where: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(compressor, projector) specs for an official ``mm_projector_type``."""
    gelu = MLP_GELU.match(str(kind))
    if kind in DOWNSAMPLE:
        ratio = DOWNSAMPLE[kind]
        return {"name": "stc", "ratio": ratio}, {"name": "mlp"} if ratio == 2 else {"name": "mlp-3x3"}
    if kind == "linear" or (gelu and int(gelu.group(1)) == 1):
        return {"name": "identity"}, {"name": "linear"}
    if gelu and int(gelu.group(1)) == 2:
        return {"name": "identity"}, {"name": "mlp", "layer_norm": False}
    known = sorted([*DOWNSAMPLE, "linear", "mlp1x_gelu", "mlp2x_gelu"])
    if kind in NO_NVILA_PROJECTOR or gelu:
        why = ("a type NVILA's builder knows, but nvila has no projector with its layers "
               f"(supported: {', '.join(known)})")
    else:
        why = (f"unknown projector type; NVILA's builder accepts {', '.join(known + list(NO_NVILA_PROJECTOR))} "
               "and mlpNx_gelu")
    raise NvilaError(f"{where / 'mm_projector/config.json'}: field 'mm_projector_type' = {kind!r}: {why}")


def _check_preprocessor(where: Path, vision: dict[str, Any]) -> None:
    """SiglipImageProcessor settings must be the ones nvila's siglip processor applies."""
    path = where / "vision_tower" / "preprocessor_config.json"
    if not path.is_file():
        return
    settings = _read_json(path)
    size = vision["image_size"]
    expected = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3, "do_resize": True,
                "do_rescale": True, "do_normalize": True, "size": {"height": size, "width": size}}
    for key, value in expected.items():
        got = settings.get(key, value)
        close = isinstance(value, list) and isinstance(got, list) and len(got) == len(value) and \
            all(abs(a - b) < 1e-6 for a, b in zip(got, value))
        if got != value and not close:
            raise NvilaError(f"{path}: field '{key}' = {got!r}: nvila's siglip processor uses {value!r}")
    if abs(settings.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise NvilaError(f"{path}: field 'rescale_factor' = {settings['rescale_factor']!r}: nvila uses 1/255")


# -- weights ------------------------------------------------------------------------------------------------------
def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors weights (one file or shards with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not files:
            raise NvilaError(f"'{index}': field 'weight_map' is empty.")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        extra = (f" It holds {', '.join(sorted(pickled))}: nvila never unpickles weights; convert them to "
                 "safetensors first.") if pickled else ""
        raise NvilaError(f"'{folder}' has no model.safetensors (nor a model.safetensors.index.json).{extra}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise NvilaError(f"'{path}' is missing (named in {index.name}).")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise NvilaError(f"Cannot read '{path}': {exc}. The file is truncated or not a safetensors file; "
                             "download it again.") from None
    return tensors


def _encoder_prefix(spec: ModelSpec) -> str:
    return "encoder.vision." if spec.encoder["name"] == "siglip" else "encoder.base.vision."


def _projector_shift(spec: ModelSpec) -> int | None:
    """Released projector layer index minus ours: 1 after a downsample block, 0 for plain MLPs, None: Linear."""
    if spec.projector["name"] == "linear":
        return None
    return 1 if spec.compressor["name"] == "stc" else 0


def map_released(spec: ModelSpec, state: dict[str, torch.Tensor], released: dict[str, dict[str, torch.Tensor]],
                 directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Released tensors (``{part: {name: tensor}}``) -> (our state dict, unused released tensors ``part/name``).

    ``state`` is the built model's state dict (names, shapes). Refuses a missing tensor, a mismatched shape and a
    tensor that fits nowhere, naming the file and the key.
    """
    ours: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    enc = _encoder_prefix(spec)
    shift = _projector_shift(spec)
    head = "llm.model.lm_head.weight"
    tied = bool(spec.llm.get("tie_word_embeddings", True))
    for part, tensors in released.items():
        for name, tensor in tensors.items():
            if part == "llm" and name == "lm_head.weight" and tied:
                unused[f"{part}/{name}"] = tensor  # a tied head saved twice: the embedding is the one used
                continue
            if part == "llm":
                target = f"llm.model.{name}"
            elif part == "vision_tower":
                target = enc + name.removeprefix("vision_model.")  # 4.46 names; 5.x saves without the prefix
            else:
                layer, _, rest = name.removeprefix("layers.").partition(".")
                if shift is None:
                    target = f"projector.{layer}" + (f".{rest}" if rest else "")
                elif layer.isdigit() and int(layer) >= shift:
                    target = f"projector.{int(layer) - shift}.{rest}"
                else:
                    target = f"projector.?{name}"
            if target in state:
                ours[target] = tensor
            elif part == "vision_tower" or (part == "llm" and name == "lm_head.weight"):
                unused[f"{part}/{name}"] = tensor  # layers after the feature layer, post_layernorm, a tied head
            else:
                raise NvilaError(f"{directory / part}: tensor '{name}' has no place in the model the config "
                                 f"describes (no '{target}'); the weights belong to another architecture.")
    if tied and head in state:
        state = {k: v for k, v in state.items() if k != head}  # the same tensor as the embedding
    missing = sorted(set(state) - set(ours))
    if missing:
        raise NvilaError(f"{directory}: the released weights lack {len(missing)} tensor(s) the config's model needs, "
                         f"e.g. {', '.join(_released_name(spec, k) for k in missing[:4])}. A weight file is "
                         "missing or belongs to another model.")
    return ours, unused


def _released_name(spec: ModelSpec, ours: str) -> str:
    """Our state-dict key -> ``part/released name``, for messages and export."""
    enc = _encoder_prefix(spec)
    if ours.startswith("llm.model."):
        return "llm/" + ours.removeprefix("llm.model.")
    if ours.startswith(enc):
        return "vision_tower/vision_model." + ours.removeprefix(enc)
    if ours.startswith("projector."):
        layer, _, rest = ours.removeprefix("projector.").partition(".")
        shift = _projector_shift(spec)
        if shift is None:
            return "mm_projector/layers." + ours.removeprefix("projector.")
        return f"mm_projector/layers.{int(layer) + shift}.{rest}"
    raise NvilaError(f"'{ours}' has no place in the released NVILA layout (only SigLIP-based encoders, STC or "
                     "identity compressors, mlp/mlp-3x3/linear projectors and Qwen2 export).")


def load_state(model: NvilaModel, ours: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy mapped tensors into ``model``; language-model rows beyond the released vocabulary get the mean row."""
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in ours.items():
            target = state[key]
            rows_grow = (key.endswith(("embed_tokens.weight", "lm_head.weight")) and tensor.ndim == 2
                         and tensor.shape[1] == target.shape[1] and tensor.shape[0] < target.shape[0])
            if rows_grow:  # resize_token_embeddings(len(tokenizer)) as llava/model/builder.py does, mean rows
                target[: tensor.shape[0]] = tensor.to(target.dtype)
                target[tensor.shape[0]:] = tensor.float().mean(0).to(tensor.dtype).to(target.dtype)
            elif tensor.shape != target.shape:
                raise NvilaError(f"{directory}: tensor '{_released_name(model.spec, key)}' has shape "
                                 f"{tuple(tensor.shape)}, but the config describes {tuple(target.shape)}; the config "
                                 "and the weights disagree.")
            else:
                target.copy_(tensor.to(target.dtype))


def load_official(directory: str | Path, dtype: torch.dtype | None = None) -> tuple[NvilaModel, Released]:
    """Build the nvila model a released NVILA checkpoint directory describes and load its weights."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    configs = read_configs(directory)
    spec, report = official_spec(configs, directory)
    for line in report:
        log.warning("%s", line)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory / "llm", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise NvilaError(f"Cannot load the tokenizer from '{directory / 'llm'}': {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise NvilaError(f"'{directory / 'llm'}': the tokenizer has no chat template (tokenizer_config.json field "
                         "'chat_template'); NVILA's prompts are built with it.")
    released = {part: read_tensors(directory / part) for part in PARTS}
    model = NvilaModel(spec, tokenizer=tokenizer)
    ours, unused = map_released(spec, model.state_dict(), released, directory)
    load_state(model, ours, directory)
    model.spec.llm["vocab_size"] = model.llm.model.get_input_embeddings().num_embeddings  # after the resize
    if dtype is not None:
        model.to(dtype)
    return model.eval(), Released(configs["top"], unused, report)


# -- writing ------------------------------------------------------------------------------------------------------
def official_config(model: NvilaModel, released: Released | None) -> dict[str, dict[str, Any]]:
    """The released layout's config files for ``model`` (``{"top", "llm", "vision_tower", "mm_projector"}``).

    Fields of a released config that nvila does not model are kept as they were.
    """
    spec = model.spec
    base = copy.deepcopy(released.config) if released else {}
    enc, comp, proj, temporal = spec.encoder, spec.compressor, spec.projector, spec.temporal
    siglip = enc["base"] if enc["name"] in ("dyns2", "dynamic-tiles") else enc
    if siglip.get("name") != "siglip" or siglip.get("checkpoint"):
        raise NvilaError(f"model.encoder: {enc['name']} with base {siglip.get('name')} cannot be written in the "
                         "released layout, whose vision tower is a SigLIP described by its config (not a path).")
    if spec.llm.get("checkpoint") or spec.llm["name"] != "qwen2":
        raise NvilaError("model.llm: the released layout needs a qwen2 backbone described by its config.")
    vision = model.encoder.base.vision.config if hasattr(model.encoder, "base") else model.encoder.vision.config
    kept_unused = released.unused if released else {}
    unused_layers = any(k.startswith("vision_tower/") and ".layers." in k for k in kept_unused)
    kept = len(model.encoder.base.vision.encoder.layers if hasattr(model.encoder, "base")
               else model.encoder.vision.encoder.layers)
    layers = vision.num_hidden_layers if unused_layers else kept
    select = siglip.get("feature_layer", -2) if unused_layers else -1
    top: dict[str, Any] = {**base}
    top.update({"architectures": base.get("architectures", ["LlavaLlamaModel"]), "model_type": "llava_llama",
                "mm_vision_select_layer": select, "mm_vision_select_feature": "cls_patch",
                "mm_hidden_size": model.encoder.out_channels, "hidden_size": model.llm.hidden_size,
                "mm_use_im_start_end": False, "vision_resolution": -1,
                "model_dtype": base.get("model_dtype", "torch.bfloat16"), "chat_template": None})
    for key in ("dynamic_s2", "s2", "s2_scales", "s2_max_split_size", "s2_resize_output_to_scale_idx", "min_tiles",
                "max_tiles"):
        top.pop(key, None)
    if enc["name"] == "dyns2":
        top.update(dynamic_s2=True, s2=False, image_aspect_ratio="dynamic_s2",
                   s2_scales=",".join(map(str, enc["scales"])), s2_max_split_size=siglip["image_size"],
                   s2_resize_output_to_scale_idx=-1,
                   max_tiles=enc.get("max_tiles", 12))
    elif enc["name"] == "dynamic-tiles":
        if not enc.get("thumbnail", True) or spec.tile_end != "\n":
            raise NvilaError("model.encoder: released dynamic tiling always adds a thumbnail and writes "
                             "'<image>\\n' per tile (thumbnail: true, tile_end: '\\n').")
        top.update(dynamic_s2=False, s2=False, image_aspect_ratio="dynamic", min_tiles=enc.get("min_tiles", 1),
                   max_tiles=enc.get("max_tiles", 12))
    else:
        top.update(dynamic_s2=False, s2=False, image_aspect_ratio="resize")
    if comp["name"] == "stc" and proj["name"] == "mlp" and comp.get("ratio", 2) == 2 and proj.get("layer_norm", True):
        kind = (base.get("mm_projector_cfg") or {}).get("mm_projector_type")
        kind = kind if kind in ("mlp_downsample", "mlp_downsample_2x2_fix") else "mlp_downsample"
    elif comp["name"] == "stc" and comp.get("ratio") == 3 and proj["name"] == "mlp-3x3" \
            and proj.get("reduction", 3) == 3:
        kind = "mlp_downsample_3x3_fix"
    elif comp["name"] == "identity" and proj["name"] == "linear" and proj.get("bias", True):
        kind = "linear"
    elif comp["name"] == "identity" and proj["name"] == "mlp" and not proj.get("layer_norm", True):
        kind = "mlp2x_gelu"
    else:
        raise NvilaError(f"model.compressor {comp['name']} with model.projector {proj['name']} has no released "
                         "projector type (NVILA's: stc 2 + mlp, stc 3 + mlp-3x3, identity + linear).")
    if temporal["name"] != "temporal-average" or temporal.get("where", "after-projector") != "after-projector":
        raise NvilaError("model.temporal: the released layout pools frames after the projector (temporal-average, "
                         "where: after-projector).")
    image_encoder = {"_target_": "llava.model.encoders.BasicImageEncoder"}
    if spec.image_end != "\n":
        image_encoder["end_tokens"] = spec.image_end
    group, frame_end = temporal.get("group", 8), temporal.get("frame_end", "\n")
    video_encoder = ({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[group, 1, 1]]} if group > 1
                     else {"_target_": "llava.model.encoders.BasicVideoEncoder"})
    if frame_end != "\n":
        video_encoder["end_tokens"] = frame_end
    top["image_encoder"], top["video_encoder"] = json.dumps(image_encoder), json.dumps(video_encoder)
    if temporal.get("frames"):
        top["num_video_frames"] = temporal["frames"]

    dtype = str(released.dtype if released else torch.bfloat16).removeprefix("torch.")
    llm_hf = model.llm.model.config
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": llm_hf.hidden_size,
           "intermediate_size": llm_hf.intermediate_size, "num_hidden_layers": llm_hf.num_hidden_layers,
           "num_attention_heads": llm_hf.num_attention_heads, "num_key_value_heads": llm_hf.num_key_value_heads,
           "max_position_embeddings": llm_hf.max_position_embeddings, "hidden_act": "silu",
           "rms_norm_eps": spec.llm.get("rms_norm_eps", 1e-6), "rope_theta": spec.llm.get("rope_theta", 10000.0),
           "tie_word_embeddings": bool(spec.llm.get("tie_word_embeddings", True)),  # always stated: see module doc
           "vocab_size": model.llm.model.get_input_embeddings().num_embeddings, "use_sliding_window": False,
           "sliding_window": None, "max_window_layers": llm_hf.num_hidden_layers, "rope_scaling": None,
           "bos_token_id": model.tokenizer.bos_token_id, "eos_token_id": model.tokenizer.eos_token_id,
           "model_max_length": spec.max_length, "tokenizer_model_max_length": spec.max_length,
           "tokenizer_padding_side": "right", "torch_dtype": dtype, "transformers_version": "4.46.0",
           "use_cache": True, "attention_dropout": 0.0}
    vision_cfg = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                  "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
                  "num_hidden_layers": layers, "num_attention_heads": vision.num_attention_heads,
                  "image_size": vision.image_size, "patch_size": vision.patch_size, "num_channels": 3,
                  "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False,
                  "attention_dropout": 0.0, "torch_dtype": dtype, "transformers_version": "4.46.0"}
    for key in ("num_image_tokens", "projection_dim", "projector_hidden_act"):  # paligemma leftovers, kept
        if key in (base.get("vision_tower_cfg") or {}):
            vision_cfg[key] = base["vision_tower_cfg"][key]
    projector_cfg = {"architectures": ["MultimodalProjector"], "mm_projector_type": kind,
                     "model_type": "v2l_projector", "torch_dtype": dtype, "transformers_version": "4.46.0"}
    top.update(llm_cfg={**llm, "_name_or_path": "./llm"},
               vision_tower_cfg={**vision_cfg, "_name_or_path": "./vision_tower"},
               mm_projector_cfg={**projector_cfg, "_name_or_path": "./mm_projector"})
    return {"top": top, "llm": llm, "vision_tower": vision_cfg, "mm_projector": projector_cfg}


def released_tensors(model: NvilaModel, released: Released | None, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """``{part: {released name: tensor}}`` for ``model``: every parameter under its released name, and the kept
    tensors the model does not use; a model made by nvila gets an identity final LayerNorm for SigLIP."""
    spec = model.spec
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for key, tensor in model.state_dict().items():
        part, _, name = _released_name(spec, key).partition("/")
        parts[part][name] = tensor.detach().to("cpu", dtype).contiguous()
    if spec.llm.get("tie_word_embeddings", True):
        parts["llm"].pop("lm_head.weight", None)  # transformers saves a tied head once, as the embedding
    if released and released.unused:
        for key, tensor in released.unused.items():
            part, _, name = key.partition("/")
            parts[part][name] = tensor.to("cpu", dtype).contiguous()
    else:
        width = next(t for n, t in parts["vision_tower"].items() if n.endswith("patch_embedding.weight")).shape[0]
        parts["vision_tower"]["vision_model.post_layernorm.weight"] = torch.ones(width, dtype=dtype)
        parts["vision_tower"]["vision_model.post_layernorm.bias"] = torch.zeros(width, dtype=dtype)
    return parts


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_official(model: NvilaModel, directory: str | Path, released: Released | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` in the released NVILA layout, as NVILA's ``save_pretrained`` does, and return the path."""
    directory = Path(directory)
    configs = official_config(model, released)
    dtype = dtype or (released.dtype if released else torch.bfloat16)
    name = str(dtype).removeprefix("torch.")
    for part in ("llm", "vision_tower", "mm_projector"):
        configs[part]["torch_dtype"] = name
        configs["top"][f"{part}_cfg"]["torch_dtype"] = name
    configs["top"]["model_dtype"] = f"torch.{name}"
    tensors = released_tensors(model, released, dtype)
    for part in PARTS:
        folder = directory / part
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("*.safetensors"), *folder.glob("model.safetensors.index.json")]:
            stale.unlink()
        save_file(tensors[part], str(folder / "model.safetensors"), metadata={"format": "pt"})
        _write_json(folder / CONFIG, configs[part])
    model.tokenizer.save_pretrained(directory / "llm")
    template = directory / "llm" / "chat_template.jinja"
    if template.is_file():  # transformers 4.46 (the official code's) reads the template from tokenizer_config.json
        config_path = directory / "llm" / "tokenizer_config.json"
        tokenizer_config = _read_json(config_path)
        tokenizer_config["chat_template"] = template.read_text()
        _write_json(config_path, tokenizer_config)
        template.unlink()
    _write_json(directory / "llm" / "generation_config.json", {
        "bos_token_id": model.tokenizer.bos_token_id, "eos_token_id": model.tokenizer.eos_token_id,
        "transformers_version": "4.46.0"})
    size = configs["vision_tower"]["image_size"]
    _write_json(directory / "vision_tower" / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size}})
    configs["top"]["_name_or_path"] = configs["top"]["resume_path"] = str(directory)
    _write_json(directory / CONFIG, configs["top"])
    return directory
