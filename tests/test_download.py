"""The hub download: which files each repo contributes, and failing fast and clearly offline.

The repos' file lists below are written down as data, as the hub lists them (root single-file
checkpoints, .bin/.ckpt pickles, ONNX, Flax and OpenVINO exports, safety checkers and images
included), so the selection is tested without the network.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastsd import download, variants, weights

PROJECT_ROOT = Path(__file__).resolve().parent.parent

TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def files_in(folder: str, names: list[str]) -> list[str]:
    return [f"{folder}/{name}" for name in names]


def index(pipeline: str, *components: str, unloaded=("safety_checker", "feature_extractor")) -> dict:
    """A model_index.json: the components it lists, plus ones that are null."""
    entry = {"_class_name": pipeline, "_diffusers_version": "0.24.0"}
    for name in components:
        entry[name] = ["diffusers", "SomeClass"]
    for name in unloaded:
        entry.setdefault(name, [None, None])
    return entry


SD_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
SDXL_COMPONENTS = (*SD_COMPONENTS, "text_encoder_2", "tokenizer_2")

REPOS = {
    "stabilityai/sd-turbo": dict(
        index=index("StableDiffusionPipeline", *SD_COMPONENTS),
        files=[
            ".gitattributes", "README.md", "LICENSE.md", "image_quality_one_step.png", "output_tile.jpg",
            "prompt_alignment_one_step.png", "sd_turbo.safetensors", "model_index.json",
            "scheduler/scheduler_config.json",
            *files_in("text_encoder", ["config.json", "model.fp16.safetensors", "model.safetensors"]),
            *files_in("tokenizer", TOKENIZER),
            *files_in("unet", ["config.json", "diffusion_pytorch_model.fp16.safetensors",
                               "diffusion_pytorch_model.safetensors"]),
            *files_in("vae", ["config.json", "diffusion_pytorch_model.fp16.safetensors",
                              "diffusion_pytorch_model.safetensors"]),
        ],
    ),
    "stabilityai/sdxl-turbo": dict(
        index=index("StableDiffusionXLPipeline", *SDXL_COMPONENTS, unloaded=()),
        files=[
            ".gitattributes", "README.md", "LICENSE.md", "image_quality_one_step.png", "output_tile.jpg",
            "prompt_alignment_one_step.png", "sd_xl_turbo_1.0.safetensors", "sd_xl_turbo_1.0_fp16.safetensors",
            "model_index.json", "scheduler/scheduler_config.json",
            *files_in("text_encoder", ["config.json", "model.fp16.safetensors", "model.safetensors"]),
            *files_in("text_encoder_2", ["config.json", "model.fp16.safetensors", "model.safetensors"]),
            *files_in("tokenizer", TOKENIZER), *files_in("tokenizer_2", TOKENIZER),
            *files_in("unet", ["config.json", "diffusion_pytorch_model.fp16.safetensors",
                               "diffusion_pytorch_model.safetensors"]),
            *files_in("vae", ["config.json", "diffusion_pytorch_model.fp16.safetensors",
                              "diffusion_pytorch_model.safetensors"]),
        ],
    ),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(
        index=index("StableDiffusionPipeline", *SD_COMPONENTS, "safety_checker", "feature_extractor", unloaded=()),
        files=[
            ".gitattributes", "README.md", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors",
            "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-inference.yaml", "model_index.json",
            "feature_extractor/preprocessor_config.json",
            *files_in("safety_checker", ["config.json", "flax_model.msgpack", "model.fp16.safetensors",
                                         "model.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"]),
            "scheduler/scheduler_config.json",
            *files_in("text_encoder", ["config.json", "flax_model.msgpack", "model.fp16.safetensors",
                                       "model.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"]),
            *files_in("tokenizer", TOKENIZER),
            *files_in("unet", ["config.json", "diffusion_flax_model.msgpack", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.safetensors",
                               "diffusion_pytorch_model.non_ema.bin", "diffusion_pytorch_model.non_ema.safetensors",
                               "diffusion_pytorch_model.safetensors"]),
            *files_in("vae", ["config.json", "diffusion_flax_model.msgpack", "diffusion_pytorch_model.bin",
                              "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.safetensors",
                              "diffusion_pytorch_model.safetensors"]),
        ],
    ),
    "stabilityai/stable-diffusion-xl-base-1.0": dict(
        index=index("StableDiffusionXLPipeline", *SDXL_COMPONENTS, unloaded=()),
        files=[
            ".gitattributes", "01.png", "comparison.png", "pipeline.png", "LICENSE.md", "README.md",
            "model_index.json", "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
            "sd_xl_offset_example-lora_1.0.safetensors", "scheduler/scheduler_config.json",
            *files_in("text_encoder", ["config.json", "flax_model.msgpack", "model.fp16.safetensors", "model.onnx",
                                       "model.safetensors", "openvino_model.bin", "openvino_model.xml"]),
            *files_in("text_encoder_2", ["config.json", "flax_model.msgpack", "model.fp16.safetensors",
                                         "model.onnx", "model.onnx_data", "model.safetensors",
                                         "openvino_model.bin", "openvino_model.xml"]),
            *files_in("tokenizer", TOKENIZER), *files_in("tokenizer_2", TOKENIZER),
            *files_in("unet", ["config.json", "diffusion_flax_model.msgpack",
                               "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
                               "model.onnx", "model.onnx_data", "openvino_model.bin", "openvino_model.xml"]),
            *files_in("vae", ["config.json", "diffusion_flax_model.msgpack",
                              "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]),
            *files_in("vae_1_0", ["config.json", "diffusion_pytorch_model.fp16.safetensors",
                                  "diffusion_pytorch_model.safetensors"]),
            *files_in("vae_decoder", ["config.json", "model.onnx", "openvino_model.bin", "openvino_model.xml"]),
            *files_in("vae_encoder", ["config.json", "model.onnx", "openvino_model.bin", "openvino_model.xml"]),
        ],
    ),
    "SimianLuo/LCM_Dreamshaper_v7": dict(
        index=index("LatentConsistencyModelPipeline", *SD_COMPONENTS, "safety_checker", "feature_extractor",
                    unloaded=()),
        files=[
            ".gitattributes", "README.md", "LCM_Dreamshaper_v7_4k.safetensors", "lcm_pipeline.py",
            "lcm_scheduler.py", "model_index.json", "feature_extractor/preprocessor_config.json",
            *files_in("safety_checker", ["config.json", "model.safetensors", "pytorch_model.bin"]),
            "scheduler/scheduler_config.json",
            *files_in("text_encoder", ["config.json", "model.safetensors", "pytorch_model.bin"]),
            *files_in("tokenizer", TOKENIZER),
            *files_in("unet", ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"]),
            *files_in("vae", ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"]),
        ],
    ),
    "madebyollin/sdxl-vae-fp16-fix": dict(files=[
        ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors", "sdxl.vae.safetensors", "sdxl_vae.safetensors",
        "images/activation-magnitudes.jpg",
    ]),
    "madebyollin/taesd": dict(files=[
        ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors", "taesd_decoder.pth", "taesd_encoder.pth",
    ]),
    "madebyollin/taesdxl": dict(files=[
        ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors", "taesdxl_decoder.pth", "taesdxl_encoder.pth",
    ]),
    "latent-consistency/lcm-lora-sdv1-5": dict(files=[
        ".gitattributes", "README.md", "image.png", "pytorch_lora_weights.safetensors",
    ]),
    "latent-consistency/lcm-lora-sdxl": dict(files=[
        ".gitattributes", "README.md", "image.png", "pytorch_lora_weights.safetensors",
    ]),
}

SD_FP16 = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors", *files_in("tokenizer", TOKENIZER), "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
]
SDXL_FP16 = sorted([
    *SD_FP16, "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors", *files_in("tokenizer_2", TOKENIZER),
])
AUTOENCODER = ["config.json", "diffusion_pytorch_model.safetensors"]

EXPECTED = {
    "stabilityai/sd-turbo": ("model", SD_FP16),
    "stabilityai/sdxl-turbo": ("model", SDXL_FP16),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("model", SD_FP16),
    "stabilityai/stable-diffusion-xl-base-1.0": ("model", SDXL_FP16),
    # No fp16 files at all: the full-precision safetensors, never the .bin copies.
    "SimianLuo/LCM_Dreamshaper_v7": ("model", [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", *files_in("tokenizer", TOKENIZER), "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]),
    "madebyollin/sdxl-vae-fp16-fix": ("vae", AUTOENCODER),
    "madebyollin/taesd": ("tiny_vae", AUTOENCODER),
    "madebyollin/taesdxl": ("tiny_vae", AUTOENCODER),
    "latent-consistency/lcm-lora-sdv1-5": ("lora", ["pytorch_lora_weights.safetensors"]),
    "latent-consistency/lcm-lora-sdxl": ("lora", ["pytorch_lora_weights.safetensors"]),
}


@pytest.mark.parametrize("hub_id", sorted(EXPECTED))
def test_selection_is_exactly_what_the_pipeline_loads(hub_id):
    role, expected = EXPECTED[hub_id]
    repo = REPOS[hub_id]
    assert download.select_files(role, repo["files"], repo.get("index")) == sorted(expected)


def test_every_repo_of_every_variant_is_covered_by_the_data():
    used = {(role, hub_id) for variant in variants.VARIANTS.values() for role, hub_id in weights.variant_repos(variant)}
    assert {hub_id for _, hub_id in used} <= set(EXPECTED)
    assert all(EXPECTED[hub_id][0] == role for role, hub_id in used)


def test_full_precision_everywhere_when_one_component_lacks_fp16():
    # pipelines.weights_variant loads fp16 only when every component has it: match that.
    files = [*REPOS["stabilityai/sd-turbo"]["files"]]
    files.remove("vae/diffusion_pytorch_model.fp16.safetensors")
    selected = download.select_files("model", files, REPOS["stabilityai/sd-turbo"]["index"])
    assert [f for f in selected if f.endswith(".safetensors")] == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]


def test_sharded_weights_come_with_their_index():
    files = ["model_index.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
             "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"]
    assert download.select_files("model", files, index("StableDiffusionPipeline", "unet")) == [
        "model_index.json", "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json"]


@pytest.mark.parametrize("role, files, message", [
    ("lora", ["README.md", "lora.safetensors"], "no pytorch_lora_weights.safetensors"),
    ("vae", ["sdxl_vae.safetensors", "config.json"], "no diffusion_pytorch_model.safetensors"),
    ("model", ["sd_turbo.safetensors"], "no model_index.json"),
])
def test_a_repo_of_the_wrong_kind_is_named(role, files, message):
    with pytest.raises(download.WeightsDownloadError, match=message):
        download.select_files(role, files, {} if role == "model" else None)


# --- the command, without the network -----------------------------------------------------------

def run_command(*args: str, env: dict[str, str] | None = None, root: Path) -> tuple[subprocess.CompletedProcess, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environment.update(env or {})
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "download_weights.py"), *args,
                           "--root", str(root)], capture_output=True, text=True, env=environment, timeout=60)
    return done, time.monotonic() - started


@pytest.mark.parametrize("args", [("sd-turbo",), ("sd15-lcm", "sdxl-turbo"), ("--model", "someone/custom-sd15")])
def test_unreachable_hub_fails_fast_with_one_sentence(args, tmp_path):
    done, seconds = run_command(*args, env={"HF_ENDPOINT": "http://127.0.0.1:9"}, root=tmp_path)
    assert done.returncode == 1
    assert seconds < 10
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The Hugging Face hub (http://127.0.0.1:9) cannot be reached")
    assert not list(tmp_path.rglob("*.safetensors"))


def test_unknown_variant_and_list_work_offline(tmp_path):
    done, _ = run_command("sd-turbbo", root=tmp_path)
    assert done.returncode == 1 and "not a known variant" in done.stderr and "Traceback" not in done.stderr
    done, _ = run_command("--list", root=tmp_path)
    assert done.returncode == 0
    assert "sd-turbo" in done.stdout and "missing" in done.stdout and "stabilityai/sd-turbo (model)" in done.stdout


class FakeHub:
    """Answers model_info the way the hub does for a gated repo, a missing one, or a bad token."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                answers = {
                    "/api/models/org/gated": (401, "GatedRepo"),
                    "/api/models/org/missing": (404, "RepoNotFound"),
                    "/api/models/org/forbidden": (403, None),
                    "/api/models/org/broken": (500, None),
                }
                status, code = answers.get(self.path.split("?")[0], (404, "RepoNotFound"))
                body = json.dumps({"error": "no"}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.mark.parametrize("repo, message", [
    ("org/gated", "org/gated is gated: accept its conditions at http://127.0.0.1:"),
    ("org/missing", "org/missing was not found on the hub"),
    ("org/forbidden", "The hub refused org/forbidden (HTTP 403): HF_TOKEN is missing, wrong or lacks access"),
])
def test_gated_missing_and_forbidden_repos_are_one_sentence(repo, message, fake_hub, tmp_path):
    done, seconds = run_command("--model", repo, env={"HF_ENDPOINT": fake_hub.url}, root=tmp_path)
    assert done.returncode == 1 and seconds < 10
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
