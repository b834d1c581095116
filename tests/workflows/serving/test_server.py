"""`nvila serve` on 127.0.0.1: the official openai client gets the engine's answers, whole and streamed, with images
and videos; concurrent clients are batched and each gets its own answer; a full queue answers 429, a slow request
times out, and a client that goes away frees its place in the batch."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from nvila.core.data.video import VideoSampling, decode_video
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.workflows.serving.app import create_app, running
from nvila.workflows.serving.settings import MediaLimits, ServeSettings
from tests.workflows.serving.helpers import image_part, mp4, picture, png

MODEL = "tiny"
QUESTIONS = ["hi", "What shape is shown?", "Count the red squares.", "Tell me a story about a blue circle.",
             "Which is bigger, the square or the circle?", "Say something.", "Describe the picture in detail.",
             "Where is the triangle?"]


@pytest.fixture(scope="module")
def server(varied_model):
    settings = ServeSettings(model_name=MODEL, max_batch=8, max_queue=16, max_body_bytes=2 * 2**20,
                             media=MediaLimits(max_images=3, max_pixels=256 * 256))
    app = create_app(varied_model, settings)
    with running(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def reference(model, content, max_new_tokens, **settings):
    """The engine's answer to one user message alone, in this process."""
    engine = Engine(model)
    return engine.generate([ChatRequest([{"role": "user", "content": content}])],
                           DecodingConfig(max_new_tokens=max_new_tokens, **settings))[0]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server[1] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch"] == 8


def test_the_official_client_gets_the_engine_answer_with_usage_and_timing_headers(client, varied_model):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9, temperature=0)
    answer = raw.parse()
    expected = reference(varied_model, "hi", 9)
    assert answer.choices[0].message.content == expected.text and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == expected.prompt_tokens and answer.usage.completion_tokens == 9
    assert answer.usage.total_tokens == expected.prompt_tokens + 9 and answer.usage.visual_tokens == 0
    assert float(raw.headers["x-time-to-first-token-ms"]) > 0
    assert float(raw.headers["x-decode-tokens-per-second"]) > 0
    assert raw.headers["x-request-id"] == answer.id


def test_a_stream_adds_up_to_the_whole_answer_and_ends_with_usage(client, varied_model):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_completion_tokens=9, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(varied_model, "hi", 9).text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.time_to_first_token_ms > 0 and len({c.id for c in chunks}) == 1


def test_the_raw_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert float(response.headers["x-time-to-first-token-ms"]) > 0
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in lines[:-1])


def test_images_and_a_video_in_one_conversation(client, varied_model):
    first, second = picture(1), picture(2)
    frames = [picture(10 + i) for i in range(8)]
    clip = mp4()
    content = [image_part(png(first)), {"type": "text", "text": "and"}, image_part(png(second), "image/png"),
               {"type": "video", "video": [image_part(png(f))["image_url"]["url"] for f in frames]},
               {"type": "text", "text": "What changes?"}]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Look."},
                {"role": "assistant", "content": "Yes?"}, {"role": "user", "content": content}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    engine_content = [{"type": "image", "image": first}, {"type": "text", "text": "and"},
                      {"type": "image", "image": second}, {"type": "video", "video": frames},
                      {"type": "text", "text": "What changes?"}]
    engine = Engine(varied_model)
    (expected,) = engine.generate([ChatRequest([*messages[:3], {"role": "user", "content": engine_content}])],
                                  DecodingConfig(max_new_tokens=6))
    assert answer.choices[0].message.content == expected.text
    per_block = varied_model.tokens_per_block
    assert answer.usage.visual_tokens == expected.visual_tokens == (2 + varied_model.temporal.output_frames(8)) * \
        per_block

    as_clip = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + __import__("base64").b64encode(
            clip).decode()}}, {"type": "text", "text": "What happens?"}]}])
    sampled = decode_video(clip, VideoSampling(num_frames=8))
    (expected,) = engine.generate([ChatRequest([{"role": "user", "content": [
        {"type": "video", "video": sampled}, {"type": "text", "text": "What happens?"}]}])],
        DecodingConfig(max_new_tokens=6))
    assert as_clip.choices[0].message.content == expected.text and as_clip.usage.visual_tokens > 0


