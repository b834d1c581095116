"""`nvila data convert`: LLaVA JSON plus a media folder -> shards, reporting what was left out and why."""

import json

from PIL import Image

from nvila.core.data.convert import REPORT_FILE
from nvila.core.data.shards import SampleDecoder, decoded_stream, find_shards, read_records
from nvila.core.data.skips import Skipped
from nvila.core.data.video import encode_video
from nvila.core.model import NvilaModel
from nvila.workflows.commands import main


def turns(question, answer="yes"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_convert_writes_shards_that_load_and_reports_skips(tmp_path, capsys, registry, tiny_spec):
    media = tmp_path / "media"
    (media / "imgs").mkdir(parents=True)
    Image.new("RGB", (20, 10), "red").save(media / "imgs" / "a.jpg")
    Image.new("RGB", (10, 20), "blue").save(media / "imgs" / "b.png")
    Image.new("RGB", (8, 8), "green").save(media / "imgs" / "c.webp")
    (media / "imgs" / "broken.jpg").write_bytes(b"not an image")
    (media / "notes.txt").write_text("hello")
    encode_video([Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(6)], fps=3, path=media / "clip.mp4")
    records = [
        {"id": "one.image", "image": "imgs/a.jpg", "conversations": turns("<image>\nWhat colour?", "red")},
        {"id": "three", "image": ["imgs/a.jpg", "imgs/b.png", "imgs/c.webp"], "source": "multi",
         "conversations": turns("<image><image><image>\nCompare them.")},
        {"id": "vid", "video": "clip.mp4", "conversations": turns("<video>\nWhat happens?", "it darkens")},
        {"id": "text", "conversations": turns("Say hi.", "hi")},
        {"id": "missing", "image": "imgs/nope.jpg", "conversations": turns("<image>\nHm?")},
        {"id": "broken", "image": "imgs/broken.jpg", "conversations": turns("<image>\nHm?")},
        {"id": "noplaceholder", "image": "imgs/a.jpg", "conversations": turns("What colour?")},
        {"id": "nomedia", "conversations": turns("<image>\nWhat colour?")},
        {"id": "txt", "image": "notes.txt", "conversations": turns("<image>\nRead it.")},
        {"id": "bad", "conversations": "not a list"},
        ["not", "a", "record"],
    ]
    llava = tmp_path / "llava_mix.json"
    llava.write_text(json.dumps(records))
    out = tmp_path / "shards"
    code = main(["data", "convert", "--llava-json", str(llava), "--media-root", str(media), "--out", str(out),
                 "--shard-size", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 4 sample(s) in 2 shard(s); skipped 7" in printed
    for reason in ("missing_media", "unreadable_image", "media_without_placeholder", "placeholder_without_media",
                   "unsupported_media", "malformed_record"):
        assert reason in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["skipped"]["malformed_record"] == 2 and report["examples"]["missing_media"][0].startswith("missing")

    shards = find_shards(out)
    records_back = [r for r, _ in read_records(shards)]
    assert [r["id"] for r in records_back] == ["one.image", "three", "vid", "text"]
    assert [r["source"] for r in records_back] == ["llava_mix", "multi", "llava_mix", "llava_mix"]
    assert all("image" not in r and "video" not in r for r in records_back)

    processor = NvilaModel(tiny_spec, registry).processor
    items = list(decoded_stream(shards, SampleDecoder(processor)))
    assert not [i for i in items if isinstance(i, Skipped)]
    # one image, three in order, a video, text only
    assert [(len(e.grids), len(e.video_grids)) for e in items] == [(1, 0), (3, 0), (0, 1), (0, 0)]


def test_convert_names_a_broken_json_file(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("[{")
    (tmp_path / "m").mkdir()
    code = main(["data", "convert", "--llava-json", str(bad), "--media-root", str(tmp_path / "m"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "is not valid JSON" in capsys.readouterr().err


def test_a_second_convert_into_a_finished_set_is_refused_unless_overwrite(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    llava = tmp_path / "x.jsonl"
    llava.write_text("\n".join(json.dumps({"id": str(i), "conversations": turns(f"Say {i}.")}) for i in range(5)))
    convert = ["data", "convert", "--llava-json", str(llava), "--media-root", str(tmp_path / "m"),
               "--out", str(tmp_path / "o"), "--shard-size", "2"]
    assert main(convert) == 0 and len(find_shards(tmp_path / "o")) == 3
    capsys.readouterr()
    llava.write_text(json.dumps({"id": "new", "conversations": turns("Say new.")}))
    assert main(convert) == 2  # once mixed the new shard with the old set's last two
    assert "already holds a finished shard set (5 samples in 3 shards" in capsys.readouterr().err
    assert main([*convert, "--overwrite"]) == 0
    assert [r["id"] for r, _ in read_records(find_shards(tmp_path / "o"))] == ["new"]
    assert json.loads((tmp_path / "o" / REPORT_FILE).read_text())["shards"] == ["shard-000000.tar"]


def test_an_interrupted_convert_leaves_only_whole_shards_and_a_rerun_writes_the_whole_set(tmp_path, monkeypatch,
                                                                                          capsys):
    import nvila.core.data.convert as convert_module

    (tmp_path / "m").mkdir()
    llava = tmp_path / "x.jsonl"
    llava.write_text("\n".join(json.dumps({"id": str(i), "conversations": turns(f"Say {i}.")}) for i in range(7)))
    convert = ["data", "convert", "--llava-json", str(llava), "--media-root", str(tmp_path / "m"),
               "--out", str(tmp_path / "o"), "--shard-size", "3"]
    real = convert_module._sample

    def ctrl_c_at_record_4(index, *args):
        if index == 4:
            raise KeyboardInterrupt
        return real(index, *args)

    monkeypatch.setattr(convert_module, "_sample", ctrl_c_at_record_4)
    assert main(convert) == 130  # "nvila: interrupted", no traceback
    assert "nvila: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["nvila-shards.json", "shard-000000.tar"]
    assert len(list(read_records(find_shards(tmp_path / "o")))) == 3  # the one shard closed before Ctrl-C
    monkeypatch.setattr(convert_module, "_sample", real)
    assert main(convert) == 0
    assert [r["id"] for r, _ in read_records(find_shards(tmp_path / "o"))] == [str(i) for i in range(7)]
