"""Run NVlabs/VILA's own code (a local copy of its ``llava/`` folder) on a released-layout checkpoint, on a CPU.

Used by ``test_official_source.py`` when ``NVILA_VILA_SOURCE`` names a folder that holds VILA's ``llava/``
(e.g. ``git --git-dir=<VILA clone>/.git archive HEAD llava | tar -x -C /tmp/vila``); nothing is downloaded.

What runs is VILA's code: ``LlavaMetaForCausalLM.generate_content`` (media extraction, tiling, the prompt),
``_embed`` (splicing media embeddings into the text), ``LlavaMetaModel.encode_images`` and
``merge_features_for_dynamic_s2``, ``VisionTowerDynamicS2``/``VisionTower`` feature selection,
``MultimodalProjector`` (downsample blocks and MLPs), ``BasicImageEncoder`` / ``TSPVideoEncoder`` (end tokens,
pooling), ``mm_utils`` (dynamic_preprocess, dynamic_s2_preprocess, process_image(s)) and
``tokenize_conversation``. Only what cannot run here is replaced: modules VILA imports for training or GPUs
(hydra, s2wrapper, cv2, deepspeed helpers) become empty stand-ins, ``Tensor.cuda`` and ``Tensor.half`` are
identities while generate_content runs (CPU, float32 pixels), the LLM's ``generate`` returns after ``_embed``
(the embeddings are what is compared), and the SigLIP image processor is given the 4.46 shape VILA expects
(``size`` a dict and no ``crop_size``; transformers 5 adds ``crop_size = None``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM, SiglipVisionModel

STUBS = ("hydra", "hydra.utils", "s2wrapper", "cv2", "requests", "llava.train", "llava.train.sequence_parallel",
         "llava.utils.distributed", "llava.model.language_model.builder", "llava.model.multimodal_encoder.builder",
         "llava.model.multimodal_projector.builder", "llava.model.utils", "llava.model.encoders.base_stub")


class _Stub(types.ModuleType):
    """An imported name that VILA's module only needs at training time: any attribute is a no-op function."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def import_official(root: str | Path) -> dict[str, Any]:
    """VILA's modules from ``root/llava`` without running ``llava/__init__.py`` (which imports training code)."""
    root = Path(root)
    for name in list(sys.modules):
        if name == "llava" or name.startswith("llava."):
            del sys.modules[name]
    for package in ("llava", "llava.model", "llava.model.encoders", "llava.model.encoders.image",
                    "llava.model.encoders.video", "llava.model.multimodal_projector", "llava.model.multimodal_encoder",
                    "llava.utils", "llava.model.language_model"):
        module = types.ModuleType(package)
        module.__path__ = [str(root / package.replace(".", "/"))]
        sys.modules[package] = module
    for name in STUBS:
        sys.modules[name] = _Stub(name)
    loguru = types.ModuleType("loguru")
    loguru.logger = logging.getLogger("llava")
    sys.modules.setdefault("loguru", loguru)
    names = {"constants": "llava.constants", "mm_utils": "llava.mm_utils", "tokenizer": "llava.utils.tokenizer",
             "media": "llava.utils.media", "image_encoder": "llava.model.encoders.image.basic",
             "tsp": "llava.model.encoders.video.tsp", "video_basic": "llava.model.encoders.video.basic",
             "projector": "llava.model.multimodal_projector.base_projector",
             "vision": "llava.model.multimodal_encoder.vision_encoder", "config": "llava.model.configuration_llava",
             "arch": "llava.model.llava_arch"}
    sys.modules["llava.utils"].logging = importlib.import_module("llava.utils.logging")
    sys.modules["llava.utils"].make_list = lambda x: x if isinstance(x, list) else [x]
    import transformers.modeling_utils as hf_modeling  # names llava_arch imports for load_pretrained (not run here)

    for name in ("no_init_weights", "ContextManagers"):
        if not hasattr(hf_modeling, name):
            setattr(hf_modeling, name, contextlib.nullcontext)
    modules = {key: importlib.import_module(name) for key, name in names.items()}
    sys.modules["llava.model.encoders"].BasicImageEncoder = modules["image_encoder"].BasicImageEncoder
    return modules


class _ImageProcessor:
    """The SiglipImageProcessor the releases ran with (transformers 4.46: Pillow resizing), with the attributes VILA
    reads from it (``size`` a dict, no ``crop_size``). transformers 5's default SiglipImageProcessor resizes with
    torchvision instead (up to 0.008 apart on a 100x60 image); its Pillow backend is 4.46's."""

    def __init__(self, folder: Path) -> None:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        self.inner = SiglipImageProcessorPil.from_pretrained(folder)
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        self.size = dict(settings["size"])
        self.image_mean = settings["image_mean"]

    def preprocess(self, image: Any, return_tensors: str = "pt") -> Any:
        return self.inner.preprocess(image, return_tensors=return_tensors)