def test_a_seed_reproduces_a_sampled_answer_and_a_stop_string_ends_it(client, varied_model):
    def ask(**settings):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=12, **settings).choices[0]

    first, again = ask(temperature=1.5, seed=3), ask(temperature=1.5, seed=3)
    assert first.message.content == again.message.content
    assert first.message.content == reference(varied_model, "hi", 12, temperature=1.5, seed=3).text
    whole = ask().message.content
    stop = whole[3:6]
    cut = ask(stop=[stop, "never"])
    assert cut.finish_reason == "stop" and cut.message.content == whole[:whole.index(stop)]


def test_concurrent_clients_are_batched_and_each_gets_the_answer_it_gets_alone(server, client):
    app, url = server
    image = image_part(png(picture(3)))

    def ask(i):
        content = [image, {"type": "text", "text": QUESTIONS[i]}] if i % 3 == 0 else QUESTIONS[i]
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6 + 2 * i}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    alone = [ask(i) for i in range(8)]
    assert len(set(alone)) == 8
    scheduler = app.state.worker.scheduler
    scheduler.peak_batch = 0
    barrier = threading.Barrier(8)

    def together(i):
        barrier.wait()
        return ask(i)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(together, range(8)))
    assert answers == alone
    assert scheduler.peak_batch >= 4  # they were decoded together, not one after the other


# -- the queue, timeouts, disconnects: a server whose decode steps are slowed down -----------------------------------


@pytest.fixture
def slow_server(varied_model):
    def make(**settings):
        app = create_app(varied_model, ServeSettings(model_name=MODEL, **settings))
        engine = app.state.engine
        step = engine.step

        def slow_step(state, tokens):
            time.sleep(0.01)
            return step(state, tokens)

        engine.step = slow_step
        return app

    return make


def body(max_tokens, stream=False):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}


def wait_for(condition, seconds=20.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_full_queue_answers_429_and_a_disconnected_client_frees_its_place(slow_server):
    app = slow_server(max_batch=1, max_queue=1)
    with running(app) as url:
        scheduler = app.state.worker.scheduler
        with httpx.Client(timeout=60) as first:
            with first.stream("POST", url + "/v1/chat/completions", json=body(1500, stream=True)) as stream:
                lines = stream.iter_lines()  # (kept: closing the iterator closes the connection)
                next(lines)  # the long answer is running, holding the only place in the batch
                with ThreadPoolExecutor(1) as pool:
                    waiting = pool.submit(httpx.post, url + "/v1/chat/completions", json=body(5), timeout=60)
                    assert wait_for(lambda: scheduler.waiting == 1)
                    refused = httpx.post(url + "/v1/chat/completions", json=body(5))
                    assert refused.status_code == 429
                    error = refused.json()["error"]
                    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
                    assert set(error) == {"message", "type", "param", "code"}
                    started = time.monotonic()
                    stream.close()  # the streaming client goes away: its place goes to the waiting request
                    first.close()
                    answered = waiting.result()
        assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 5
        assert time.monotonic() - started < 10  # well before the 1,500-token answer would have ended
        assert wait_for(lambda: scheduler.idle)


def test_a_request_over_its_time_limit_is_cancelled_with_504(slow_server):
    app = slow_server(request_timeout_s=0.5)
    with running(app) as url:
        started = time.monotonic()
        response = httpx.post(url + "/v1/chat/completions", json=body(1500), timeout=60)
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 5
        assert wait_for(lambda: app.state.worker.scheduler.idle, 5)
        assert httpx.post(url + "/v1/chat/completions", json=body(3), timeout=60).status_code == 200


def test_a_non_streaming_client_that_disconnects_frees_its_place(slow_server):
    app = slow_server()
    with running(app) as url:
        scheduler = app.state.worker.scheduler
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body(1500), timeout=0.5)
        assert wait_for(lambda: scheduler.idle, 5)


# -- remote media, and the command itself ------------------------------------------------------------------------


