"""Every bad request gets a 4xx with OpenAI's error body, and the server answers the next request as usual."""

from __future__ import annotations

import base64

import httpx
import pytest
from PIL import Image

from nvila.workflows.serving.app import create_app, running
from nvila.workflows.serving.settings import MediaLimits, ServeSettings
from tests.workflows.serving.helpers import data_url, image_part, mp4, picture, png, png_header_only

MODEL = "tiny"
LIMITS = MediaLimits(max_images=3, max_frames=4, max_pixels=256 * 256, max_bytes=256 * 2**10)


@pytest.fixture(scope="module")
def url(varied_model):
    app = create_app(varied_model, ServeSettings(model_name=MODEL, max_body_bytes=2**20, media=LIMITS))
    with running(app) as base:
        yield base + "/v1/chat/completions"


def user(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3}


def with_(**fields):
    return {**user("hi"), **fields}


def image(data, mime="image/png"):
    return user([image_part(data, mime), {"type": "text", "text": "What is it?"}])


SMALL = png(picture(1))
BAD = {
    "invalid JSON": (b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None, "invalid_json"),
    "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400,
                     "messages.0.role", None),
    "tool role": ({"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role", None),
    "no messages": ({"model": MODEL, "messages": []}, 400, "messages", None),
    "messages missing": ({"model": MODEL}, 400, "messages", None),
    "no model": ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", None),
    "unknown model": (with_(model="gpt-4o"), 404, "model", "model_not_found"),
    "content of a wrong type": (user(42), 400, "messages.0.content", None),
    "messages of a wrong type": ({"model": MODEL, "messages": "hi"}, 400, "messages", None),
    "max_tokens as text": (with_(max_tokens="ten"), 400, "max_tokens", None),
    "negative max_tokens": (with_(max_tokens=-5), 400, "max_tokens", None),
    "zero max_completion_tokens": (with_(max_completion_tokens=0), 400, "max_completion_tokens", None),
    "absurd max_tokens": (with_(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded"),
    "max_tokens past the context": (with_(max_tokens=2040), 400, "max_tokens", "context_length_exceeded"),
    "temperature as text": (with_(temperature="hot"), 400, "temperature", None),
    "negative temperature": (with_(temperature=-1), 400, "temperature", None),
    "top_p of zero": (with_(top_p=0), 400, "top_p", None),
    "stream as text": (with_(stream="yes"), 400, "stream", None),
    "seed as float": (with_(seed=1.5), 400, "seed", None),
    "empty stop string": (with_(stop=[""]), 400, "stop", None),
    "five stop strings": (with_(stop=list("abcde")), 400, "stop", None),
    "n of 2": (with_(n=2), 400, "n", None),
    "tools": (with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
              "unsupported_parameter"),
    "prompt longer than the context": (user("red blue green " * 1000), 400, "messages", "context_length_exceeded"),
    "too many images": (user([image_part(SMALL)] * 4), 400, "messages.0.content.3", "too_many_images"),
    "too many videos": (user([{"type": "video", "video": [data_url(SMALL)]}] * 2), 400, "messages.0.content.1",
                        "too_many_videos"),
    "too many frames": (user([{"type": "video", "video": [data_url(SMALL)] * 5}]), 400,
                        "messages.0.content.0.video", "too_many_frames"),
    "image over the pixel limit": (image(png(Image.new("RGB", (300, 300)))), 400,
                                   "messages.0.content.0.image_url.url", "image_too_large"),
    "decompression bomb": (image(png_header_only(60_000, 60_000)), 400, "messages.0.content.0.image_url.url",
                           "image_too_large"),
    "bomb under Pillow's own limit": (image(png_header_only(5_000, 5_000)), 400,
                                      "messages.0.content.0.image_url.url", "image_too_large"),
    "bad base64": (user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR%%w0K!!"}}]), 400,
                   "messages.0.content.0.image_url.url", "invalid_base64"),
    "data URL without base64": (user([{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]), 400,
                                "messages.0.content.0.image_url.url", "invalid_data_url"),
    "media over the byte limit": (image(b"\x89PNG" + bytes(300 * 2**10)), 400,
                                  "messages.0.content.0.image_url.url", "media_too_large"),
    "a PDF as an image": (image(b"%PDF-1.7\n" + bytes(100), "application/pdf"), 400,
                          "messages.0.content.0.image_url.url", "unsupported_media_type"),
    "a TIFF as an image": (image(b"II*\x00" + bytes(100), "image/tiff"), 400,
                           "messages.0.content.0.image_url.url", "unsupported_media_type"),
    "an image as a video": (user([{"type": "video_url", "video_url": {"url": data_url(SMALL)}}]), 400,
                            "messages.0.content.0.video_url.url", "unsupported_media_type"),
    "a broken mp4": (user([{"type": "video_url", "video_url": {"url": data_url(mp4()[:400], "video/mp4")}}]), 400,
                     "messages.0.content.0.video_url.url", "invalid_video"),
    "truncated image": (image(SMALL[: len(SMALL) // 2]), 400, "messages.0.content.0.image_url.url", "invalid_image"),
    "audio content part": (user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]), 400,
                           "messages.0.content.0", "unsupported_content_type"),
    "remote image URL": (user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]), 400,
                         "messages.0.content.0.image_url.url", "remote_media_disabled"),
    "file URL": (user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400,
                 "messages.0.content.0.image_url.url", "invalid_url"),
    "a placeholder with no image": (user("<image>\nWhat is it?"), 400, "messages", None),
    "assistant speaks last": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}, 400,
                              "messages", None),
    "body over the size limit": (b'{"model": "tiny", "messages": "' + b"x" * (2**20 + 10) + b'"}', 413, None,
                                 "request_too_large"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_bad_request_gets_a_4xx_with_an_openai_error_body_and_the_server_goes_on(url, case):
    payload, status, param, code = BAD[case]
    if isinstance(payload, bytes):
        response = httpx.post(url, content=payload, headers={"content-type": "application/json"}, timeout=60)
    else:
        response = httpx.post(url, json=payload, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    after = httpx.post(url, json=user("hi"), timeout=60)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


def test_unknown_routes_and_methods_get_openai_error_bodies(url):
    base = url.removesuffix("/v1/chat/completions")
    missing = httpx.get(base + "/v1/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(url)
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"message", "type", "param", "code"}


def test_the_openai_client_raises_its_own_error_types(url):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=url.removesuffix("/chat/completions"), api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError, match="too_many_images|Too many images"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image_part(SMALL)] * 4}])
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def test_a_base64_payload_with_whitespace_or_a_wrong_claimed_type_is_judged_by_its_bytes(url):
    jpeg = base64.b64encode(SMALL).decode()
    claimed_jpeg = user([{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg}"}}])
    assert httpx.post(url, json=claimed_jpeg, timeout=60).status_code == 200


def test_serve_options_reach_the_settings():
    import argparse

    from nvila.workflows.serving.cli import add_arguments, settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings(parser.parse_args(["--ckpt", "x", "--compile"])).compile_decode
    assert not settings(parser.parse_args(["--ckpt", "x"])).compile_decode
