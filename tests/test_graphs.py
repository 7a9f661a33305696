"""The GPU fast path on the CPU: the capture plan through the eager stand-in (the same code as the
CUDA graphs, less the launch), padding to a captured batch, what runs eagerly, the captures made
between requests and their bounds, FASTSD_GRAPHS, and images kept on the device until encoded."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import variants
from fastsd.gpu import GRAPHS_ENV, Graphs, postprocess
from fastsd.gpu.graphs import Executor, GraphedModule
from fastsd.gpu.plan import CapturePlan, batch_sizes
from fastsd_testing.cog_server import CogServer, output_pixels, ready_server
from fastsd_testing.helpers import load_engine

SMALL = dict(width=64, height=64)


class TinyNet(torch.nn.Module):
    """A real module with the kinds of inputs the UNet takes: a batch, a scalar, a keyword dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)

    def forward(self, sample, timestep, extra=None, scale=1.0):
        out = self.norm(self.conv(sample)) * timestep * scale
        return {"sample": out + extra["bias"][:, :, None, None], "mean": out.mean(dim=(1, 2, 3))}


def graphed(plan: CapturePlan | None = None, executor: Executor | None = None):
    net = TinyNet().eval()
    reference = TinyNet().eval()  # the same weights, never graphed: what eager gives
    plan = plan or CapturePlan(batch_sizes(4))
    return GraphedModule("net", net, executor or Executor("cpu"), plan), net, reference


def inputs(batch: int, size: int = 8, seed: int = 1) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, size, size, generator=generator),
        torch.tensor(0.5),
        {"bias": torch.randn(batch, 4, generator=generator)},
    )


def call(net, batch, size=8, seed=1, scale=1.0):
    sample, timestep, extra = inputs(batch, size, seed)
    with torch.inference_mode():
        return net(sample, timestep, extra={"bias": extra["bias"]}, scale=scale)


def test_batch_sizes_double_up_to_the_budget_which_is_captured_too():
    assert batch_sizes(8) == (1, 2, 4, 8)
    assert batch_sizes(12) == (1, 2, 4, 8, 12)
    assert batch_sizes(1) == (1,)


