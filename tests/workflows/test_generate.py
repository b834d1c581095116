"""`nvila generate`: a checkpoint answers about images and a video, streaming its answer through the engine."""

import argparse
import subprocess
import sys

import pytest
from PIL import Image

from nvila.core.checkpoint import save_checkpoint
from nvila.core.data.video import encode_video
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.workflows.commands import main
from nvila.workflows.generate import add_arguments, stream_answer, with_placeholders


def nvila(*args):
    return subprocess.run([sys.executable, "-m", "nvila.workflows", *args], capture_output=True, text=True,
                          timeout=300)


def picture(colour):
    return Image.new("RGB", (32, 32), colour)


@pytest.fixture(scope="module")
def media(tmp_path_factory, varied_model):
    root = tmp_path_factory.mktemp("generate")
    save_checkpoint(varied_model, root / "ckpt")
    picture((200, 30, 30)).save(root / "red.png")
    picture((30, 30, 200)).save(root / "blue.png")
    frames = [picture((25 * i, 100, 250 - 25 * i)) for i in range(10)]
    encode_video(frames, path=root / "clip.mp4")
    return root


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_generate_streams_an_answer_about_images_and_a_video(media, varied_model):
    out = nvila("generate", "--ckpt", str(media / "ckpt"), "--image", str(media / "red.png"),
                "--image", str(media / "blue.png"), "--video", str(media / "clip.mp4"), "--frames", "8",
                "--prompt", "What changes?", "--max-new-tokens", "7", "--stats")
    assert out.returncode == 0, out.stderr
    # the same request through the engine in this process gives the same answer
    from nvila.workflows.generate import read_image, read_video

    request = ChatRequest([{"role": "user", "content": "<video>\n<image>\n<image>\nWhat changes?"}],
                          images=[read_image(media / "red.png"), read_image(media / "blue.png")],
                          videos=[read_video(media / "clip.mp4", 8)])
    (answer,) = Engine(varied_model).generate([request], DecodingConfig(max_new_tokens=7))
    assert out.stdout == answer.text + "\n" and answer.completion_tokens == 7
    visual = (2 + varied_model.temporal.output_frames(8)) * varied_model.tokens_per_block
    assert f"prompt tokens ({visual} visual), 7 generated (length), prefill" in out.stderr


def test_bad_settings_and_missing_media_are_one_paragraph_errors(media, capsys):
    # in this process (the subprocess test above covers the command itself): main() returns the exit status
    status = main(["generate", "--ckpt", str(media / "ckpt"), "--prompt", "hi", "--temperature", "-1",
                   "--top-p", "0"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("nvila: error: Invalid decoding settings") and "Traceback" not in err
    assert "temperature must be 0 (greedy) or a positive number, got -1.0" in err and "top_p" in err
    status = main(["generate", "--ckpt", str(media / "ckpt"), "--prompt", "hi", "--video", str(media / "none.mp4")])
    assert status == 2 and "Cannot read video" in capsys.readouterr().err


class Recorder:
    """A text stream that records what was written between flushes."""

    def __init__(self):
        self.flushed, self.pending = [], ""

    def write(self, text):
        self.pending += text

    def flush(self):
        self.flushed.append(self.pending)
        self.pending = ""


def test_the_answer_is_written_and_flushed_token_by_token(varied_model):
    engine = Engine(varied_model)
    request = ChatRequest([{"role": "user", "content": "Count the red squares in the picture, please."}])
    config = DecodingConfig(max_new_tokens=12)
    deltas = [s.events[0].text for s in engine.stream([request], config)]
    out = Recorder()
    answer = stream_answer(engine, request, config, out)
    assert out.flushed == [d for d in deltas if d] + ["\n"] and len(out.flushed) > 5
    assert answer.text == "".join(deltas) and answer.completion_tokens == 12


def test_options_reach_the_decoding_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ckpt", "c", "--prompt", "p", "--image", "a.png", "--image", "b.png",
                              "--temperature", "0.7", "--top-p", "0.9", "--seed", "4", "--stop", "###",
                              "--stop", "\n\n", "--max-new-tokens", "20"])
    assert args.image == ["a.png", "b.png"] and args.stop == ["###", "\n\n"] and args.seed == 4
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.7, 0.9, 20)


def test_placeholders_go_first_unless_the_prompt_places_them():
    assert with_placeholders("Why?", images=2, videos=1) == "<video>\n<image>\n<image>\nWhy?"
    assert with_placeholders("Compare <image> with <image>", images=2, videos=0) == "Compare <image> with <image>"
    assert with_placeholders("Why?", images=0, videos=0) == "Why?"




@pytest.mark.slow
def test_compile_gives_the_answer_eager_decoding_gives(media, varied_model, capsys):
    assert main(["generate", "--ckpt", str(media / "ckpt"), "--prompt", "Tell me a story.", "--max-new-tokens", "9",
                 "--compile"]) == 0
    (answer,) = Engine(varied_model).generate([ChatRequest([{"role": "user", "content": "Tell me a story."}])],
                                              DecodingConfig(max_new_tokens=9))
    assert capsys.readouterr().out == answer.text + "\n"
