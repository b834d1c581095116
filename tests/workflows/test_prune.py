"""`nvila prune`: DeltaLoss and random pruning through Lightning's predict loop, per source data set."""

import io
import json
import random

import pytest
import torch
import webdataset as wds

from nvila.core.checkpoint import load_checkpoint, save_checkpoint
from nvila.core.data.shards import SampleDecoder, decoded_stream, find_shards
from nvila.core.data.shardset import read_manifest
from nvila.core.data.synthetic import make_sample
from nvila.core.model import NvilaModel
from nvila.core.processor import collate
from nvila.core.pruning import answer_losses, select
from nvila.workflows.commands import main
from nvila.workflows.prune import HISTOGRAM_FILE, REPORT_FILE, SCORES_FILE

SOURCES = {"shapes-a": 30, "shapes-b": 20}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """50 samples from two source data sets, in two shards."""
    root = tmp_path_factory.mktemp("mixture")
    rng = random.Random(5)
    with wds.ShardWriter(str(root / "shard-%06d.tar"), maxcount=25, verbose=0) as sink:
        for source, n in SOURCES.items():
            for i in range(n):
                s = make_sample(rng, f"{source}-{i:03d}", image_size=32)
                png = io.BytesIO()
                s.image.save(png, format="PNG")
                sink.write({"__key__": s.key, "png": png.getvalue(),
                            "json": json.dumps({**s.conversation(), "source": source}).encode()})
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, registry, tiny_spec):
    """A small and a larger random-initialised model, saved as nvila checkpoint directories."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    save_checkpoint(NvilaModel(tiny_spec, registry), root / "small")
    large = {**tiny_spec, "llm": {**tiny_spec["llm"], "hidden_size": 48, "num_layers": 2, "num_heads": 2}}
    save_checkpoint(NvilaModel(large, registry), root / "large")
    return root


def kept_ids(out):
    return [s["__key__"] for s in wds.WebDataset([str(p) for p in find_shards(out)], shardshuffle=False,
                                                  empty_check=False)]


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5])
def test_deltaloss_keeps_the_top_fraction_of_each_source(mixture, checkpoints, tmp_path, keep, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--pruner", "deltaloss", "--keep", str(keep), "--in", str(mixture), "--out", str(out),
                 "--small-ckpt", str(checkpoints / "small"), "--large-ckpt", str(checkpoints / "large"),
                 "--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu", "--devices", "1",
                 "--shard-size", "16"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / REPORT_FILE).read_text())
    for source, n in SOURCES.items():
        assert report["per_source"][source]["kept"] == round(keep * n)
        assert report["per_source"][source]["kept_fraction"] == pytest.approx(round(keep * n) / n)
    assert report["kept"] == sum(round(keep * n) for n in SOURCES.values()) and report["threshold"] is not None
    assert (out / HISTOGRAM_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [json.loads(line) for line in (out / SCORES_FILE).read_text().splitlines()]
    assert len(rows) == 50
    for source in SOURCES:  # every kept sample outscores every dropped one of its source
        mine = [r for r in rows if r["source"] == source]
        assert min(r["score"] for r in mine if r["kept"]) >= max(r["score"] for r in mine if not r["kept"])
        assert min(r["score"] for r in mine if r["kept"]) == report["per_source"][source]["threshold"]
    assert sorted(kept_ids(out)) == sorted(r["id"].rsplit(":", 1)[1] for r in rows if r["kept"])
    assert "kept" in capsys.readouterr().out


def test_deltaloss_scores_are_the_small_models_answer_loss_minus_the_large_models(mixture, checkpoints, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--pruner", "deltaloss", "--keep", "0.5", "--in", str(mixture), "--out", str(out),
                 "--small-ckpt", str(checkpoints / "small"), "--large-ckpt", str(checkpoints / "large"),
                 "--batch-size", "16", "--num-workers", "0", "--accelerator", "cpu", "--devices", "1"]) == 0
    scores = {r["id"]: r["score"] for r in map(json.loads, (out / SCORES_FILE).read_text().splitlines())}
    small, large = load_checkpoint(checkpoints / "small"), load_checkpoint(checkpoints / "large")
    shards = find_shards(mixture)
    pairs = zip(decoded_stream(shards, SampleDecoder(small.processor)),
                decoded_stream(shards, SampleDecoder(large.processor)))
    with torch.no_grad():
        for n, (a, b) in enumerate(pairs):
            if n % 7:
                continue
            alone_small = small(**collate([a], small.tokenizer.pad_token_id))["loss"]  # mean over answer tokens
            alone_large = large(**collate([b], large.tokenizer.pad_token_id))["loss"]
            assert scores[a.key] == pytest.approx(float(alone_small - alone_large), abs=1e-4)


def test_random_pruning_needs_no_model_and_depends_on_its_seed(mixture, tmp_path):
    runs = {}
    for seed in (1, 2):
        out = tmp_path / f"r{seed}"
        assert main(["prune", "--pruner", f"{{name: random, seed: {seed}}}", "--keep", "0.5", "--in", str(mixture),
                     "--out", str(out), "--num-workers", "0", "--accelerator", "cpu", "--devices", "1"]) == 0
        runs[seed] = set(kept_ids(out))
        assert len(runs[seed]) == 25
    assert runs[1] != runs[2]


def test_a_second_prune_into_the_same_out_replaces_the_first_and_foreign_shards_are_refused(mixture, tmp_path,
                                                                                             capsys):
    out = tmp_path / "pruned"
    args = ["--keep", "0.5", "--in", str(mixture), "--out", str(out), "--num-workers", "0", "--accelerator", "cpu",
            "--devices", "1", "--shard-size", "4"]
    assert main(["prune", "--pruner", "{name: random, seed: 1}", *args]) == 0
    assert main(["prune", "--pruner", "{name: random, seed: 2}", "--keep", "0.1", *args[2:]]) == 0
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["writer"] == "nvila prune" and manifest["samples"] == 5
    assert len(kept_ids(out)) == 5 and len(find_shards(out)) == 2  # none of the first run's 7 shards is left
    (out / "mine.tar").write_bytes(b"")
    capsys.readouterr()
    assert main(["prune", "--pruner", "random", *args]) == 2
    assert "holds *.tar files that nvila did not write there (mine.tar" in capsys.readouterr().err
    assert (out / "mine.tar").exists() and len(find_shards(out)) == 3


def test_deltaloss_without_checkpoints_says_which_flags_are_missing(mixture, tmp_path, capsys):
    code = main(["prune", "--pruner", "deltaloss", "--keep", "0.5", "--in", str(mixture), "--out", str(tmp_path)])
    assert code == 2 and "--small-ckpt, --large-ckpt" in capsys.readouterr().err


def test_select_rounds_per_source_and_never_keeps_unscorable_samples():
    scored = {f"a{i}": ("a", float(i)) for i in range(10)} | {f"b{i}": ("b", float(-i)) for i in range(3)}
    scored["a-nan"] = ("a", float("nan"))
    chosen = select(scored, 0.7)
    assert chosen.kept == {f"a{i}" for i in range(3, 10)} | {"b0", "b1"}
    assert chosen.per_source["a"]["total"] == 11 and chosen.per_source["a"]["threshold"] == 3.0
    with pytest.raises(ValueError):
        select(scored, 0)


def test_answer_losses_average_only_answer_tokens(registry, tiny_spec):
    model = NvilaModel(tiny_spec, registry).eval()
    text = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]
    silent = [{"from": "human", "value": "hi"}]
    batch = collate([model.processor.encode(text), model.processor.encode(silent)], model.tokenizer.pad_token_id)
    with torch.no_grad():
        losses = answer_losses(model, batch)
        alone = model(**collate([model.processor.encode(text)], model.tokenizer.pad_token_id))["loss"]
    assert losses[0] == pytest.approx(float(alone), abs=1e-5) and torch.isnan(losses[1])
