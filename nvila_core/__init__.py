"""nvila's framework core: plugin registry, validated specs, model assembly, data, CLI.

The core names no concrete component; encoders, compressors, projectors, language models,
pruners and precision backends all arrive as plugins through the ``nvila`` entry-point group.
"""

import logging

# transformers imports torchao when it is installed, and torchao 0.18 registers Enum pytree
# constants that torch 2.14 warns about on every start. The warning is not ours to act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from nvila.core.errors import NvilaError  # noqa: E402
from nvila.core.hookspecs import hookimpl  # noqa: E402

__all__ = ["NvilaError", "hookimpl"]
