"""Which variants one run of push.yaml publishes: the matrix of its push job.

    REQUESTED="sd-turbo, sdxl-turbo" python3 .github/scripts/push_matrix.py

REQUESTED is the workflow_dispatch input: variant names separated by commas and/or spaces, or
"all"; a release leaves it empty, which also means all. The script writes variants=<JSON list>
to $GITHUB_OUTPUT (stdout without it). The names come from fastsd.variants, the list the
package serves, so a new variant is published without touching the workflow; fastsd.variants
needs only the standard library, so this runs on the runner's bare python3 with the checkout on
PYTHONPATH (push.yaml), or in .venv where the project is installed (scripts/setup-dev).
"""

from __future__ import annotations

import json
import os
import re
import sys

from fastsd.variants import VARIANTS

ALL = "all"


def select(requested: str) -> list[str]:
    """The variants to push, in VARIANTS order, once each. Raises ValueError for unknown names."""
    names = [name for name in re.split(r"[\s,]+", requested.strip().lower()) if name]
    if not names or names == [ALL]:
        return list(VARIANTS)
    if ALL in names:
        raise ValueError(f'"{ALL}" cannot be combined with variant names: {requested!r}')
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s): {', '.join(unknown)}. Choose from: {', '.join(VARIANTS)}, or {ALL}.")
    return [name for name in VARIANTS if name in names]


def main() -> int:
    try:
        chosen = select(os.environ.get("REQUESTED", ""))
    except ValueError as error:
        # A workflow command: GitHub shows it as an annotation on the run.
        print(f"::error title=Unknown variant::{error}")
        return 1
    line = f"variants={json.dumps(chosen)}\n"
    output = os.environ.get("GITHUB_OUTPUT")
    if output:
        with open(output, "a", encoding="utf-8") as handle:
            handle.write(line)
    print(f"pushing: {' '.join(chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
