"""Corrupt samples are skipped, counted by reason and named; training goes on, up to a threshold."""

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from nvila.core.data.shards import SampleDecoder, decoded_stream, media_keys
from nvila.core.data.skips import DataHealth, Skipped
from nvila.core.data.synthetic import write_split
from nvila.core.data.video import VideoSampling, encode_video
from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.core.processor import Encoded, NvilaProcessor


def png(size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def conv(question: str, answer: str = "red") -> bytes:
    return json.dumps({"conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": answer}]}).encode()


def mp4(frames=6) -> bytes:
    return encode_video([Image.new("RGB", (16, 16), (10 * i, 0, 0)) for i in range(frames)], fps=5)


CORRUPT = {  # key -> (files, the reason it must be skipped for)
    "badjpeg": ({"jpg": b"\xff\xd8\xff\xe0 this is no jpeg", "json": conv("<image>\nColour?")}, "bad_image"),
    "badmp4": ({"mp4": mp4()[:200], "json": conv("<video>\nWhat happens?")}, "bad_video"),
    "badjson": ({"png": png(), "json": b'{"conversations": [ oops'}, "malformed_json"),
    "badturns": ({"json": b'{"conversations": [{"speaker": "x"}]}'}, "malformed_json"),
    "nomedia": ({"json": conv("<image>\nColour?")}, "placeholder_without_media"),
    "noplaceholder": ({"png": png(), "json": conv("Colour?")}, "media_without_placeholder"),
    "nojson": ({"png": png()}, "missing_json"),
    "toolong": ({"json": conv("word " * 400)}, "too_long"),
}


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def processor(registry, tiny_spec) -> NvilaProcessor:
    return NvilaModel({**tiny_spec, "max_length": 256}, registry).processor


@pytest.mark.parametrize("key", CORRUPT)
def test_each_kind_of_corrupt_sample_is_skipped_for_its_reason(processor, key, caplog):
    files, reason = CORRUPT[key]
    out = SampleDecoder(processor)({"__url__": "shard-7.tar", "__key__": key, **files})
    assert isinstance(out, Skipped) and out.reason == reason, out
    assert f"shard-7.tar:{key}" in caplog.text and reason in caplog.text


def test_good_samples_text_only_and_several_numbered_images_decode(processor):
    decoder = SampleDecoder(processor)
    text = decoder({"__url__": "s.tar", "__key__": "t", "json": conv("Hello?", "hi")})
    assert isinstance(text, Encoded) and text.pixels is None
    files = {"10.png": png((10, 10)), "2.png": png((2, 2)), "json": conv("<image> and <image> and <image>?")}
    files["0.png"] = png((7, 7))
    assert media_keys(files, ("png",)) == ["0.png", "2.png", "10.png"], "number order, not string order"
    several = decoder({"__url__": "s.tar", "__key__": "m", **files})
    assert isinstance(several, Encoded) and len(several.grids) == 3


def test_a_video_sample_is_decoded_and_encoded_with_its_frames(processor):
    decoder = SampleDecoder(processor, VideoSampling(num_frames=4))
    out = decoder({"__url__": "s.tar", "__key__": "v", "mp4": mp4(), "json": conv("<video>\nWhat happens?")})
    assert isinstance(out, Encoded) and len(out.video_grids) == 1
    assert out.videos.shape[0] == 4  # one base-resolution tile per sampled frame


def test_a_truncated_tar_is_counted_once_and_its_readable_samples_kept(processor, tmp_path):
    good = {f"g{i}": {"png": png(), "json": conv("<image>\nColour?")} for i in range(6)}
    write_tar(tmp_path / "a.tar", good)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2 + 100])  # inside a member, not between two
    write_tar(tmp_path / "b.tar", good)
    items = list(decoded_stream([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], SampleDecoder(processor)))
    reasons = [i.reason for i in items if isinstance(i, Skipped)]
    assert reasons.count("unreadable_shard") == 1  # tarfile's shards: no counts, so one record for the loss
    shard_skip = next(i for i in items if isinstance(i, Skipped) and i.reason == "unreadable_shard")
    assert shard_skip.where.endswith("a.tar") and "the number of samples lost is unknown" in shard_skip.detail
    used = [i for i in items if isinstance(i, Encoded)]
    assert 6 < len(used) < 12 and sum(1 for u in used if u.key.startswith(str(tmp_path / "b.tar"))) == 6


def whole_samples(shard: Path) -> int:
    """Samples of a (possibly cut) synthetic shard whose json and png can both be read, as a stream reads them."""
    found: dict[str, set[str]] = {}
    try:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                tar.extractfile(member).read()  # raises for a member cut short
                key, ext = member.name.split(".", 1)
                found.setdefault(key, set()).add(ext)
    except (tarfile.TarError, EOFError):
        pass
    return sum(1 for exts in found.values() if exts == {"png", "json"})


def truncated_set(root: Path, count: int, shard_size: int, cuts: dict[int, float]) -> tuple[list[str], dict[str, int]]:
    """Shards written by nvila (so with counts), some cut to a fraction of their members' bytes; returns the shards
    and, per cut shard, the samples it lost."""
    paths = write_split(root, count, seed=6, image_size=16, shard_size=shard_size)
    lost = {}
    for index, fraction in cuts.items():
        data = paths[index].read_bytes().rstrip(b"\0")  # the members, without tar's zero padding
        paths[index].write_bytes(data[: int(len(data) * fraction)])
        lost[str(paths[index])] = shard_size - whole_samples(paths[index])
        assert 0 < lost[str(paths[index])]
    return [str(p) for p in paths], lost


SPLITS = {"one process": [(0, 1, 0, 1)],  # (rank, world size, worker, workers): every share of the shards
          "2 ranks x 2 workers": [(r, 2, w, 2) for r in range(2) for w in range(2)]}