def test_setup_captures_each_batch_and_a_smaller_batch_pads_to_the_next_captured_one():
    wrapper, net, reference = graphed()
    with wrapper.plan.capturing_all():
        for batch in (1, 2, 4):
            call(net, batch)
    assert sorted(s.batch for s in wrapper.captured()) == [1, 2, 4]
    replays, eager = wrapper.replays, wrapper.eager_calls
    out = call(net, 3, seed=7)  # no graph of 3: the graph of 4, padded
    assert (wrapper.replays, wrapper.eager_calls) == (replays + 1, eager)
    assert sorted(s.batch for s in wrapper.captured()) == [1, 2, 4]
    expected = call(reference, 3, seed=7)
    assert out["sample"].shape[0] == 3 and out["mean"].shape == (3,)
    torch.testing.assert_close(out["sample"], expected["sample"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["mean"], expected["mean"], rtol=0, atol=1e-6)


def test_a_replay_reads_each_calls_own_inputs_and_returns_outputs_of_its_own():
    wrapper, net, reference = graphed()
    with wrapper.plan.capturing_all():
        call(net, 2, seed=1)
    first = call(net, 2, seed=2)
    second = call(net, 2, seed=3)  # the static buffers now hold seed 3's inputs
    torch.testing.assert_close(first["sample"], call(reference, 2, seed=2)["sample"], rtol=0, atol=1e-6)
    torch.testing.assert_close(second["sample"], call(reference, 2, seed=3)["sample"], rtol=0, atol=1e-6)
    assert wrapper.replays == 3


def test_other_shapes_and_values_run_eagerly_and_are_counted():
    wrapper, net, reference = graphed()
    with wrapper.plan.capturing_all():
        call(net, 2)
    for batch, size, scale in ((8, 8, 1.0), (2, 16, 1.0), (2, 8, 0.5)):  # above every graph; new size; new value
        eager = wrapper.eager_calls
        out = call(net, batch, size, scale=scale)
        assert wrapper.eager_calls == eager + 1
        torch.testing.assert_close(out["sample"], call(reference, batch, size, scale=scale)["sample"])
    assert len(wrapper.captured()) == 1


def test_a_signature_seen_repeatedly_is_captured_between_requests():
    plan = CapturePlan(batch_sizes(4), capture_after=3)
    wrapper, net, _ = graphed(plan)
    for _ in range(2):
        call(net, 1, size=16)
    assert plan.pending == [] and not plan.capture_one()
    call(net, 1, size=16)
    assert [name for name, _ in plan.pending] == ["net"]
    assert wrapper.captured() == []  # never during a request
    assert plan.capture_one() and not plan.capture_one()
    assert [(s.batch, s.describe()) for s in wrapper.captured()] == [(1, "1x4x16x16, scalar, 1x4")]
    replays = wrapper.replays
    call(net, 1, size=16)
    assert wrapper.replays == replays + 1


def test_captures_between_requests_are_bounded_in_number():
    plan = CapturePlan(batch_sizes(4), capture_after=1, max_background=2)
    wrapper, net, _ = graphed(plan)
    for size in (8, 16, 24, 32):
        call(net, 1, size=size)
    assert len(plan.pending) == 2
    while plan.capture_one():
        pass
    for size in (40, 48):
        call(net, 1, size=size)
    assert plan.pending == [] and plan.background_made == 2 and len(wrapper.captured()) == 2


class LowMemory(Executor):
    """The stand-in executor, reporting a device with 5% of its memory free."""

    def memory_free_fraction(self) -> float:
        return 0.05


def test_captures_between_requests_stop_when_device_memory_runs_low():
    plan = CapturePlan(batch_sizes(4), capture_after=1, min_free_memory=0.15)
    wrapper, net, _ = graphed(plan, LowMemory("cpu"))
    call(net, 1, size=16)
    call(net, 1, size=24)
    assert len(plan.pending) == 2
    assert not plan.capture_one()
    assert plan.pending == [] and wrapper.captured() == []
    call(net, 1, size=32)
    assert plan.pending == []  # nothing more is queued


def test_a_module_whose_weights_moved_drops_its_graphs_and_an_off_executor_runs_eagerly():
    wrapper, net, reference = graphed()
    with wrapper.plan.capturing_all():
        call(net, 2)
    wrapper.executor.enabled = False
    replays = wrapper.replays
    call(net, 2)
    assert wrapper.replays == replays
    wrapper.executor.enabled = True
    net.double()
    reference.double()
    sample, timestep, extra = inputs(2)
    with torch.inference_mode():
        out = net(sample.double(), timestep.double(), extra={"bias": extra["bias"].double()})
        expected = reference(sample.double(), timestep.double(), extra={"bias": extra["bias"].double()})
    assert wrapper.replays == replays and wrapper.captured() == []  # the old graphs read the old tensors: gone
    torch.testing.assert_close(out["sample"], expected["sample"])


@pytest.fixture(scope="module")
def graphed_engine(weights_root):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(GRAPHS_ENV, "on")
        engine = load_engine(weights_root, "sd-turbo")
        engine.warm_up()
    return engine


def test_setup_captures_every_hot_module_at_every_batch_size(graphed_engine):
    modules = graphed_engine.graphs.modules
    assert {"text_encoder", "unet", "vae_decoder", "tiny_vae_decoder", "nsfw_classifier", "safety_checker"} <= set(
        modules
    )
    sizes = graphed_engine.graphs.plan.sizes
    assert sizes == batch_sizes(variants.VARIANTS["sd-turbo"].max_batch_images)
    for name in ("unet", "tiny_vae_decoder", "nsfw_classifier"):
        assert sorted(s.batch for s in modules[name].captured()) == list(sizes), name
    assert [s.batch for s in modules["text_encoder"].captured()] == [1]  # one prompt of 77 tokens at a time
    assert [s.batch for s in modules["vae_decoder"].captured()] == [1]  # the full VAE decodes one image at a time


def test_padded_batches_give_each_request_the_images_it_gets_alone(graphed_engine):
    engine = graphed_engine
    unet = engine.graphs.modules["unet"]
    together = [
        engine.validate(prompt="a kite", seed=40, num_outputs=2, **SMALL),
        engine.validate(prompt="a lighthouse", seed=7, **SMALL),
    ]
    replays, eager = unet.replays, unet.eager_calls
    first, second = engine.generate_batch(together)  # 3 images: the graphs of 4
    assert (unet.replays, unet.eager_calls) == (replays + 1, eager)
    assert 3 not in {s.batch for s in unet.captured()}
    alone = [engine.generate(engine.validate(prompt="a kite", seed=40 + i, **SMALL)).images[0] for i in range(2)]
    alone.append(engine.generate(engine.validate(prompt="a lighthouse", seed=7, **SMALL)).images[0])
    for got, expected in zip([*first.images, *second.images], alone, strict=True):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_graphed_images_are_the_eager_engines_images(graphed_engine, weights_root):
    eager = load_engine(weights_root, "sd-turbo")
    assert not eager.graphs.active and "forward" not in vars(eager.pipelines.text_to_image.unet)
    for raw in (dict(num_outputs=3, vae="tiny"), dict(num_outputs=1, vae="full")):
        graphed_images = graphed_engine.generate(graphed_engine.validate(prompt="a kite", seed=3, **raw, **SMALL))
        eager_images = eager.generate(eager.validate(prompt="a kite", seed=3, **raw, **SMALL))
        for got, expected in zip(graphed_images.images, eager_images.images, strict=True):
            assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_a_size_seen_repeatedly_is_captured_when_the_engine_is_idle(graphed_engine):
    engine = graphed_engine
    unet = engine.graphs.modules["unet"]
    odd = dict(width=72, height=64)
    for seed in range(engine.graphs.plan.capture_after):
        engine.generate(engine.validate(prompt="a kite", seed=seed, **odd))
    pending = [(name, signature.describe()) for name, signature in engine.graphs.plan.pending]
    assert ("unet", "1x4x8x9, scalar, 1x77x1024") in pending
    while engine.between_requests():
        pass
    replays = unet.replays
    engine.generate(engine.validate(prompt="a kite", seed=9, **odd))
    assert unet.replays == replays + 1


def test_a_call_for_a_users_lora_runs_eagerly(graphed_engine):
    graphs = graphed_engine.graphs
    unet = graphs.modules["unet"]
    graphs.use(False)  # what generate_batch does for a request with lora_weights
    try:
        replays = unet.replays
        graphed_engine.pipelines.text_to_image(prompt="x", num_inference_steps=1, guidance_scale=0, **SMALL)
        assert unet.replays == replays
    finally:
        graphs.use(True)


def test_with_graphs_each_pipeline_answers_its_device_at_once_and_keeps_its_class(graphed_engine):
    for pipeline in graphed_engine.pipelines.by_key.values():
        original = type(pipeline)._fastsd_original
        assert type(pipeline).__name__ == original.__name__ and isinstance(pipeline, original)
        # The answer diffusers computes by walking every module, given without the walk.
        assert pipeline._execution_device == original._execution_device.fget(pipeline) == torch.device("cpu")
        assert pipeline.device == original.device.fget(pipeline)
    assert not postprocess.gpu_jpeg()  # no CUDA: Pillow encodes jpg


def user_lora_active(unet) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) and not module.disable_adapters for module in unet.modules())


