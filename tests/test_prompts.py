"""Weighted prompts and prompts past 77 tokens (fastsd.prompts, docs/prompts.md): the embeddings
against compel's own on the tiny SD1.5, SD2.x (sd-turbo) and SDXL (sdxl-turbo) models, every form
through the real Cog server, the plain prompt byte for byte as the pipeline encodes it, batching,
and a user LoRA's tokens inside weighted text."""

from __future__ import annotations

import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from compel import Compel, CompelForSD, CompelForSDXL
from compel.prompt_parser import Blend

from fastsd import prompts, variants
from fastsd.batching import Batcher
from fastsd.engine import Engine
from fastsd.errors import InputError
from fastsd.settings import Settings
from fastsd.tasks import Task
from fastsd_testing.cog_server import output_pixels, ready_server
from fastsd_testing.helpers import load_engine
from fastsd_testing.user_loras import FileServer, replicate_training_tar

SMALL = dict(width=64, height=64, seed=5, output_format="png", disable_safety_checker=True)
ARCHITECTURES = ["sd15-lcm", "sd-turbo", "sdxl-turbo"]  # SD1.5, SD2.1, SDXL


def filler(tokenizer, tokens: int) -> str:
    """Words that take at least this many of the tokenizer's tokens (markers excluded)."""
    words = []
    while len(tokenizer(" ".join(words)).input_ids) - 2 < tokens:
        words.append(f"fern{len(words) % 7} moss")
    return " ".join(words)


# --- the rules, without a model ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "plain"),
    [
        ("a lighthouse, high-quality", "a lighthouse, high-quality"),  # no weighting: read as written
        ("an x-ray, 16-bit, a - b, 1+1", "an x-ray, 16-bit, a - b, 1+1"),  # signs that weigh nothing
        ("a cat :) a dog)", "a cat :) a dog)"),  # a closing bracket with none open: the character
        ("a cat (dog", None),  # one left open weighs the rest of the prompt, as in Automatic1111
        ("a (cat:1.0) dog", "a cat dog"),  # all weights 1: the words, the pipeline's way
        ("a \\(cat\\)", "a (cat)"),
        ("(cat:1.3)", None),
        ("cat+", None),
        ("cat+, dog", None),
        ("a () b", "a  b"),  # an empty group weighs nothing
        ("[]", ""),
        ("C++ code", None),
    ],
)
def test_what_is_read_as_plain_text(written, plain):
    assert prompts.parse(written).plain == plain


def test_bad_syntax_is_one_sentence():
    """Every refusal in full: tests/test_prompt_syntax.py."""
    with pytest.raises(InputError, match=re.escape("prompt: the weight in '(cat:-1)' must be from 0 to 10.")):
        prompts.parse("(cat:-1)")
    with pytest.raises(InputError, match=re.escape("negative_prompt nests brackets 17 deep; at most 16.")):
        prompts.parse("[" * 17, "negative_prompt")


# --- embeddings against compel's own, per architecture -----------------------------------------


@pytest.fixture(scope="module", params=ARCHITECTURES)
def engine(request, weights_root):
    return load_engine(weights_root, request.param)


def test_the_tiny_tokenizer_splits_words_into_many_tokens(engine):
    """So that 77-token chunks are reached by prompts of a few dozen words."""
    tokenizer = engine.pipelines.text_to_image.tokenizer
    assert tokenizer.model_max_length == 77
    assert len(tokenizer(filler(tokenizer, 200)).input_ids) >= 202