@pytest.mark.parametrize("split", SPLITS)
def test_a_truncated_shard_counts_every_sample_it_lost_once_across_ranks_and_workers(processor, tmp_path, split,
                                                                                      monkeypatch):
    shards, lost = truncated_set(tmp_path, 64, 8, {2: 0.5, 5: 0.01, 7: 0.9})  # the middle, the first header, late
    used, skipped = 0, []
    for rank, world, worker, workers in SPLITS[split]:
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("WORKER", worker), ("NUM_WORKERS", workers)):
            monkeypatch.setenv(name, str(value))
        items = list(decoded_stream(shards, SampleDecoder(processor)))
        used += sum(isinstance(i, Encoded) for i in items)
        skipped += [i for i in items if isinstance(i, Skipped)]
    assert used + len(skipped) == 64 and len(skipped) == sum(lost.values())
    shard_records = [s for s in skipped if s.reason == "unreadable_shard"]
    for shard, n in lost.items():  # a sample cut in half is skipped for what it lacks, the rest as unreadable_shard
        mine = [s for s in skipped if s.where.startswith(shard)]
        assert len(mine) == n and n - 1 <= sum(s.reason == "unreadable_shard" for s in mine) <= n, (shard, mine)
    assert all("samples lost" in s.detail for s in shard_records)


def test_training_counts_every_sample_a_truncated_shard_lost(tmp_path, tiny_spec, capsys):
    shards, lost = truncated_set(tmp_path / "data", 64, 16, {2: 0.4})
    cli = fit(tmp_path / "data", tmp_path / "run", tiny_spec, "--trainer.max_steps=-1", "--trainer.max_epochs=1",
              "--data.num_workers=2", "--data.max_skip_fraction=0.5")  # a worker each for two of the four shards
    health = cli.datamodule.health
    (n,) = lost.values()
    assert health.samples == 64 and health.total_skipped == n and health.skipped["unreadable_shard"] >= n - 1
    assert f"data: {n} of 64 samples skipped" in capsys.readouterr().err


def test_evaluation_counts_every_sample_a_truncated_shard_lost(tmp_path, registry, tiny_spec):
    from nvila.workflows.evaluate import evaluate

    shards, lost = truncated_set(tmp_path, 24, 8, {1: 0.5})
    result = evaluate(NvilaModel({**tiny_spec, "max_length": 256}, registry), shards, batch_size=8,
                      max_new_tokens=2)
    (n,) = lost.values()
    assert result.total_skipped == n and len(result.answers) == 24 - n
    assert "unreadable_shard" in result.skip_summary()


def test_the_threshold_applies_after_min_samples_and_names_the_counts():
    health = DataHealth(max_fraction=0.05, min_samples=100)
    health.update(10, [Skipped("bad_image", "s:1"), Skipped("bad_image", "s:2")])
    health.check()  # 2 of 12: too early to judge
    with pytest.raises(NvilaError, match=r"2 of 12 samples \(16.7%\).*bad_image: 2"):
        health.check(final=True)
    health.update(200, [])
    health.check()
    assert health.metrics()["data/skipped/bad_image"] == 2 and health.metrics()["data/skipped"] == 2


def corrupt_set(root, corrupt_keys, good=240):
    """Good synthetic shards plus one shard of corrupt samples and a truncated shard."""
    write_split(root, good, seed=4, image_size=32, shard_size=80)
    write_tar(root / "corrupt.tar", {k: CORRUPT[k][0] for k in corrupt_keys})
    write_tar(root / "truncated.tar", {f"t{i}": {"png": png(), "json": conv("<image>\nColour?")} for i in range(4)})
    data = (root / "truncated.tar").read_bytes()
    (root / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    return root


def fit(root, tmp_path, tiny_spec, *extra):
    from nvila.workflows.cli import run_cli

    enc, llm = tiny_spec["encoder"], tiny_spec["llm"]
    return run_cli([
        "fit", "--config", "demo", f"--data.train={root}", "--data.val=null", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=16", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--data.batch_size=16", "--data.num_workers=1", "--data.shuffle_buffer=0", "--model.warmup_steps=2",
        "--model.max_length=256", *[f"--model.encoder.{k}={v}" for k, v in enc.items() if k != "name"],
        *[f"--model.llm.{k}={v}" for k, v in llm.items() if k != "name"], *extra])


def test_training_goes_on_past_corrupt_samples_and_logs_their_counts(tmp_path, tiny_spec):
    # counted in a DataLoader worker process, reported to the main process inside the batches
    root = corrupt_set(tmp_path / "data", ["badjpeg", "badmp4", "badjson", "nomedia", "noplaceholder"])
    cli = fit(root, tmp_path / "run", tiny_spec)  # 240 good samples, 5 corrupt ones, a truncated shard
    assert cli.trainer.global_step == 16  # the whole epoch: the truncated shard comes last
    health = cli.datamodule.health
    for reason in ("bad_image", "bad_video", "malformed_json", "placeholder_without_media",
                   "media_without_placeholder", "unreadable_shard"):
        assert health.skipped[reason] == 1, (reason, health.skipped)
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/skipped")]
    assert float(rows[-1]["data/skipped"]) == health.total_skipped
    assert float(rows[-1]["data/skipped/bad_video"]) == health.skipped["bad_video"]


def test_too_many_corrupt_samples_stop_the_run_with_a_clear_message(tmp_path, tiny_spec):
    root = corrupt_set(tmp_path / "data", list(CORRUPT), good=64)
    with pytest.raises(NvilaError, match=r"Stopping: \d+ of \d+ samples .* data.max_skip_fraction=5%"):
        fit(root, tmp_path / "run", tiny_spec)