def official_model(vila: dict[str, Any], directory: str | Path) -> Any:
    """VILA's model classes around the released checkpoint's modules, loaded as VILA's builders load them."""
    directory = Path(directory)
    arch, projector = vila["arch"], vila["projector"]
    top = json.loads((directory / "config.json").read_text())
    config = vila["config"].LlavaConfig(**{k: v for k, v in top.items()
                                           if k not in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")})
    config.resume_path = str(directory)

    class Official(arch.LlavaMetaModel, arch.LlavaMetaForCausalLM):
        training = False
        device = torch.device("cpu")

        def generate(self, input_ids=None, media=None, media_config=None, attention_mask=None, **kwargs):
            self.embeds, _, self.mask = self._embed(input_ids, media, media_config, None, attention_mask)
            return torch.tensor([[self.tokenizer.eos_token_id]])

    model = Official()
    model.config = config
    tokenizer = AutoTokenizer.from_pretrained(directory / "llm", padding_side="right")
    tokenizer.media_tokens, tokenizer.media_token_ids = vila["constants"].MEDIA_TOKENS, {}
    for name, token in vila["constants"].MEDIA_TOKENS.items():  # language_model/builder.py
        tokenizer.add_tokens([token], special_tokens=True)
        tokenizer.media_token_ids[name] = tokenizer.convert_tokens_to_ids(token)
    llm = Qwen2ForCausalLM.from_pretrained(directory / "llm", torch_dtype=torch.float32)
    llm.resize_token_embeddings(len(tokenizer))  # model/builder.py: load_pretrained_model
    model.llm, model.tokenizer = llm.eval(), tokenizer

    cls = vila["vision"].VisionTowerDynamicS2 if config.dynamic_s2 else vila["vision"].VisionTower
    tower = cls(str(directory / "vision_tower"), config)
    siglip = SiglipVisionModel.from_pretrained(directory / "vision_tower", torch_dtype=torch.float32)
    weights = {k.removeprefix("vision_model."): v.float() for k, v in
               load_file(str(directory / "vision_tower" / "model.safetensors")).items()}
    siglip.load_state_dict(weights, strict=True)
    tower.vision_tower, tower.is_loaded = siglip.eval(), True
    tower.image_processor = _ImageProcessor(directory / "vision_tower")
    model.vision_tower = tower

    kind = json.loads((directory / "mm_projector" / "config.json").read_text())["mm_projector_type"]
    mm = projector.MultimodalProjector(projector.MultimodalProjectorConfig(kind), config)
    weights = load_file(str(directory / "mm_projector" / "model.safetensors"))
    mm.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    model.mm_projector = mm.eval()
    model.encoders = {}
    for name in ("image", "video"):
        spec = getattr(config, f"{name}_encoder")
        spec = json.loads(spec) if isinstance(spec, str) else dict(spec)
        target = spec.pop("_target_").rsplit(".", 1)[1]
        module = {"BasicImageEncoder": vila["image_encoder"], "BasicVideoEncoder": vila["video_basic"],
                  "TSPVideoEncoder": vila["tsp"]}[target]
        model.encoders[name] = getattr(module, target)(model, **spec)
    return model


@contextlib.contextmanager
def on_cpu_in_float32() -> Iterator[None]:
    """generate_content moves input ids to CUDA and pixels to float16: identities here."""
    cuda, half = torch.Tensor.cuda, torch.Tensor.half
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.half = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.half = cuda, half


@torch.no_grad()
def official_image_embeds(model: Any, prompt: list[Any]) -> torch.Tensor:
    """Input embeddings (L, D) that VILA's generate_content builds for a prompt of PIL images and text."""
    with on_cpu_in_float32():
        model.generate_content(list(prompt), generation_config=GenerationConfig(max_new_tokens=1))
    return model.embeds[0][model.mask[0]]


@torch.no_grad()
def official_video_embeds(vila: dict[str, Any], model: Any, frames: list[Any], text: str) -> torch.Tensor:
    """Input embeddings (L, D) for one video and text, as the released generate_content builds them: the video
    token (extract_media at the NVILA release), frames through process_images (llava_arch.py, video branch), then
    _embed with the video encoder."""
    token = vila["constants"].MEDIA_TOKENS["video"]
    conversation = [{"from": "human", "value": token + text}]
    with on_cpu_in_float32():
        input_ids = vila["tokenizer"].tokenize_conversation(conversation, model.tokenizer, add_generation_prompt=True)
        pixels = vila["mm_utils"].process_images(frames, model.vision_tower.image_processor, model.config)
    embeds, _, mask = model._embed(input_ids[None], {"video": [pixels]}, {"video": {}}, None, None)
    return embeds[0][mask[0]]