def test_a_capture_after_a_lora_request_holds_no_lora(graphed_engine, weights_root, tmp_path, monkeypatch):
    from fastsd.loras.references import Rules
    from fastsd_testing.user_loras import FileServer, write_user_lora

    engine, unet = graphed_engine, graphed_engine.graphs.modules["unet"]
    rules = Rules(tmp_path / "lora-cache", allow_private=True)  # loopback LoRAs, a cache of its own
    monkeypatch.setattr(engine, "served", replace(engine.served, lora_rules=rules))
    model = weights_root / "weights" / engine.variant.model
    lora = write_user_lora(model, tmp_path / "style.safetensors", convolutions=False)
    odd = dict(width=64, height=80)  # captured at no size yet: queued after a few requests
    plain = [engine.generate(engine.validate(prompt="a kite", seed=0, **odd)).images[0]]
    plain += [engine.generate(engine.validate(prompt="a kite", seed=s, **odd)).images[0] for s in range(1, 3)]
    assert "unet" in [name for name, _ in engine.graphs.plan.pending]
    with FileServer({"/style.safetensors": lora.read_bytes()}) as files:
        raw = dict(prompt="a kite", seed=0, lora_weights=files.url("/style.safetensors"), **odd)
        styled = engine.generate(engine.validate(**raw)).images[0]
    pipeline_unet = engine.pipelines.text_to_image.unet
    assert user_lora_active(pipeline_unet)  # right after the LoRA request, its adapter still set
    while engine.between_requests():
        assert not user_lora_active(pipeline_unet)  # the CPU's stand-in would not show it in the pixels
    replays = unet.replays
    again = engine.generate(engine.validate(prompt="a kite", seed=0, **odd)).images[0]
    assert unet.replays == replays + 1
    assert np.abs(np.asarray(styled, dtype=int) - np.asarray(plain[0], dtype=int)).max() > 2  # the LoRA shows
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(plain[0], dtype=int)).max() <= 1


def test_graphs_off_installs_nothing(weights_root, monkeypatch):
    monkeypatch.setenv(GRAPHS_ENV, "off")
    engine = load_engine(weights_root, "sd-turbo")
    assert engine.graphs.summary() == {} and engine.graphs.setup_sizes == (1,)
    assert "forward" not in vars(engine.pipelines.text_to_image.unet)
    assert not hasattr(type(engine.pipelines.text_to_image), "_fastsd_original")
    assert Graphs.off().between_requests() is False


