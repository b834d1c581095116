"""Sequence packing: a packed batch computes exactly what the same samples compute one by one."""

import random

import pytest
import torch

from nvila.core.data.packing import Batching, block_causal_mask, collate_packed, model_inputs, pack_rows
from nvila.core.data.skips import Skipped
from nvila.core.data.synthetic import make_sample
from nvila.core.losses import shift_labels
from nvila.core.model import NvilaModel
from nvila.core.processor import IGNORE_INDEX, collate


def conversations(rng: random.Random, n: int):
    """Mixed samples: images with one or several turns, and text-only ones of very different lengths."""
    out = []
    for i in range(n):
        s = make_sample(rng, str(i), image_size=32)
        turns = [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]
        for _ in range(rng.randrange(3)):
            turns += [{"from": "human", "value": "and again " * rng.randint(1, 12)},
                      {"from": "gpt", "value": " ".join(rng.choice(["red", "blue", "square"]) for _ in range(4))}]
        if i % 3 == 2:  # text only
            out.append(([{"from": "human", "value": "tell me " * rng.randint(1, 30)},
                         {"from": "gpt", "value": "yes " * rng.randint(1, 10)}], []))
        else:
            out.append((turns, [s.image]))
    return out


@pytest.fixture(scope="module")
def encoded(registry, tiny_spec):
    processor = NvilaModel(tiny_spec, registry).processor
    return [processor.encode(turns, images) for turns, images in conversations(random.Random(0), 14)]


def targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels[None]) != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_is_the_token_weighted_mean_of_the_samples_run_one_by_one(encoded, registry, tiny_spec,
                                                                            attention):
    spec = {**tiny_spec, "llm": {**tiny_spec["llm"], "attn_implementation": attention}}
    torch.manual_seed(0)
    model = NvilaModel(spec, registry).eval()
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        alone = [model(**{k: v for k, v in collate([s], pad).items()})["loss"] for s in encoded]
        weights = torch.tensor([targets(s.labels) for s in encoded], dtype=torch.float64)
        expected = (torch.stack(alone).double() * weights).sum() / weights.sum()

        rows = list(pack_rows(encoded, budget=256, open_rows=4))
        assert len(rows) < len(encoded) / 2, "several samples share each row"
        batch = collate_packed(rows, pad)
        packed = model(**model_inputs(batch, model.llm))
        padded = model(**collate(encoded, pad))["loss"]
    torch.testing.assert_close(packed["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded.double(), expected, rtol=1e-5, atol=1e-6)

    # and each sample's logits are the ones it gets alone (no attention across boundaries)
    with torch.no_grad():
        for b, row in enumerate(rows):
            start = 0
            for s in row:
                n = len(s.input_ids)
                solo = model(**collate([s], pad))["logits"][0]
                torch.testing.assert_close(packed["logits"][b, start:start + n], solo, rtol=1e-4, atol=1e-5)
                start += n


def test_without_the_block_mask_samples_would_see_each_other(encoded, registry, tiny_spec):
    torch.manual_seed(0)
    model = NvilaModel(tiny_spec, registry).eval()
    pad = model.tokenizer.pad_token_id
    rows = list(pack_rows(encoded[:4], budget=400))
    batch = model_inputs(collate_packed(rows, pad), model.llm)
    with torch.no_grad():
        good = model(**batch)["loss"]
        leaky = model(**{**batch, "attention_mask": torch.ones_like(batch["input_ids"])})["loss"]
    assert not torch.allclose(good, leaky, atol=1e-4), "the mask is what keeps samples apart"


def test_block_causal_mask():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = block_causal_mask(seg)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert block_causal_mask(seg, torch.bfloat16).dtype == torch.bfloat16


def test_packing_places_every_sample_once_within_budget_and_fills_rows(encoded):
    rng = random.Random(1)
    many = [encoded[rng.randrange(len(encoded))] for _ in range(300)]
    rows = list(pack_rows(many, budget=512, open_rows=8))
    assert sorted(id(s) for row in rows for s in row) == sorted(id(s) for s in many)
    used = [sum(len(s.input_ids) for s in row) for row in rows]
    assert max(used) <= 512
    assert sum(used) / (512 * len(rows)) > 0.95
    with pytest.raises(ValueError, match="cannot be packed"):
        list(pack_rows(encoded, budget=10))


def test_packed_labels_never_target_the_next_samples_start(encoded):
    batch = collate_packed([encoded[:3]], pad_id=0)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[:3] == [0, len(encoded[0].input_ids), len(encoded[0].input_ids) + len(encoded[1].input_ids)]
    assert all(batch["labels"][0, i] == IGNORE_INDEX for i in starts)
    assert batch["num_samples"] == 3 and batch["pixels"].shape[0] == sum(len(s.grids) for s in encoded[:3])


def test_batches_carry_the_skips_met_while_forming_them(encoded):
    bad = [Skipped("bad_image", f"s.tar:{i}") for i in range(3)]
    items = [bad[0], *encoded[:4], bad[1], *encoded[4:6], bad[2]]
    batches = list(Batching(batch_size=4, pad_id=0)(items))
    assert [b["num_samples"] for b in batches] == [4, 2]
    assert [len(b["skipped"]) for b in batches] == [1, 2], "a trailing skip rides on the last batch"
    packed = list(Batching(batch_size=2, pad_id=0, pack_tokens=100)(items))
    assert sum(b["num_samples"] for b in packed) + sum(len(b["skipped"]) for b in packed) == len(items)
    assert any(s.reason == "too_long" for b in packed for s in b["skipped"]), "samples over the budget are skipped"
    assert "skipped" not in model_inputs(packed[0]) and "segment_ids" not in model_inputs(packed[0])


def test_training_with_packing_runs_through_the_lightning_cli(synth_data, tmp_path, tiny_spec):
    from nvila.workflows.cli import run_cli

    enc, llm = tiny_spec["encoder"], tiny_spec["llm"]
    cli = run_cli([
        "fit", "--config", "demo", f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=6", "--trainer.val_check_interval=6",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.packing=true",
        "--data.pack_tokens=256", "--data.batch_size=2", "--data.num_workers=1", "--model.warmup_steps=1",
        *[f"--model.encoder.{k}={v}" for k, v in enc.items() if k != "name"],
        *[f"--model.llm.{k}={v}" for k, v in llm.items() if k != "name"],
    ])
    assert cli.trainer.global_step == 6
    assert cli.datamodule.health.samples > 6 * 2 * 3, "several samples in each of the two rows of a batch"


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_loss_matches_on_a_gpu(encoded, registry, tiny_spec, attention):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn")
    spec = {**tiny_spec, "llm": {**tiny_spec["llm"], "attn_implementation": attention}}
    torch.manual_seed(0)
    model = NvilaModel(spec, registry).to("cuda", torch.bfloat16).eval()
    pad = model.tokenizer.pad_token_id

    def cuda(batch):
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    with torch.no_grad():
        alone = torch.stack([model(**cuda(collate([s], pad)))["loss"].float() for s in encoded])
        weights = torch.tensor([targets(s.labels) for s in encoded], dtype=torch.float32, device="cuda")
        expected = (alone * weights).sum() / weights.sum()
        batch = cuda(collate_packed(list(pack_rows(encoded, budget=256)), pad))
        packed = model(**model_inputs(batch, model.llm, torch.bfloat16))["loss"].float()
    torch.testing.assert_close(packed, expected, rtol=2e-2, atol=2e-2)


def test_the_flash_attention_layout_is_one_row_whose_position_ids_restart_per_sample(encoded, registry, tiny_spec):
    """The inputs made for flash-attention (one flattened row, no mask) are checked on the CPU through
    transformers' own packed-sequence detection, which SDPA also applies when no mask is given."""
    from types import SimpleNamespace

    flash = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    torch.manual_seed(0)
    model = NvilaModel(tiny_spec, registry).eval()
    pad = model.tokenizer.pad_token_id
    batch = collate_packed(list(pack_rows(encoded, budget=256, open_rows=4)), pad)
    flat = model_inputs(batch, flash)
    assert flat["attention_mask"] is None and flat["input_ids"].shape == (1, batch["input_ids"].numel())
    with torch.no_grad():
        expected = model(**model_inputs(batch, model.llm))["loss"]
        got = model(**flat)["loss"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
