import io
import json
import random
import tarfile

import pytest
from PIL import Image

from nvila.core.data.shards import find_shards, read_records
from nvila.core.data.synthetic import QUESTIONS, chance_accuracy, make_sample, write_split
from nvila.core.errors import NvilaError


def test_the_same_seed_writes_the_same_shards(tmp_path):
    a = write_split(tmp_path / "a", 20, seed=5, image_size=32, shard_size=8)
    b = write_split(tmp_path / "b", 20, seed=5, image_size=32, shard_size=8)
    assert len(a) == 3
    for x, y in zip(a, b):
        with tarfile.open(x) as tx, tarfile.open(y) as ty:
            assert [tx.extractfile(m).read() for m in tx] == [ty.extractfile(m).read() for m in ty]


def test_samples_are_webdataset_records_of_an_image_and_a_conversation(tmp_path):
    shards = write_split(tmp_path, 10, seed=1, image_size=32)
    records = list(read_records(shards))
    assert len(records) == 10
    record, (image,) = records[0]
    assert image.size == (32, 32)
    assert record["conversations"][0]["value"].startswith("<image>\n")
    assert record["conversations"][1]["value"] in QUESTIONS[record["qtype"]][1]


def test_answers_are_true_of_the_image():
    rng = random.Random(0)
    for i in range(200):
        s = make_sample(rng, str(i), image_size=64)
        if s.qtype == "colour":
            pixels = set(s.image.getdata())
            from nvila.core.data.synthetic import COLOURS
            assert COLOURS[s.answer] in pixels


def test_chance_is_the_mean_of_one_over_each_question_types_answers():
    assert chance_accuracy(["colour", "occupied"]) == pytest.approx((1 / 4 + 1 / 2) / 2)


def test_missing_and_empty_shard_directories_get_clear_errors(tmp_path):
    with pytest.raises(NvilaError, match="does not exist.*nvila data synth"):
        find_shards(tmp_path / "nope")
    with pytest.raises(NvilaError, match=r"No \*\.tar shards"):
        find_shards(tmp_path)


def test_an_undecodable_sample_is_skipped_named_and_the_rest_are_read(tmp_path, caplog, registry, tiny_spec):
    from nvila.core.data.shards import sample_stream
    from nvila.core.model import NvilaModel

    shard = tmp_path / "bad.tar"
    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, format="PNG")
    conv = json.dumps({"conversations": [{"from": "human", "value": "<image>\nhi"},
                                         {"from": "gpt", "value": "yes"}]}).encode()
    with tarfile.open(shard, "w") as tar:
        for key, ext, data in [("a", "png", b"not a png"), ("a", "json", conv),
                               ("b", "png", good.getvalue()), ("b", "json", conv)]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    processor = NvilaModel(tiny_spec, registry).processor
    samples = list(sample_stream([str(shard)], processor))
    assert len(samples) == 1
    assert "bad.tar:a: png cannot be read as an image: UnidentifiedImageError" in caplog.text
