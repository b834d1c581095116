"""``python -m nvila.workflows ...`` is the ``nvila`` command."""

import sys

from nvila.workflows.commands import main

sys.exit(main())
