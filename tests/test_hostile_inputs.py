"""The corrupt-input corpus (tests/corpus/make_corpus.py) driven through the real commands: each hostile input
gets one clear line and a non-zero exit (or, for data, a counted skip), never a traceback, a spin or a balloon."""

from __future__ import annotations

import json
import logging
import time

import pytest

from nvila.core.checkpoint import save_checkpoint
from nvila.core.data.shards import SampleDecoder, decoded_stream, find_shards
from nvila.core.data.skips import Skipped
from nvila.core.media import ImageRefused, open_image
from nvila.core.model import NvilaModel
from nvila.workflows.commands import main
from tests.corpus.make_corpus import BAD_SAMPLES, LLAVA_LINES, RECIPES, TRUNCATED, bomb_png, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, registry, tiny_spec):
    return save_checkpoint(NvilaModel({**tiny_spec, "max_length": 256}, registry),
                           tmp_path_factory.mktemp("ckpt") / "checkpoint")


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    logging.getLogger().handlers.clear()  # main() logs to this test's captured stderr, not an earlier test's
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err.replace("--- Logging error ---\nTraceback", ""), err  # (a stale test handler)
    return rc, out, err


@pytest.mark.parametrize("name", RECIPES)
def test_each_bad_recipe_is_refused_in_one_line(corpus, capsys, name):
    rc, _, err = run(capsys, ["fit", "--config", str(corpus / "recipes" / name)])
    assert rc == 2 and RECIPES[name][1] in err and err.count("\n") == 1, err


def test_a_folder_as_config_is_refused(corpus, capsys):
    rc, _, err = run(capsys, ["fit", "--config", str(corpus / "recipes" / "folder.yaml")])
    assert rc == 2 and "is a folder" in err


SETTINGS = {
    "--model.lr=-1": "model.lr must be a positive learning rate",
    "--model.warmup_steps=-5": "model.warmup_steps must be 0 or more",
    "--data.batch_size=-1": "data.batch_size must be a whole number from 1",
    "--data.batch_size=99999999999999999999": "data.batch_size must be a whole number from 1",
    "--data.num_workers=-1": "data.num_workers must be a whole number from 0",
    "--model.lrr=3": "unknown key 'model.lrr' in --model.lrr=3. Did you mean 'lr'?",
    "--model.max_length=0": "model.max_length must be a whole number of tokens, at least 1",
    "--model.llm.hidden_size=-4": "model.llm: llm 'qwen2' cannot be built",
    "--model.llm.hidden_size=100000000": "model.llm: llm 'qwen2' cannot be built",
}


def test_each_bad_setting_is_refused_before_training(tiny_fit_args, tmp_path, capsys):
    for override, message in SETTINGS.items():
        start = time.perf_counter()
        rc, _, err = run(capsys, [*tiny_fit_args(tmp_path), override])
        assert rc == 2 and message in err, (override, err)
        assert time.perf_counter() - start < 30, f"{override} took too long to refuse"
    assert not list(tmp_path.rglob("*.ckpt"))


def test_corrupt_samples_are_skipped_by_reason_and_good_ones_kept(corpus, registry, tiny_spec):
    processor = NvilaModel({**tiny_spec, "max_length": 256}, registry).processor
    items = list(decoded_stream(find_shards(corpus / "shards" / "mixed"), SampleDecoder(processor)))
    reasons = {i.where.rsplit(":", 1)[-1]: i.reason for i in items if isinstance(i, Skipped)}
    assert reasons == {key: reason for key, (_, reason) in BAD_SAMPLES.items()}
    assert len(items) - len(reasons) == 4


def test_the_pixel_limit_is_checked_before_decoding():
    bomb = bomb_png()
    start = time.perf_counter()
    with pytest.raises(ImageRefused, match="13000x13000 = 169,000,000 pixels, more than the limit") as caught:
        open_image(bomb)
    assert caught.value.reason == "too_large" and time.perf_counter() - start < 1
    with pytest.raises(ImageRefused, match="too large to decode"):  # PIL's DecompressionBombError, not an OSError
        open_image(bomb_png(20000), max_pixels=10**12)


