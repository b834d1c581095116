"""Released NVILA checkpoints in and out, on tiny checkpoints written in the released layout by
scripts/write_tiny_released.py. (test_official_source.py compares with VILA's own code when its source is at hand.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from nvila.core.errors import NvilaError
from nvila.workflows.commands import main
from nvila.workflows.official import load_official
from nvila.workflows.pretrained import NVILA
from tests.workflows.released import write_released

VARIANTS = ["nvila-8b", "nvila-lite"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {v: write_released(root / v, v) for v in VARIANTS}


def picture(width: int = 100, height: int = 60, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")


def chat(*parts):
    return [{"role": "user", "content": [*parts]}]


def logits(model: NVILA, conversation) -> torch.Tensor:
    inputs = model.processor(conversation)
    with torch.no_grad():
        return model(**inputs)["logits"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_released_tensor_lands_where_the_released_modules_use_it(released, variant):
    """Outputs equal the released modules assembled directly from the files with transformers."""
    directory = released[variant]
    model = NVILA.from_pretrained(directory).model
    top = json.loads((directory / "config.json").read_text())
    vision_cfg = json.loads((directory / "vision_tower" / "config.json").read_text())
    siglip = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vision_cfg.items() if k != "architectures"}))
    siglip.load_state_dict({k.removeprefix("vision_model."): v.float() for k, v in
                            load_file(str(directory / "vision_tower" / "model.safetensors")).items()})
    size = vision_cfg["image_size"]
    tiles = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = siglip(pixel_values=tiles, output_hidden_states=True).hidden_states[top["mm_vision_select_layer"]]
        base = model.encoder.base
        torch.testing.assert_close(base(tiles, [(1, 1)] * 2).flatten(1, 2), reference)
        llm = Qwen2ForCausalLM.from_pretrained(directory / "llm", torch_dtype=torch.float32)
        vocab = llm.config.vocab_size  # the released rows; the rows added for VILA's tokens are checked below
        embeds = torch.randn(1, 5, llm.config.hidden_size)
        torch.testing.assert_close(model.llm(embeds)[..., :vocab], llm(inputs_embeds=embeds).logits)
    released_proj = load_file(str(directory / "mm_projector" / "model.safetensors"))
    for key, value in released_proj.items():  # layers.N.* -> our projector layer N-1
        layer, _, rest = key.removeprefix("layers.").partition(".")
        assert torch.equal(model.projector.get_parameter(f"{int(layer) - 1}.{rest}"), value.float())


@pytest.mark.parametrize("variant", VARIANTS)
def test_vocabulary_is_resized_to_the_tokenizer_with_mean_rows(released, variant):
    directory = released[variant]
    model = NVILA.from_pretrained(directory).model
    vocab = json.loads((directory / "llm" / "config.json").read_text())["vocab_size"]
    rows = model.llm.model.get_input_embeddings().weight
    assert rows.shape[0] == len(model.tokenizer) > vocab  # <vila/sentinel>, <vila/video> after the LLM's vocabulary
    mean = rows[:vocab].mean(0).to(torch.bfloat16).float()
    assert torch.equal(rows[vocab:], mean.expand(rows.shape[0] - vocab, -1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_export_load_gives_identical_tensors_and_outputs(released, variant, tmp_path):
    model = NVILA.from_pretrained(released[variant])
    official = model.save_pretrained(tmp_path / "official", layout="official")
    via_nvila = NVILA.from_pretrained(model.save_pretrained(tmp_path / "nvila", layout="nvila"))
    official_again = via_nvila.save_pretrained(tmp_path / "official-again", layout="official")
    conversation = chat({"type": "image", "image": picture()}, {"type": "text", "text": "What is it?"})
    expected = logits(model, conversation)
    for directory in (official, tmp_path / "nvila", official_again):
        again = NVILA.from_pretrained(directory)
        a, b = model.model.state_dict(), again.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), directory
        assert torch.equal(logits(again, conversation), expected)
        assert again.generate(conversation, max_new_tokens=5) == model.generate(conversation, max_new_tokens=5)
    for part in ("vision_tower", "mm_projector"):  # written back exactly as released, unused SigLIP layers too
        first = load_file(str(released[variant] / part / "model.safetensors"))
        second = load_file(str(official_again / part / "model.safetensors"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((official / "config.json").read_text())["mm_projector_cfg"]["mm_projector_type"] == \
        json.loads((released[variant] / "config.json").read_text())["mm_projector_cfg"]["mm_projector_type"]


def test_image_end_tokens_follow_each_image_and_each_lite_tile(released):
    for variant, ends_per_image in (("nvila-8b", 1), ("nvila-lite", None)):
        model = NVILA.from_pretrained(released[variant])
        processor = model.model.processor
        newline = model.tokenizer("\n", add_special_tokens=False).input_ids
        request = chat({"type": "image", "image": picture(100, 60)}, {"type": "text", "text": "What is it?"})
        ids = model.processor(request)["input_ids"][0].tolist()
        grid = model.model.encoder.processor().plan(100, 60).grid
        if ends_per_image:  # DynS2: one stitched image, then one newline (the typed one after <image> is dropped)
            expected = processor.image_ids(grid)
            assert expected[-1:] == newline and expected.count(processor.image_token_id) == len(expected) - 1
        else:  # NVILA-Lite: every tile is an image: tokens, end newline, the '<image>\n' newline of its prompt
            expected = processor.image_ids(grid)
            per_tile = [processor.image_token_id] * processor.tokens_per_block + newline + newline
            assert expected == per_tile * grid[1]
        start = ids.index(processor.image_token_id)
        assert ids[start:start + len(expected)] == expected
        assert model.tokenizer.decode(ids[start + len(expected):]).startswith("What is it?")


def test_nvilas_own_models_keep_one_newline_after_a_typed_image_placeholder():
    from nvila.core.model import NvilaModel
    from nvila.core.testing import TINY_MODEL

    model = NvilaModel(TINY_MODEL)
    newline = model.tokenizer("\n", add_special_tokens=False).input_ids
    encoded = model.processor.encode([{"from": "human", "value": "<image>\nWhat?"}], [picture()])
    ids = encoded.input_ids.tolist()
    last = len(ids) - 1 - ids[::-1].index(model.image_token_id)
    assert ids[last + 1:last + 1 + len(newline)] == newline
    assert ids[last + 1 + len(newline):last + 1 + 2 * len(newline)] != newline  # one, not two


def test_nvila_convert_both_ways(released, tmp_path, capsys):
    assert main(["convert", "--to", "nvila", "--in", str(released["nvila-lite"]), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "spec.yaml").is_file() and (tmp_path / "a" / "released" / "config.json").is_file()
    assert main(["convert", "--to", "official", "--in", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"config.json", "llm", "vision_tower", "mm_projector"}
    assert main(["convert", "--to", "official", "--in", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_model_made_by_nvila_exports_to_the_released_layout(tmp_path):
    from nvila.core.model import NvilaModel

    spec = {"encoder": {"name": "dyns2", "scales": [32, 64], "max_tiles": 4,
                        "base": {"name": "siglip", "image_size": 32, "feature_layer": -2, "num_layers": 2}},
            "compressor": {"name": "stc", "ratio": 2}, "projector": {"name": "mlp"},
            "llm": {"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1}}
    model = NVILA(NvilaModel(spec))
    conversation = chat({"type": "image", "image": picture()}, {"type": "text", "text": "What?"})
    directory = model.save_pretrained(tmp_path / "official", layout="official", dtype=torch.float32)
    again = NVILA.from_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["mm_vision_select_layer"] == -1 and config["vision_tower_cfg"]["num_hidden_layers"] == 1
    assert again.spec.encoder["alpha"] == "drop"  # what the official code will do with it
    torch.testing.assert_close(logits(again, conversation)[..., :len(model.tokenizer)],
                               logits(model, conversation), rtol=1e-4, atol=1e-4)


# -- bad input: one clear message naming the file and the field -------------------------------------------------
def broken(released, tmp_path, variant="nvila-8b") -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(released[variant], directory)
    return directory


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(NvilaError, match="is not a checkpoint"):
        NVILA.from_pretrained(tmp_path)
    with pytest.raises(NvilaError, match="not a directory"):
        NVILA.from_pretrained(tmp_path / "missing")


def test_missing_and_truncated_weight_files(released, tmp_path):
    directory = broken(released, tmp_path)
    (directory / "vision_tower" / "model.safetensors").unlink()
    with pytest.raises(NvilaError, match=r"vision_tower' has no model.safetensors"):
        NVILA.from_pretrained(directory)
    (directory / "vision_tower" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(NvilaError, match="never unpickles"):
        NVILA.from_pretrained(directory)
    shutil.copy(released["nvila-8b"] / "vision_tower" / "model.safetensors", directory / "vision_tower")
    path = directory / "mm_projector" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(NvilaError, match=r"mm_projector/model.safetensors.*truncated"):
        NVILA.from_pretrained(directory)
    (directory / "llm" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(NvilaError, match="model-00002-of-00002.safetensors' is missing"):
        NVILA.from_pretrained(directory)


def test_mismatched_shapes_name_the_tensor(released, tmp_path):
    directory = broken(released, tmp_path)
    path = directory / "mm_projector" / "model.safetensors"
    weights = load_file(str(path))
    weights["layers.4.weight"] = weights["layers.4.weight"][:, :-1].contiguous()
    save_file(weights, str(path))
    with pytest.raises(NvilaError, match=r"'mm_projector/layers.4.weight' has shape"):
        NVILA.from_pretrained(directory)


@pytest.mark.parametrize("file,field,value,message", [
    ("llm/config.json", "architectures", ["LlamaForCausalLM"], "Qwen2"),
    ("llm/config.json", "model_type", "llama", "Qwen2"),
    ("vision_tower/config.json", "architectures", ["CLIPVisionModel"], "SigLIP"),
    ("mm_projector/config.json", "mm_projector_type", "mlp_downsample_3x3_s2", "no projector with its layers"),
    ("mm_projector/config.json", "mm_projector_type", "mlp4x_gelu", "no projector with its layers"),
    ("mm_projector/config.json", "mm_projector_type", "ldp", "unknown projector type"),
    ("config.json", "architectures", ["LlavaMistralModel"], "not an NVILA model"),
    ("config.json", "image_aspect_ratio", "pad", "supported: dynamic_s2"),
])
def test_unknown_architecture_or_projector_type(released, tmp_path, file, field, value, message):
    directory = broken(released, tmp_path, "nvila-lite")
    changes = {field: value}
    if field == "model_type":
        changes["architectures"] = None
    if field == "image_aspect_ratio":
        changes["dynamic_s2"] = False
    edit_json(directory / file, **changes)
    with pytest.raises(NvilaError, match=message) as error:
        NVILA.from_pretrained(directory)
    assert file in str(error.value) and (field in str(error.value) or "architectures" in str(error.value))


def test_unknown_fields_are_reported_and_written_back(released, tmp_path, caplog):
    directory = broken(released, tmp_path)
    edit_json(directory / "config.json", brand_new_field=7)
    model, report = load_official(directory)
    assert any("brand_new_field" in line for line in report.report)
    out = NVILA(model, report).save_pretrained(tmp_path / "out", layout="official")
    assert json.loads((out / "config.json").read_text())["brand_new_field"] == 7


def test_generate_and_eval_take_a_released_checkpoint(released, tmp_path, capsys):
    from nvila.core.data.synthetic import write_dataset

    image = tmp_path / "picture.png"
    picture().save(image)
    assert main(["generate", "--ckpt", str(released["nvila-8b"]), "--image", str(image), "--prompt", "What is it?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    write_dataset(tmp_path / "data", train=1, val=4, image_size=32)
    assert main(["eval", "--ckpt", str(released["nvila-lite"]), "--shards", str(tmp_path / "data" / "val")]) == 0
    assert "on 4 questions" in capsys.readouterr().out
