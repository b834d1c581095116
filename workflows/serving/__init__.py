"""``nvila serve``: an OpenAI-compatible server over the inference engine.

:mod:`.protocol` (the wire format and its errors), :mod:`.media` (images and videos from requests, within
:class:`~.settings.MediaLimits`), :mod:`.worker` (the decoding thread: continuous batching), :mod:`.app` (the
FastAPI app and running it), :mod:`.cli` (the command's options).
"""