def test_eval_skips_and_counts_bad_samples_and_stops_when_none_is_left(corpus, ckpt, capsys):
    rc, out, _ = run(capsys, ["eval", "--ckpt", str(ckpt), "--shards", str(corpus / "shards" / "mixed"),
                              "--batch-size", "4"])
    assert rc == 0 and "on 4 questions" in out and f"skipped {len(BAD_SAMPLES)} sample(s)" in out, out
    rc, _, err = run(capsys, ["eval", "--ckpt", str(ckpt), "--shards", str(corpus / "shards" / "all_bad")])
    assert rc == 2 and "No question could be evaluated" in err


def test_a_truncated_shard_counts_each_sample_it_lost_or_says_the_number_is_unknown(corpus, ckpt, capsys):
    written, lost = TRUNCATED
    rc, out, err = run(capsys, ["eval", "--ckpt", str(ckpt), "--shards", str(corpus / "shards" / "truncated")])
    assert rc == 0 and f"on {written - lost} questions" in out, out
    assert f"skipped {lost} sample(s) (unreadable_shard: {lost})" in out, out
    assert f"{lost} of its {written} samples lost ({written - lost} read) [unreadable_shard]" in err, err
    # shards another tool wrote record no counts: one skip for the shard, and the log says the number is unknown
    rc, out, err = run(capsys, ["eval", "--ckpt", str(ckpt), "--shards",
                                str(corpus / "shards" / "truncated_foreign")])
    assert rc == 0 and "(unreadable_shard: 1)" in out and "the number of samples lost is unknown" in err, (out, err)


def test_generate_refuses_bad_images_and_overlong_prompts_in_one_line(corpus, ckpt, capsys):
    for name, message in (("bomb.png", "more than the limit"), ("huge.png", "too large to decode"),
                          ("garbage.png", "cannot be read as an image")):
        rc, _, err = run(capsys, ["generate", "--ckpt", str(ckpt), "--prompt", "What?", "--image",
                                  str(corpus / "images" / name)])
        assert rc == 2 and message in err, err
    rc, _, err = run(capsys, ["generate", "--ckpt", str(ckpt), "--prompt", "word " * 20000])
    assert rc == 2 and "max_length" in err, err


def test_convert_names_bad_lines_refuses_escaping_paths_and_goes_on(corpus, tmp_path, capsys):
    llava = corpus / "llava"
    rc, out, _ = run(capsys, ["data", "convert", "--llava-json", str(llava / "data.jsonl"), "--media-root",
                              str(llava / "media"), "--out", str(tmp_path / "out")])
    assert rc == 0 and "wrote 2 sample(s)" in out, out
    report = json.loads((tmp_path / "out" / "convert-report.json").read_text())
    expected: dict[str, int] = {}
    for _line, reason in LLAVA_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped"] == expected
    assert report["examples"]["unreadable_line"][0].startswith("line 4:")
    assert report["examples"]["outside_media_root"][0].startswith("escape (line 6)")
    rc, out, _ = run(capsys, ["data", "convert", "--llava-json", str(llava / "data.jsonl"), "--media-root",
                              str(llava / "media"), "--out", str(tmp_path / "out2"), "--allow-outside-media-root"])
    assert "wrote 3 sample(s)" in out


def test_training_on_only_corrupt_samples_stops_in_its_first_epoch(corpus, tiny_fit_args, tmp_path, capsys):
    start = time.perf_counter()
    rc, _, err = run(capsys, [*tiny_fit_args(tmp_path), f"--data.train={corpus / 'shards' / 'all_bad'}",
                              "--data.num_workers=1"])
    assert rc == 2 and "formed no batch: every sample was skipped" in err, err
    assert time.perf_counter() - start < 60 and not list(tmp_path.rglob("model.safetensors"))


def test_a_truncated_last_ckpt_is_named_with_what_to_do(tiny_fit_args, tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    rc, _, err = run(capsys, [*tiny_fit_args(tmp_path), "--ckpt_path=last"])
    assert rc == 2 and "Cannot resume from" in err and "last.ckpt" in err and "weights_only" not in err, err