def compel_reference(pipeline, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    """compel's own encoding (its SD and SDXL wrappers); the pooled embedding of SDXL is that of the
    words alone (compel's wrapper pools the text with its syntax characters: docs/prompts.md)."""
    if "text_encoder_2" not in pipeline.components:
        got = CompelForSD(pipeline)(prompt, negative_prompt=negative)
        return {"prompt_embeds": got.embeds, "negative_prompt_embeds": got.negative_embeds}
    wrapper = CompelForSDXL(pipeline)
    got = wrapper(prompt, negative_prompt=negative)

    def words(text):
        parts = Compel.parse_prompt_string(text).prompts
        flat = [prompt for part in parts for prompt in (part.prompts if isinstance(part, Blend) else [part])]
        return " ".join(fragment.text for prompt in flat for fragment in prompt.children)

    provider = wrapper.compel_2.conditioning_provider
    pooled = torch.cat([provider.get_pooled_embeddings([words(text)]) for text in (prompt, negative)])
    return {
        "prompt_embeds": got.embeds,
        "negative_prompt_embeds": got.negative_embeds,
        "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": pooled[1:],
    }


@pytest.mark.parametrize(
    ("ours", "compel_text"),
    [
        ("a (lighthouse:1.3) at dawn", "a (lighthouse)1.3 at dawn"),
        ("a ((lighthouse)) at dawn", "a ((lighthouse)1.1)1.1 at dawn"),
        ("a (lighthouse) at [dawn]", "a (lighthouse)1.1 at (dawn)0.9090909090909091"),
        ("a lighthouse++ at dawn-", "a lighthouse++ at dawn-"),
        ('("a lighthouse", "a boat").blend(0.7, 0.3)', '("a lighthouse", "a boat").blend(0.7, 0.3)'),
        ('("a lighthouse", "at dawn").and()', '("a lighthouse", "at dawn").and()'),
    ],
)
def test_weighted_embeddings_are_compels_own(engine, ours, compel_text):
    pipeline = engine.pipelines.text_to_image
    encoder = prompts.PromptEncoder(pipeline, "cpu")
    with torch.inference_mode():
        got = encoder.encode(ours, "(blurry:1.2), dark", True)
        expected = compel_reference(pipeline, compel_text, "(blurry)1.2, dark")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_a_long_prompt_is_encoded_in_chunks_like_compel_and_padded_with_its_negative(engine):
    pipeline = engine.pipelines.text_to_image
    long = filler(pipeline.tokenizer, 200)
    with torch.inference_mode():
        got = prompts.PromptEncoder(pipeline, "cpu").encode(long, "blurry", True)
        expected = compel_reference(pipeline, long, "blurry")
    assert got["prompt_embeds"].shape[1] == got["negative_prompt_embeds"].shape[1] == 3 * 77
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_chunks_call_the_text_encoders_as_the_pipeline_does_at_77_tokens(engine):
    """[1, 77] int64 token ids, the same arguments: the GPU path's captured 77-token graph of an
    encoder (fastsd.gpu) replays for every chunk. (A weight below 1 adds a masked call.)"""
    pipeline = engine.pipelines.text_to_image
    calls = []

    def record(module, args, kwargs):
        described = {key: "tensor" if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        calls.append((tuple((tuple(a.shape), a.dtype) for a in args), tuple(sorted(described.items()))))

    names = [name for name in ("text_encoder", "text_encoder_2") if pipeline.components.get(name) is not None]
    hooks = [pipeline.components[name].register_forward_pre_hook(record, with_kwargs=True) for name in names]
    try:
        with torch.inference_mode():
            pipeline.encode_prompt(
                "a lighthouse", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            own = set(calls)
            calls.clear()
            long = filler(pipeline.tokenizer, 200) + ", a (lighthouse:1.3)"
            got = prompts.PromptEncoder(pipeline, "cpu").encode(long, "(dark:1.2)", True)
    finally:
        for hook in hooks:
            hook.remove()
    assert got["prompt_embeds"].shape[1] == 3 * 77
    assert len(own) == 1 and next(iter(own))[0] == (((1, 77), torch.int64),)
    assert set(calls) == own and len(calls) >= 3 * len(names)


@pytest.mark.parametrize("name", ["sd-turbo", "sdxl-turbo"])
def test_with_graphs_a_chunked_prompt_replays_the_77_token_graph_per_chunk(weights_root, name):
    """FASTSD_GRAPHS=on (on the CPU its eager stand-in runs the same code): no new capture for a
    new length, no eager call."""
    from fastsd.gpu import GRAPHS_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(GRAPHS_ENV, "on")
        engine = load_engine(weights_root, name)
        engine.warm_up()
    encoders = [m for n, m in engine.graphs.modules.items() if n.startswith("text_encoder")]
    before = [(len(m.captured()), m.replays, m.eager_calls) for m in encoders]
    assert all(captured >= 1 for captured, _, _ in before)
    long = filler(engine.pipelines.text_to_image.tokenizer, 200) + ", a (lighthouse:1.3)"
    engine.graphs.use(True)
    with torch.inference_mode():
        assert engine.prompts.get(long, None, False)["prompt_embeds"].shape[1] == 3 * 77
    for module, (captured, replays, eager) in zip(encoders, before, strict=True):
        assert (len(module.captured()), module.eager_calls) == (captured, eager), module.name
        assert module.replays >= replays + 3, module.name


def test_a_plain_prompt_has_exactly_the_pipelines_own_embeddings(engine):
    pipeline = engine.pipelines.text_to_image
    names = prompts.OUTPUT_NAMES
    for negative in ("blurry, dark", None):
        with torch.inference_mode():
            got = engine.prompts.get("a lighthouse at dawn, high-quality :)", negative, True)
            own = pipeline.encode_prompt(
                prompt="a lighthouse at dawn, high-quality :)",
                device="cpu",
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
        own = {name: tensor for name, tensor in zip(names, own, strict=False) if tensor is not None}
        assert set(got) == set(own)
        assert all(torch.equal(got[name], own[name]) for name in own)


def test_the_sdxl_negative_is_zeros_when_none_is_given_as_the_pipeline_does(weights_root):
    engine = load_engine(weights_root, "sdxl-turbo")
    pipeline = engine.pipelines.text_to_image
    assert pipeline.config.force_zeros_for_empty_prompt
    long = filler(pipeline.tokenizer, 100)
    with torch.inference_mode():
        weighted = engine.prompts.get("(a lighthouse:1.2)", None, True)
        chunked = engine.prompts.get(long, None, True)
    for got in (weighted, chunked):
        assert not got["negative_prompt_embeds"].any() and not got["negative_pooled_prompt_embeds"].any()
        assert got["negative_prompt_embeds"].shape == got["prompt_embeds"].shape
    assert chunked["prompt_embeds"].shape[1] == 2 * 77


def test_the_cache_keys_on_the_text_as_written(weights_root):
    engine = load_engine(weights_root, "sd-turbo")
    first = engine.prompts.get("a (cat:1.3)", None, False)
    assert engine.prompts.get("a (cat:1.3)", None, False) is first
    same_weights = engine.prompts.get("a (cat)1.3", None, False)
    assert same_weights is not first and torch.equal(same_weights["prompt_embeds"], first["prompt_embeds"])


def test_bad_syntax_is_answered_before_the_request_queues(weights_root):
    engine = load_engine(weights_root, "sd-turbo")
    with pytest.raises(InputError, match=re.escape("prompt: the weight in '(cat:1,5)' is not a number")):
        engine.validate(prompt="a (cat:1,5)", **SMALL)
    # A negative prompt is read only where it is used (guidance above 1).
    engine.validate(prompt="a cat", negative_prompt="(dog:1,5)", **SMALL)
    with pytest.raises(InputError, match=re.escape("negative_prompt: the weight in '(dog:1,5)'")):
        engine.validate(prompt="a cat", negative_prompt="(dog:1,5)", guidance_scale=2.0, **SMALL)


def test_a_prompt_past_the_maximum_is_refused_before_the_request_queues(weights_root):
    engine = load_engine(weights_root, "sd-turbo")
    tokenizer = engine.pipelines.text_to_image.tokenizer
    with pytest.raises(
        InputError,
        match=r"^prompt takes \d+ chunks of 77 tokens; at most 8 \(about 600 tokens\) are encoded: shorten it\.$",
    ):
        engine.validate(prompt=filler(tokenizer, prompts.MAX_CHUNKS * 75 + 10), **SMALL)
    # Each group weighted below 1 costs compel another pass of the encoder over every chunk.
    weakened = " ".join(f"[fern{i}]" for i in range(prompts.MAX_ENCODER_PASSES))
    with pytest.raises(InputError, match=r"^prompt takes \d+ text-encoder passes .*; at most 32: shorten it"):
        engine.validate(prompt=weakened, **SMALL)
    engine.validate(prompt=" ".join(f"[fern{i}]" for i in range(prompts.MAX_ENCODER_PASSES // 2)), **SMALL)
    # The worker checks again (a LoRA's new tokens are counted only there).
    request = engine.validate(prompt="a cat", **SMALL)
    with pytest.raises(InputError, match=r"^prompt takes \d+ chunks of 77 tokens"):
        engine.generate(replace(request, prompt=filler(tokenizer, prompts.MAX_CHUNKS * 75 + 10)))


# --- batching, LoRA tokens ---------------------------------------------------------------------


@pytest.mark.slow  # loads SDXL twice: 8 s
def test_a_request_batched_with_a_long_prompt_gets_the_image_it_gets_alone(weights_root):
    engine = load_engine(weights_root, "sd-turbo")
    short = engine.validate(prompt="a red boat", seed=7, width=64, height=64)
    long = engine.validate(prompt=filler(engine.pipelines.text_to_image.tokenizer, 120), seed=8, width=64, height=64)
    alone = np.asarray(engine.generate(short).images[0], dtype=int)
    batcher = Batcher(engine)
    try:
        blocker = batcher.submit(engine.validate(prompt="x", num_inference_steps=30, width=384, height=384))
        deadline = time.monotonic() + 10
        while not blocker.future.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        jobs = [batcher.submit(request) for request in (long, short, short)]
        results = [job.future.result(timeout=300) for job in jobs]
    finally:
        batcher.close()
    # One queue pick, two calls: the two short ones together, the long one on its own.
    assert [result.batch_size for result in results] == [1, 2, 2]
    for result in results[1:]:
        assert np.abs(np.asarray(result.images[0], dtype=int) - alone).max() <= 2


def test_a_user_loras_tokens_work_inside_weighted_text(weights_root, monkeypatch, tmp_path):
    from fastsd.loras import remote

    monkeypatch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
    monkeypatch.setenv("FASTSD_LORA_CACHE", str(tmp_path / "cache"))
    engine = load_engine(weights_root, "sdxl-turbo")
    tar = replicate_training_tar(weights_root / "weights" / variants.VARIANTS["sdxl-turbo"].model)
    with FileServer({"/trained_model.tar": tar}) as server:
        url = server.url("/trained_model.tar")
        weighted = engine.validate(prompt="a photo of (TOK:1.3) on a beach", lora_weights=url, **SMALL)
        plain = engine.validate(prompt="a photo of TOK on a beach", lora_weights=url, **SMALL)
        engine.generate(plain)  # loads the LoRA and its tokens
    adapter = weighted.loras[0][0].adapter
    tokens = f"<{adapter}_s0><{adapter}_s1>"
    assert weighted.prompt == f"a photo of ({tokens}:1.3) on a beach"
    pipeline = engine.pipelines.text_to_image
    ids = [pipeline.tokenizer.convert_tokens_to_ids(f"<{adapter}_s{i}>") for i in range(2)]
    compel = Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder)
    assert compel.conditioning_provider.get_token_ids([tokens], include_start_and_end_markers=False) == [ids]
    encoding = ((adapter, 1.0),)
    with torch.inference_mode():
        ours = engine.prompts.get(weighted.prompt, None, False, encoding)
        expected = compel_reference(pipeline, f"a photo of ({tokens})1.3 on a beach", "")
    assert torch.equal(ours["prompt_embeds"], expected["prompt_embeds"])


def test_weighted_text_follows_a_text_encoder_lora_on_and_off(weights_root, monkeypatch, tmp_path):
    """compel's empty-prompt embedding (what weights scale from) is kept per state of the text
    encoders: with a LoRA on them, and after it, weighted text is what compel makes fresh."""
    from fastsd.loras import remote
    from fastsd_testing.user_loras import write_user_lora

    monkeypatch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
    monkeypatch.setenv("FASTSD_LORA_CACHE", str(tmp_path / "cache"))
    engine = load_engine(weights_root, "sd15-lcm")
    pipeline = engine.pipelines.text_to_image
    model = weights_root / "weights" / variants.VARIANTS["sd15-lcm"].model
    lora = write_user_lora(model, tmp_path / "style.safetensors", text_encoder=True, seed=1).read_bytes()
    weighted, compel_text = "a (lighthouse:1.3) at [dawn]", "a (lighthouse)1.3 at (dawn)0.9090909090909091"
    with FileServer({"/style.safetensors": lora}) as server:
        with_lora = engine.validate(prompt="x", lora_weights=server.url("/style.safetensors"), **SMALL)
    states = [("before", ()), ("with the LoRA", ((with_lora.loras[0][0].adapter, 1.0),)), ("after", ())]
    got = {}
    for state, key in states:
        engine.generate(with_lora if key else engine.validate(prompt="x", **SMALL))  # applies or removes it
        with torch.inference_mode():
            got[state] = engine.prompts.get(f"{weighted}, {state}", None, False, key)["prompt_embeds"]
            expected = compel_reference(pipeline, f"{compel_text}, {state}", "")["prompt_embeds"]
            if key:  # the LoRA does change the weighted text's embeddings
                relit = engine.prompts.get(f"{weighted}, before", None, False, key)["prompt_embeds"]
                assert not torch.equal(relit, got["before"])
        assert torch.equal(got[state], expected), state


# --- through the Cog server ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def served(request, weights_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / f"prompts-{request.param}.log"
    for server in ready_server({"FASTSD_VARIANT": request.param, "FASTSD_WEIGHTS_ROOT": str(weights_root)}, log_path):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
            # The server's own precision (no dtype given): its images are compared byte for byte.
            engine = Engine.load(variants.VARIANTS[request.param], Settings.from_environment())
        yield server, engine


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    """The tiny models hardly follow the text (a weight moves a few pixels by a level or two), but
    the same inputs always draw the same image: any difference is the text's."""
    return not np.array_equal(a, b)


def image(server, prompt: str, **inputs) -> np.ndarray:
    [pixels] = output_pixels(server.predict(prompt=prompt, **{**SMALL, **inputs}))
    return pixels


def pipelines_own(engine: Engine, prompt: str, **inputs) -> np.ndarray:
    """What the diffusers pipeline draws when it encodes the text itself (its encode_prompt)."""
    request = engine.validate(prompt=prompt, **{**SMALL, **inputs})
    assert request.task is Task.TEXT_TO_IMAGE
    negative = request.negative_prompt or None if request.uses_guidance else None
    with torch.inference_mode():
        drawn = engine.pipelines.get(*request.pipeline_key)(
            prompt=request.prompt,
            negative_prompt=negative,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
        ).images[0]
    return np.asarray(drawn.convert("RGB"), dtype=int)


def test_a_plain_prompt_draws_byte_for_byte_what_the_pipelines_own_encoding_draws(served):
    server, engine = served
    for inputs in ({}, {"guidance_scale": 2.0}, {"guidance_scale": 2.0, "negative_prompt": "blurry, dark"}):
        prompt = "a lighthouse at dawn, high-quality :)"
        assert np.array_equal(image(server, prompt, **inputs), pipelines_own(engine, prompt, **inputs)), inputs


def test_every_form_through_the_server(served):
    server, engine = served
    plain = image(server, "a lighthouse at dawn")
    assert np.array_equal(image(server, "a (lighthouse:1.0) at dawn"), plain)
    weighted = image(server, "a (lighthouse:1.4) at dawn")
    assert differ(weighted, plain)
    assert np.array_equal(weighted, image(server, "a (lighthouse)1.4 at dawn"))
    assert np.array_equal(image(server, "a ((lighthouse)) at dawn"), image(server, "a ((lighthouse)1.1)1.1 at dawn"))
    assert np.array_equal(image(server, "a (lighthouse) at dawn"), image(server, "a lighthouse+ at dawn"))
    assert np.array_equal(
        image(server, "a [lighthouse] at dawn"), image(server, "a (lighthouse)0.9090909090909091 at dawn")
    )
    blend = image(server, '("a lighthouse", "a boat").blend(0.5, 0.5)')
    assert differ(blend, image(server, "a lighthouse"))
    # \( is a literal parenthesis, and an unmatched one is read as it is: the pipeline's own reading.
    assert np.array_equal(image(server, "a \\(lighthouse\\) at dawn"), pipelines_own(engine, "a (lighthouse) at dawn"))
    assert np.array_equal(image(server, "a lighthouse :)"), pipelines_own(engine, "a lighthouse :)"))
    guided = dict(guidance_scale=2.0)
    weighted_negative = image(server, "a lighthouse", negative_prompt="(blurry:1.5)", **guided)
    assert np.array_equal(weighted_negative, image(server, "a lighthouse", negative_prompt="(blurry)1.5", **guided))
    assert differ(weighted_negative, image(server, "a lighthouse", negative_prompt="blurry", **guided))


def test_the_words_past_token_77_change_the_image(served):
    server, engine = served
    start = filler(engine.pipelines.text_to_image.tokenizer, 150)
    red, blue = f"{start}, a red boat at sea", f"{start}, a blue kite in the sky"
    assert np.array_equal(pipelines_own(engine, red), pipelines_own(engine, blue))  # the pipeline cuts them
    assert differ(image(server, red), image(server, blue))


def test_bad_syntax_fails_with_one_sentence_and_the_next_request_is_unchanged(served):
    server, engine = served
    before = image(server, "a (lighthouse:1.2)")
    for prompt, message in (
        ("a (lighthouse:1,2)", "prompt: the weight in '(lighthouse:1,2)' is not a number; write it like (words:1.3)."),
        ("a [lighthouse:boat:0.5]", "Automatic1111's prompt editing, which is not supported"),
    ):
        response = server.predict(prompt=prompt, **SMALL)
        assert response["status"] == "failed" and message in response["error"]
    response = server.predict(prompt="a lighthouse", negative_prompt="(dark:-2)", guidance_scale=2.0, **SMALL)
    assert response["status"] == "failed" and "negative_prompt: the weight in '(dark:-2)'" in response["error"]
    too_long = filler(engine.pipelines.text_to_image.tokenizer, prompts.MAX_CHUNKS * 75 + 10)
    response = server.predict(prompt=too_long, **SMALL)
    assert response["status"] == "failed" and "at most 8 (about 600 tokens) are encoded" in response["error"]
    assert server.is_ready_again()
    assert np.array_equal(image(server, "a (lighthouse:1.2)"), before)


def test_the_probes_prompts_are_answered_at_once_and_the_worker_stays_free(served):
    """Prompts that once held the worker's CPU for minutes (compel's parser backtracks): each is
    answered within seconds, and a plain request after them is served as before."""
    server, _ = served
    before = image(server, "a lighthouse")
    hostile = [
        "[" * 16 + "a" + "]" * 16,  # 33 characters: once more than 95 s
        "(" * 300 + "a" + ")" * 300,
        "(" * 6 + "a" + ").and()" * 6,
        "a" + "+" * 9999,
        "(" + ", ".join(['"a"'] * 1000) + ").blend()",
        '("a", "b").blend(1e400, nan)',
    ]
    for prompt in hostile:
        started = time.monotonic()
        response = server.predict(prompt=prompt, **SMALL)
        assert time.monotonic() - started < 30, prompt[:40]  # the request's own work, not minutes
        if response["status"] == "failed":
            assert response["error"].endswith(".") and "Traceback" not in response["error"], response["error"]
    assert server.is_ready_again()
    started = time.monotonic()
    assert np.array_equal(image(server, "a lighthouse"), before)
    assert time.monotonic() - started < 30
