"""The Replicate side of publishing a variant, with the replicate client (requirements-replicate.txt).

    python .github/scripts/replicate_model.py prepare OWNER/MODEL
    python .github/scripts/replicate_model.py check OWNER/MODEL [--previous VERSION_ID]

prepare: `cog push` only pushes to a model that exists, so create it when it does not (private,
on REPLICATE_HARDWARE, default gpu-l40s; REPLICATE_VISIBILITY=public to publish it), then print
previous=<latest version id, or empty> for $GITHUB_OUTPUT.

check: the push must have made a new version (the latest differs from the one prepare saw); run
one prediction on it and exit non-zero unless it succeeds with one image. Runs are queued one at
a time (push.yaml's concurrency), so the new latest version is this push's.

Both need REPLICATE_API_TOKEN (an API token, r8_...; cog login takes a different, CLI token).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import replicate

CHECK_INPUT = {"prompt": "a red apple", "num_outputs": 1}
# A new version boots cold on Replicate (image pull, then setup() loading the weights): minutes.
CHECK_TIMEOUT_S = int(os.environ.get("CHECK_TIMEOUT_S", "1800"))
POLL_S = 5


def split_model(model: str) -> tuple[str, str]:
    owner, _, name = model.partition("/")
    if not owner or not name or "/" in name:
        raise SystemExit(f"error: expected OWNER/MODEL, got {model!r} (is the REPLICATE_OWNER variable set?)")
    return owner, name


def latest_version_id(client: replicate.Client, model: str) -> str | None:
    latest = client.models.get(model).latest_version
    return latest.id if latest else None


def prepare(client: replicate.Client, model: str) -> int:
    from replicate.exceptions import ReplicateError

    owner, name = split_model(model)
    try:
        previous = latest_version_id(client, model)
    except ReplicateError as error:
        if error.status != 404:
            raise
        hardware = os.environ.get("REPLICATE_HARDWARE") or "gpu-l40s"
        visibility = os.environ.get("REPLICATE_VISIBILITY") or "private"
        try:
            client.models.create(
                owner=owner,
                name=name,
                hardware=hardware,
                visibility=visibility,
                description="Fast Stable Diffusion (fastsd), one variant per model.",
            )
        except ReplicateError as create_error:
            if create_error.status not in (401, 403, 404):
                raise
            print(
                f"::error::Replicate refused to create {model} ({create_error.status}): the API token "
                f"must be allowed to create models for {owner}. For an organization, use a token made "
                f"for that organization, or create the model once at https://replicate.com/create "
                f"(docs/deploy.md)."
            )
            return 1
        print(f"created {visibility} model {model} on {hardware}", file=sys.stderr)
        previous = None
    print(f"previous={previous or ''}")
    return 0


def check(client: replicate.Client, model: str, previous: str) -> int:
    split_model(model)
    version = latest_version_id(client, model)
    if version is None:
        print(f"::error::{model} has no version after cog push")
        return 1
    if previous and version == previous:
        print(
            f"::error::{model}: cog push made no new version (the latest is still {version}, as before "
            f"the push): nothing this run built was checked"
        )
        return 1
    print(f"checking {model}:{version} with {CHECK_INPUT}")
    prediction = client.predictions.create(version=version, input=CHECK_INPUT)
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    while prediction.status not in ("succeeded", "failed", "canceled"):
        if time.monotonic() > deadline:
            prediction.cancel()
            print(f"::error::prediction {prediction.id} did not finish in {CHECK_TIMEOUT_S} s; canceled it")
            return 1
        time.sleep(POLL_S)
        prediction.reload()
    print((prediction.logs or "")[-4000:])
    output = prediction.output
    if prediction.status != "succeeded":
        print(f"::error::prediction {prediction.id} on {model}:{version} {prediction.status}: {prediction.error}")
        return 1
    if not (isinstance(output, list) and len(output) == 1 and str(output[0]).startswith("https://")):
        print(f"::error::prediction {prediction.id} succeeded but returned {output!r}, not one image URL")
        return 1
    print(f"ok: {model}:{version} made {output[0]} (metrics: {prediction.metrics})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("prepare", "check"))
    parser.add_argument("model", help="OWNER/MODEL")
    parser.add_argument("--previous", default="", help="check: the latest version id before the push")
    args = parser.parse_args()
    if not os.environ.get("REPLICATE_API_TOKEN"):
        print("::error::REPLICATE_API_TOKEN is not set (repository secret REPLICATE_API_TOKEN)")
        return 1
    import replicate  # here, so that check() can be tested without the client installed

    client = replicate.Client()  # reads REPLICATE_API_TOKEN
    if args.action == "prepare":
        return prepare(client, args.model)
    return check(client, args.model, args.previous)


if __name__ == "__main__":
    sys.exit(main())
