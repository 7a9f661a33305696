"""What weighting and a long prompt add to a request, against a plain prompt, in the same run.

    python scripts/prompt_benchmark.py                # tiny sd-turbo (seconds)
    python scripts/prompt_benchmark.py --size full    # full-size sd-turbo random weights (built once, ~3 GB)

Three prompts, each new to the prompt cache (a different closing word per run), in turns so that
drift falls on every case alike:
1. plain: within 77 tokens, no weighting (the pipeline's own encode_prompt);
2. weighted: the same words with (word:1.3), ((word)) and [word] (compel; one more text-encoder
   call, for the empty prompt the weights scale from);
3. 3 chunks: unweighted, about 200 tokens (compel: a text-encoder call per 77-token chunk, and
   the UNet attends to 231 tokens instead of 77).
Prints the median and the fastest of the whole request (engine.generate: encoding, steps,
decoding) and of the encoding alone, and what each case adds to the plain one. Default inputs otherwise (sd-turbo:
512x512, 1 step, TAESD).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fastsd import prompts, variants
from fastsd.engine import Engine
from fastsd.pipelines import select_device
from fastsd.settings import Settings
from fastsd_testing.bench import Report, add_options, build_random_weights, resolve_options

PLAIN = "a watercolour of a harbour town at sunrise, boats in the water, run {}"
WEIGHTED = "a (watercolour:1.3) of a ((harbour town)) at [sunrise], boats in the water, run {}"
SCENE = "a watercolour of a harbour town at sunrise, boats in the water, gulls over the pier, "


def three_chunks(engine: Engine) -> str:
    """An unweighted prompt that compel encodes in exactly three 77-token chunks ({} for the run)."""
    tokenizer = engine.pipelines.text_to_image.tokenizer
    text = SCENE
    while len(tokenizer(text + "run 0", verbose=False).input_ids) < 2 * 77 + 20:
        text += "fishing nets drying in the sun, "
    return text + "run {}"


def timed(action) -> float:
    started = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, runs=7, quick_runs=15)  # runs: requests per case
    args = resolve_options(parser.parse_args())
    variant = variants.VARIANTS[args.variant]
    device, dtype = select_device()
    build_random_weights(variant, args.root, args.size, device)
    engine = Engine.load(variant, Settings(weights_root=args.root), device, dtype)
    engine.warm_up()
    long = three_chunks(engine)
    cases = {"plain": PLAIN, "weighted": WEIGHTED, "3 chunks": long}
    encoder = prompts.PromptEncoder(engine.pipelines.text_to_image, engine.pipelines.device)
    with torch.inference_mode():
        lengths = {
            name: encoder.encode(text.format("x"), None, False)["prompt_embeds"].shape[1]
            for name, text in cases.items()
        }
    assert lengths == {"plain": 77, "weighted": 77, "3 chunks": 231}, lengths

    request_s = {name: [] for name in cases}
    encode_s = {name: [] for name in cases}
    for run in range(args.runs):
        for name, text in cases.items():
            prompt = text.format(f"{run}a")
            request = engine.validate(prompt=prompt, seed=run)
            request_s[name].append(timed(lambda request=request: engine.generate(request)))
            with torch.inference_mode():
                fresh = text.format(f"{run}b")
                encode_s[name].append(timed(lambda fresh=fresh: encoder.encode(fresh, None, False)))
        print({name: round(values[-1], 3) for name, values in request_s.items()}, flush=True)

    def median_ms(values):
        return round(statistics.median(values) * 1000, 1)

    def min_ms(values):
        return round(min(values) * 1000, 1)

    report = Report(f"prompts-{variant.name}", args, device, dtype, variant=variant.name, runs=args.runs)
    steps = variant.num_inference_steps
    report["inputs"] = f"{variant.width}x{variant.height}, {steps} step(s), vae {variant.default_vae}"
    report["request_median_ms"] = {name: median_ms(values) for name, values in request_s.items()}
    report["encode_median_ms"] = {name: median_ms(values) for name, values in encode_s.items()}
    # On a shared machine the fastest run is the one least disturbed by others.
    report["request_min_ms"] = {name: min_ms(values) for name, values in request_s.items()}
    report["encode_min_ms"] = {name: min_ms(values) for name, values in encode_s.items()}
    print(
        f"\n{report['device']} | {report['dtype']} | {variant.name} {args.size} | {report['inputs']} | {args.runs} runs"
    )
    for statistic in ("median", "min"):
        print(f"{statistic:<10}{'request ms':>12}{'added':>9}{'encoding ms':>13}{'added':>9}")
        request, encode = report[f"request_{statistic}_ms"], report[f"encode_{statistic}_ms"]
        for name in cases:
            print(
                f"{name:<10}{request[name]:>12.1f}{request[name] - request['plain']:>+9.1f}"
                f"{encode[name]:>13.1f}{encode[name] - encode['plain']:>+9.1f}"
            )
    print(f"wrote {report.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
