"""The lmms-eval model adapter: lmms-eval's requests answered by an nvila model through the inference engine.

Run (lmms-eval installed separately; nvila does not depend on it)::

    LMMS_EVAL_PLUGINS=nvila.workflows.lmms python -m lmms_eval --model nvila \\
        --model_args pretrained=/ckpt/NVILA-8B,max_new_tokens=128,num_frames=8 --tasks mme --batch_size 4

``pretrained`` is a checkpoint directory in either layout (released NVILA or nvila's). lmms-eval hands
``generate_until`` requests whose ``args`` are ``(context, generation kwargs, doc_to_visual, doc_id, task,
split)``; the visuals of ``self.task_dict[task][split][doc_id]`` become the prompt's images (PIL images) or
video (a list of frames, or a path, sampled to ``num_frames``), placed before the context as NVILA's own
evaluation does. Log-likelihood requests are not supported (NVILA's benchmarks are generative).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from nvila.core.engine import ChatRequest, DecodingConfig
from nvila.core.errors import NvilaError

try:  # lmms-eval's base class when it is installed; the adapter's contract does not depend on it
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent
    class _Base:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self.task_dict: dict[str, Any] = {}


class NVILA(_Base):
    """lmms-eval model ``nvila``: ``--model_args pretrained=DIR[,max_new_tokens=N][,batch_size=B][,num_frames=F]``."""

    def __init__(self, pretrained: str, max_new_tokens: int | str = 128, batch_size: int | str = 1,
                 num_frames: int | str = 8, device: str | None = None, **unused: Any) -> None:
        super().__init__()
        from nvila.workflows.pretrained import NVILA as Pretrained

        self.pretrained = Pretrained.from_pretrained(pretrained, device=device if device not in (None, "auto")
                                                     else None)
        self.max_new_tokens, self.batch_size_per_gpu = int(max_new_tokens), int(batch_size)
        self.num_frames = int(num_frames)
        self._rank, self._world_size = 0, 1

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _request(self, context: str, visuals: Sequence[Any]) -> ChatRequest:
        images, videos = [], []
        for visual in visuals or []:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB") if visual.mode not in ("RGB", "RGBA") else visual)
            elif isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in (".mp4", ".mkv", ".webm", ".avi",
                                                                                     ".mov"):
                from nvila.workflows.generate import read_video

                videos.append(read_video(visual, self.num_frames))
            elif isinstance(visual, (str, Path)):
                images.append(Image.open(visual))
            elif isinstance(visual, Sequence) and all(isinstance(f, Image.Image) for f in visual):
                videos.append(list(visual))
            else:
                raise NvilaError(f"lmms-eval visual of type {type(visual).__name__} is not an image, a video path or "
                                 "a list of frames")
        parts = [{"type": "video", "video": v} for v in videos] + [{"type": "image", "image": i} for i in images]
        return ChatRequest([{"role": "user", "content": [*parts, {"type": "text", "text": context}]}])

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request, in order, batched ``batch_size`` at a time."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start:start + self.batch_size_per_gpu]
            batch, configs = [], []
            for request in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                batch.append(self._request(context, doc_to_visual(doc)))
                stop = gen_kwargs.get("until") or ()
                configs.append(DecodingConfig(
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                    temperature=float(gen_kwargs.get("temperature", 0) or 0),
                    top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
                    stop=(stop,) if isinstance(stop, str) else tuple(stop)))
            for completion in self.pretrained.engine.generate(batch, configs):
                answers.append(completion.text.strip())
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NvilaError("The nvila lmms-eval adapter answers generation tasks only (generate_until).")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NvilaError("The nvila lmms-eval adapter answers single-round generation tasks only.")
