"""`nvila chat` driven through its standard input: streamed answers, images and a video, a kept conversation."""

import io
import subprocess
import sys

import pytest
from PIL import Image

from nvila.core.checkpoint import save_checkpoint
from nvila.core.data.video import encode_video
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.workflows.chat import Chat
from nvila.workflows.generate import read_image, read_video


@pytest.fixture(scope="module")
def files(tmp_path_factory, varied_model):
    root = tmp_path_factory.mktemp("chat")
    save_checkpoint(varied_model, root / "ckpt")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red.png")
    encode_video([Image.new("RGB", (32, 32), (25 * i, 100, 250 - 25 * i)) for i in range(10)],
                 path=root / "clip.mp4")
    return root


def answer(model, turns, max_new_tokens):
    return Engine(model).generate([ChatRequest(turns)], DecodingConfig(max_new_tokens=max_new_tokens))[0].text


def test_the_chat_command_streams_answers_keeps_the_conversation_and_takes_media(files, varied_model):
    script = "\n".join([f"/image {files / 'red.png'}", "What colour is it?", "And the shape?",
                        f"/video {files / 'clip.mp4'} 4", "What happens?", "/quit", "never read"]) + "\n"
    out = subprocess.run([sys.executable, "-m", "nvila.workflows", "chat", "--ckpt", str(files / "ckpt"),
                          "--max-new-tokens", "6"], input=script.encode(), capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    stdout = out.stdout.decode()  # not text=True: its universal newlines would turn a generated "\r" into "\n"
    red, clip = read_image(files / "red.png"), read_video(files / "clip.mp4", 4)
    first = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text",
                                                                            "text": "What colour is it?"}]}]
    one = answer(varied_model, first, 6)
    second = [*first, {"role": "assistant", "content": one}, {"role": "user", "content": "And the shape?"}]
    two = answer(varied_model, second, 6)
    third = [*second, {"role": "assistant", "content": two},
             {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "What happens?"}]}]
    three = answer(varied_model, third, 6)
    # each answer (random tokens: it may hold control characters) saw the turns before it, and their media
    positions = [stdout.find(f"nvila> {text}\n[") for text in (one, two, three)]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), stdout
    stats = [line for line in stdout.split("\n") if line.startswith("[")]
    assert len(stats) == 3 and all("tokens/s" in s and "6 tokens (length)" in s for s in stats)
    assert "visual)]" in stats[0] and "(image attached:" in stdout and "4 frames" in stdout
    assert stdout.rstrip().endswith("bye")


def test_bad_input_is_reported_and_the_chat_goes_on(files, varied_model):
    out = io.StringIO()
    chat = Chat(Engine(varied_model), DecodingConfig(max_new_tokens=3), out=out)
    assert chat.handle("/image /no/such.png")
    assert chat.handle("/frobnicate")
    assert chat.handle("<image>\nwhat?")  # a placeholder without an image: refused, the turn dropped
    assert chat.handle("hi")
    assert not chat.handle("/quit")
    text = out.getvalue()
    assert "! Cannot read image '/no/such.png'" in text and "unknown command" in text
    assert "placeholder" in text and "(the message is dropped)" in text
    assert [t["role"] for t in chat.turns] == ["user", "assistant"]
    chat.handle("/reset")
    assert chat.turns == [] and "(conversation cleared)" in out.getvalue()
