"""One configuration of a training suite, in its own process: ``python -m nvila.workflows.bench SUITE NAME``
prints its record as one JSON line (the last line of stdout). ``nvila bench`` starts these."""

import json
import sys

from nvila.core.errors import NvilaError
from nvila.workflows.bench.training import run_configuration


def main(argv: list[str]) -> int:
    suite, name = argv
    try:
        record = run_configuration(suite, name)
    except NvilaError as exc:
        print(f"nvila: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
