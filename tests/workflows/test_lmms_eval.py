"""The lmms-eval adapter on a tiny local task that this test writes (no download, no lmms-eval needed).

The adapter is found the way lmms-eval's plugin loader finds models (``LMMS_EVAL_PLUGINS``: import
``<plugin>.models``, read ``AVAILABLE_MODELS``, import ``<plugin>.models.<name>.<Class>``), and answers
``generate_until`` requests shaped as lmms-eval's ``Instance.args``. With lmms-eval installed, the class is
also a subclass of ``lmms_eval.api.model.lmms``.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
from PIL import Image

from nvila.workflows.pretrained import NVILA
from tests.workflows.released import write_released


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_released(tmp_path_factory.mktemp("lmms") / "ckpt", "nvila-lite")


def plugin_model(plugin: str, name: str):
    """lmms_eval/models/__init__.py's plugin loading, step by step."""
    models = importlib.import_module(f"{plugin}.models")
    module_name, class_name = f"{plugin}.models.{name}", models.AVAILABLE_MODELS[name]
    return getattr(importlib.import_module(module_name), class_name)


def test_adapter_answers_a_local_task_like_the_engine(checkpoint):
    adapter_class = plugin_model("nvila.workflows.lmms", "nvila")
    adapter = adapter_class(pretrained=str(checkpoint), max_new_tokens="6", batch_size="2")
    docs = [{"image": Image.new("RGB", (60 + 20 * i, 40), (40 * i, 100, 200)), "question": f"Color {i}?"}
            for i in range(3)]
    docs.append({"frames": [Image.new("RGB", (40, 40), (10 * f, 0, 0)) for f in range(8)], "question": "What?"})
    adapter.task_dict = {"tiny": {"test": docs}}

    def visuals(doc):
        return [doc["image"]] if "image" in doc else [doc["frames"]]

    requests = [SimpleNamespace(args=(doc["question"], {"max_new_tokens": 4, "until": ["\n\n"]}, visuals, i,
                                      "tiny", "test")) for i, doc in enumerate(docs)]
    answers = adapter.generate_until(requests)
    model = NVILA.from_pretrained(checkpoint)
    expected = [model.generate([{"role": "user", "content": [{"type": "image", "image": d["image"]},
                                                             {"type": "text", "text": d["question"]}]}],
                               max_new_tokens=4, stop=["\n\n"]) for d in docs[:3]]
    expected.append(model.generate([{"role": "user", "content": [{"type": "video", "video": docs[3]["frames"]},
                                                                 {"type": "text", "text": "What?"}]}],
                                   max_new_tokens=4, stop=["\n\n"]))
    assert answers == expected and len(answers) == 4
