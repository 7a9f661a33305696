"""What safety checking adds to a request, through the real Cog server.

    python scripts/safety_benchmark.py            # full-size sd-turbo and checkers (CLIP ViT-L/14, ViT-base)
    python scripts/safety_benchmark.py --quick    # tiny models: a smoke run

Two servers on random weights in the layout download_weights.py leaves, default inputs (sd-turbo:
512x512, 1 step, TAESD), requests one at a time:
1. the usual deployment, whose NSFW classifier calls every image normal (what almost every
   request pays: the classic checker runs only on what the classifier calls NSFW); requests
   alternate checked (the default) and disable_safety_checker=true;
2. a deployment whose classifier calls every image NSFW and whose classic checker flags none:
   every request pays for both and still gets its image (the most a returned image costs).
Prints medians (end to end, and the server's safety_time metric) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from fastsd import variants
from fastsd.pipelines import select_device
from fastsd.weights import layout
from fastsd_testing import random_models
from fastsd_testing.bench import Report, add_options, build_random_weights, resolve_options, timed_prediction
from fastsd_testing.cog_server import CogServer

PROMPT = "a watercolour of a harbour town at sunrise"
CLASSIFIER = layout.Source(layout.NSFW_CLASSIFIER, variants.NSFW_CLASSIFIER_REPO)


def strict_root(root: Path, scratch: Path, size: str) -> Path:
    """root's weights, linked, but a classifier that calls every image NSFW (the checker flags none)."""
    strict = scratch / "strict"
    for top in ("weights", "lora"):
        (strict / top).mkdir(parents=True)
        for entry in (root / top).iterdir() if (root / top).is_dir() else ():
            if entry.name != CLASSIFIER.relative_folder.parts[1]:
                (strict / top / entry.name).symlink_to(entry)
    random_models.build_nsfw_classifier(strict / CLASSIFIER.relative_folder, size, verdict=random_models.UNSAFE)
    return strict


def serve(variant, root: Path, log_path: Path, cases: dict[str, dict], runs: int) -> dict[str, dict[str, list]]:
    """Each case's inputs `runs` times, interleaved: end-to-end seconds and safety_time, per case."""
    timings = {case: {"request_s": [], "safety_time_s": []} for case in cases}
    server = CogServer({"FASTSD_VARIANT": variant.name, "FASTSD_WEIGHTS_ROOT": str(root)}, log_path)
    try:
        if server.wait_for_setup()["status"] != "READY":
            raise RuntimeError(log_path.read_text()[-3000:])
        timed_prediction(server, prompt=PROMPT, seed=0)  # one-off first-request costs belong to no case
        for index in range(runs):
            for case, inputs in cases.items():
                elapsed, metrics = timed_prediction(server, prompt=PROMPT, seed=index, **inputs)
                timings[case]["request_s"].append(elapsed)
                timings[case]["safety_time_s"].append(metrics["safety_time"])
            print({case: round(values["request_s"][-1], 3) for case, values in timings.items()}, flush=True)
    finally:
        server.stop()
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, runs=7, quick_runs=7)
    args = resolve_options(parser.parse_args())
    size, root = args.size, args.root
    variant = variants.VARIANTS[args.variant]
    device, dtype = select_device()
    build_random_weights(variant, root, size, device)
    scratch = Path(tempfile.mkdtemp(prefix="fastsd-safety-bench-"))
    try:
        timings = serve(
            variant,
            root,
            scratch / "usual.log",
            {"checked": {}, "unchecked": {"disable_safety_checker": True}},
            args.runs,
        )
        timings |= {
            "both_run": serve(
                variant, strict_root(root, scratch, size), scratch / "strict.log", {"both_run": {}}, args.runs
            )["both_run"]
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    medians = {
        case: {name: round(statistics.median(values), 3) for name, values in measured.items()}
        for case, measured in timings.items()
    }
    # The check's own time (the server's safety_time metric) is the precise figure; the difference
    # of end-to-end medians is shown too, but on a shared VM it moves by a second from run to run.
    unchecked = medians["unchecked"]["request_s"]
    added = {
        case: {
            "safety_time_s": medians[case]["safety_time_s"],
            "safety_time_share_of_unchecked_request": round(medians[case]["safety_time_s"] / unchecked, 3),
            "end_to_end_difference_s": round(medians[case]["request_s"] - unchecked, 3),
        }
        for case in ("checked", "both_run")
    }
    report = Report(f"safety-{variant.name}", args, device, dtype, variant=variant.name, runs=args.runs)
    report["median"] = medians
    report["added_to_a_request"] = added
    report["all"] = {case: {name: [round(v, 3) for v in values] for name, values in m.items()}
                     for case, m in timings.items()}  # fmt: skip
    print(json.dumps({"median": medians, "added": added}, indent=1))
    print(f"wrote {report.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