@pytest.fixture
def file_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving ``tmp_path``."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_media_urls_are_fetched_only_when_allowed(varied_model, file_server, client):
    root, base = file_server
    (root / "red.png").write_bytes(png(picture(4)))
    app = create_app(varied_model, ServeSettings(model_name=MODEL, media=MediaLimits(allow_remote=True)))
    question = {"type": "text", "text": "What is it?"}
    with running(app) as url:
        remote = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        fetched = remote.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{base}/red.png"}}, question]}])
        missing = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{base}/none.png"}}]}]})
    inline = client.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
        image_part(png(picture(4))), question]}])
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "media_fetch_failed"


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["nvila", pytest.param("released", marks=pytest.mark.slow),
                                    pytest.param("quantized", marks=pytest.mark.slow)])  # each ~9 s on AVX2
def test_the_serve_command_serves_a_checkpoint_and_logs_a_line_per_request(tmp_path, varied_model, layout):
    import subprocess
    import sys

    from nvila.core.checkpoint import read_spec, save_checkpoint
    from nvila.workflows.commands import main
    from nvila.workflows.pretrained import load_model
    from tests.workflows.released import write_released

    ckpt = tmp_path / "demo-ckpt"
    if layout == "nvila":
        save_checkpoint(varied_model, ckpt)
    elif layout == "released":  # a tiny checkpoint in the layout of the released NVILA models
        write_released(ckpt, "nvila-lite")
    else:  # what `nvila quantize` writes: W8A8 vision tower, W4A16 language model (round to nearest)
        save_checkpoint(varied_model, tmp_path / "full")
        assert main(["quantize", "--ckpt", str(tmp_path / "full"), "--vision", "w8a8", "--llm",
                     "{name: w4a16, group_size: 32, method: rtn}", "--out", str(ckpt)]) == 0
        assert read_spec(ckpt).quant["llm"]["name"] == "w4a16"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nvila.workflows", "serve", "--ckpt", str(ckpt),
                                "--port", str(port), "--max-batch", "4"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    content = [image_part(png(picture(2))), {"type": "text", "text": "What is it?"}]
    try:
        def up():
            try:
                return httpx.get(base + "/health").status_code == 200
            except httpx.TransportError:
                return process.poll() is not None  # it died: stop waiting, the asserts below say why

        assert wait_for(up, 180) and process.poll() is None
        remote = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in remote.models.list().data] == ["demo-ckpt"]
        answer = remote.chat.completions.create(model="demo-ckpt", messages=[{"role": "user", "content": content}],
                                                max_tokens=7)
        streamed = "".join(c.choices[0].delta.content or "" for c in remote.chat.completions.create(
            model="demo-ckpt", messages=[{"role": "user", "content": content}], max_tokens=7, stream=True))
        refused = httpx.post(base + "/v1/chat/completions", json={"model": "demo-ckpt", "messages": []})
    finally:
        process.terminate()
        _, log = process.communicate(timeout=60)
    model = load_model(ckpt)
    (expected,) = Engine(model).generate([ChatRequest([{"role": "user", "content": [
        {"type": "image", "image": picture(2)}, {"type": "text", "text": "What is it?"}]}])],
        DecodingConfig(max_new_tokens=7))
    assert answer.choices[0].message.content == streamed == expected.text
    assert answer.usage.visual_tokens == expected.visual_tokens > 0
    assert refused.status_code == 400
    assert f"{answer.id} status=200 stream=no prompt={answer.usage.prompt_tokens} visual=" in log
    assert "stream=yes" in log and "status=400" in log and "ttft_ms=" in log


@pytest.mark.slow
def test_a_compiling_server_compiles_before_it_listens_and_answers_as_the_eager_engine(varied_model):
    from torch._dynamo.utils import counters

    app = create_app(varied_model, ServeSettings(model_name=MODEL, compile_decode=True))
    with running(app) as url:  # the lifespan's warm-up compiles batch 1 and batch 2
        counters.clear()
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda q: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0),
                QUESTIONS[:3]))
    assert [a.choices[0].message.content for a in answers] == [reference(varied_model, q, 8).text
                                                               for q in QUESTIONS[:3]]
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled while requests waited