def test_device_frames_are_exactly_diffusers_pil_images():
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 40, 24, generator=generator)
    pixels[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 0.0, 1.0])  # halves round to even, both ways
    frames = postprocess.to_frames(postprocess.as_uint8(pixels))
    expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(pixels))
    assert frames.on_device is None  # a CPU: nothing kept for nvJPEG
    for got, want in zip(frames.images, expected, strict=True):
        assert got.size == (24, 40) and np.array_equal(np.asarray(got), np.asarray(want))


def test_jpeg_from_uint8_frames_decodes_to_the_image():
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64))], -1)
    frames = torch.from_numpy(image.round().astype(np.uint8)).permute(2, 0, 1)[None]
    (encoded,) = postprocess.encode_jpeg(frames, quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), dtype=int)
    assert encoded[:2] == b"\xff\xd8" and np.abs(decoded - image.round()).mean() < 2


@pytest.fixture(scope="module")
def graphed_server(weights_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "graphs-on.log"
    environment = {"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root), GRAPHS_ENV: "on"}
    yield from ready_server(environment, log_path)


def test_through_the_server_a_padded_batch_gives_each_image_its_seed(graphed_server):
    batched = output_pixels(graphed_server.predict(prompt="a kite", seed=40, num_outputs=3, **SMALL))
    for index, pixels in enumerate(batched):
        alone = output_pixels(graphed_server.predict(prompt="a kite", seed=40 + index, **SMALL))[0]
        assert np.abs(pixels - alone).max() <= 2  # WebP of near-identical images
    assert "graphs: the eager stand-in (no CUDA)" in graphed_server.log_path.read_text()


def test_an_invalid_graphs_setting_fails_setup_with_one_sentence(weights_root, tmp_path):
    environment = {"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root), GRAPHS_ENV: "always"}
    server = CogServer(environment, tmp_path / "server.log")
    try:
        state = server.wait_for_setup()
        assert state["status"] == "SETUP_FAILED"
        text = state["setup"]["logs"] + server.log_path.read_text()
        assert "FASTSD_GRAPHS='always' is not allowed; write on or off (or 1/0, true/false, yes/no)." in text
        assert "loaded sd-turbo" not in text  # before any weights load
    finally:
        server.stop()


@pytest.mark.slow
def test_regional_compilation_compiles_the_repeated_blocks_inside_the_graphs(weights_root, monkeypatch, tmp_path):
    """FASTSD_COMPILE=regional: the UNet's transformer blocks only (compile_repeated_blocks), with the
    graphs around them; the same image as eager."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    request = dict(prompt="a compiled cat", seed=2, **SMALL)
    eager = load_engine(weights_root, "sd-turbo")
    expected = np.asarray(eager.generate(eager.validate(**request)).images[0], dtype=int)
    monkeypatch.setenv("FASTSD_COMPILE", "regional")
    monkeypatch.setenv(GRAPHS_ENV, "on")
    compiled = load_engine(weights_root, "sd-turbo")
    unet = compiled.pipelines.text_to_image.unet
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert unet._compiled_call_impl is None and compiled.pipelines.text_to_image.vae.decoder._compiled_call_impl is None
    with compiled.graphs.capturing():  # what the warm-up does at each served size
        captured = np.asarray(compiled.generate(compiled.validate(**request)).images[0], dtype=int)
    replays = compiled.graphs.modules["unet"].replays
    replayed = np.asarray(compiled.generate(compiled.validate(**request)).images[0], dtype=int)
    assert compiled.graphs.modules["unet"].replays == replays + 1
    assert np.abs(captured - expected).max() <= 2 and np.abs(replayed - expected).max() <= 2


@pytest.mark.parametrize("name", ["sd15", "lcm-dreamshaper"])
def test_guided_and_guidance_embedding_variants_pad_and_match_eager(weights_root, monkeypatch, name):
    """sd15 guides (the UNet's batch is twice the images: 3 images run in the graph of 8), the
    distilled LCM embeds its guidance (timestep_cond): both give the eager images, batched."""
    eager = load_engine(weights_root, name)
    monkeypatch.setenv(GRAPHS_ENV, "on")
    graphed = load_engine(weights_root, name)
    graphed.warm_up()
    unet = graphed.graphs.modules["unet"]
    request = dict(prompt="a kite", negative_prompt="fog", seed=4, num_outputs=3, num_inference_steps=2, **SMALL)
    replays, eager_calls = unet.replays, unet.eager_calls
    got = graphed.generate(graphed.validate(**request)).images
    assert unet.replays > replays and unet.eager_calls == eager_calls  # every step replayed a graph
    assert 3 * (1 + graphed.validate(**request).uses_guidance) not in {s.batch for s in unet.captured()}
    expected = eager.generate(eager.validate(**request)).images
    for image, reference in zip(got, expected, strict=True):
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1
