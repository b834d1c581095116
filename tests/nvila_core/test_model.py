import random

import pytest
import torch
import yaml

from nvila.core.checkpoint import load_checkpoint, read_spec, save_checkpoint
from nvila.core.data.synthetic import make_sample
from nvila.core.errors import NvilaError
from nvila.core.model import MODEL_PARTS, ModelSpec, NvilaModel
from nvila.core.processor import IGNORE_INDEX, collate


@pytest.fixture(scope="module")
def model(registry, tiny_spec):
    torch.manual_seed(0)
    return NvilaModel(tiny_spec, registry).eval()


def samples(n=3, seed=0):
    rng = random.Random(seed)
    return [make_sample(rng, str(i), image_size=32) for i in range(n)]


def encode_all(model, items, prompt_only=False):
    if prompt_only:
        return [model.processor.encode(s.conversation()["conversations"][:1], [s.image], generation_prompt=True)
                for s in items]
    return [model.processor.encode(s.conversation()["conversations"], [s.image]) for s in items]


def test_each_image_placeholder_expands_to_its_visual_token_count(model):
    (enc,) = encode_all(model, samples(1))
    # 32 px / patch 8 = 4x4 features, STC 2x2 -> 4 tokens per image
    assert model.tokens_per_block == 4
    assert int((enc.input_ids == model.image_token_id).sum()) == 4
    assert enc.pixels.shape == (1, 3, 32, 32) and enc.grids == [(1, 1)]


def test_labels_cover_the_assistant_answer_only(model):
    (sample,) = samples(1)
    (enc,) = encode_all(model, [sample])
    supervised = model.tokenizer.decode(enc.labels[enc.labels != IGNORE_INDEX])
    assert supervised.startswith(sample.answer + "<|im_end|>")
    assert "assistant" not in supervised and sample.question not in supervised


def test_visual_tokens_reach_the_language_model(model):
    batch = collate(encode_all(model, samples(2)), model.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**batch)["logits"]
        changed = model(**{**batch, "pixels": batch["pixels"].flip(-1)})["logits"]
    assert not torch.allclose(logits, changed)


def test_padding_does_not_change_a_samples_logits(model):
    encoded = encode_all(model, samples(3))
    batch = collate(encoded, model.tokenizer.pad_token_id)
    alone = collate(encoded[:1], model.tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(**batch)["logits"][0, : alone["input_ids"].shape[1]]
        single = model(**alone)["logits"][0]
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-5)


def test_loss_is_masked_to_supervised_tokens(model):
    batch = collate(encode_all(model, samples(2)), model.tokenizer.pad_token_id)
    loss = model(**batch)["loss"]
    logits = model(**batch)["logits"]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask])
    torch.testing.assert_close(loss, manual)


def test_generate_matches_a_full_forward(model):
    # the engine's own tests (test_engine.py) check generation in depth; this is the model's thin wrapper
    prompts = encode_all(model, samples(2), prompt_only=True)
    batch = collate(prompts, model.tokenizer.pad_token_id, left_pad=True)
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["grids"],
                         max_new_tokens=3)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3
    # the first generated token is the argmax of a plain forward pass at the last prompt position
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: positions count from 0
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["grids"],
                       position_ids=positions)["logits"]
    assert torch.equal(new[:, 0], logits[:, -1].argmax(-1))


def test_checkpoint_round_trip_gives_identical_outputs(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "spec.yaml", "tokenizer"]
    loaded = load_checkpoint(path)
    batch = collate(encode_all(model, samples(2)), model.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], model(**batch)["logits"])


def test_a_checkpoint_of_another_architecture_is_refused(model, tmp_path, tiny_spec, registry):
    path = save_checkpoint(model, tmp_path / "ckpt")
    other = {**tiny_spec, "llm": {**tiny_spec["llm"], "hidden_size": 64}}
    save_checkpoint(NvilaModel(other, registry), tmp_path / "other")
    (tmp_path / "ckpt" / "spec.yaml").write_text((tmp_path / "other" / "spec.yaml").read_text())
    with pytest.raises(NvilaError, match="do not fit this model.s architecture"):
        load_checkpoint(path)


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(NvilaError, match="not an nvila checkpoint directory: missing spec.yaml"):
        load_checkpoint(tmp_path)


def test_the_spec_is_the_one_list_of_parts_and_checkpoints_keep_all_of_it(tiny_spec, registry, tmp_path):
    assert MODEL_PARTS == ("encoder", "compressor", "temporal", "projector", "llm")  # submodules, data-flow order
    assert ModelSpec.slots() == {**{p: p for p in MODEL_PARTS}, "precision": "precision"}
    spec = {**tiny_spec, "precision": {"name": "bf16", "frozen_in_bf16": True}, "max_length": 300}
    path = save_checkpoint(NvilaModel(spec, registry), tmp_path / "ckpt")
    assert read_spec(path) == ModelSpec.from_dict(spec)  # precision and max_length recorded, not dropped
    assert load_checkpoint(path).processor.max_length == 300


def test_a_checkpoint_written_before_the_spec_held_max_length_still_loads(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt")
    saved = yaml.safe_load((path / "spec.yaml").read_text())
    old = {"model": {k: v for k, v in saved["model"].items() if k not in ("precision", "max_length")},
           "max_length": 123}
    (path / "spec.yaml").write_text(yaml.safe_dump(old))
    assert read_spec(path).max_length == 123 and read_spec(path).precision == {"name": "fp32"}


def test_an_unknown_spec_field_is_refused_with_a_suggestion(tiny_spec):
    with pytest.raises(NvilaError, match="Unknown model field.*'compresor'.*Did you mean 'compressor'"):
        ModelSpec.from_dict({**tiny_spec, "compresor": {"name": "stc"}})
