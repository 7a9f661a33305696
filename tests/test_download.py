"""The hub download: which files each repo contributes, and failing fast and clearly offline.

The repos' file lists are recorded data (tests/data/hub_repos.json), as the hub lists them, so the
selection is tested without the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsd import variants
from fastsd.settings import Settings
from fastsd.weights import download, layout, provision
from fastsd_testing.loopback import LoopbackServer, reply

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


# Each repo's model_index.json (where it has one) and its file list as the hub lists them: root
# single-file checkpoints, .bin/.ckpt pickles, ONNX, Flax and OpenVINO exports, safety checkers
# and images included. Recorded once; the selection is tested against them without the network.
REPOS = json.loads((Path(__file__).parent / "data" / "hub_repos.json").read_text())

SD_FP16 = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    *files_in("tokenizer", TOKENIZER),
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]
SDXL_FP16 = sorted(
    [
        *SD_FP16,
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        *files_in("tokenizer_2", TOKENIZER),
    ]
)
AUTOENCODER = ["config.json", "diffusion_pytorch_model.safetensors"]
TRANSFORMER_REPOS = tuple(variants.VARIANTS[name].model for name in ("flux2-klein", "z-image-turbo", "flux-schnell"))


def transformer_files(repo: str) -> list[str]:
    """model_index.json and everything in the component folders the index lists."""
    components = {name for name, spec in REPOS[repo]["index"].items() if isinstance(spec, list)}
    return ["model_index.json", *(name for name in REPOS[repo]["files"] if name.split("/")[0] in components)]


EXPECTED = {
    "stabilityai/sd-turbo": ("model", SD_FP16),
    "stabilityai/sdxl-turbo": ("model", SDXL_FP16),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("model", SD_FP16),
    "stabilityai/stable-diffusion-xl-base-1.0": ("model", SDXL_FP16),
    # No fp16 files at all: the full-precision safetensors, never the .bin copies.
    "SimianLuo/LCM_Dreamshaper_v7": (
        "model",
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            *files_in("tokenizer", TOKENIZER),
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ],
    ),
    "madebyollin/sdxl-vae-fp16-fix": ("vae", AUTOENCODER),
    "madebyollin/taesd": ("tiny_vae", AUTOENCODER),
    "madebyollin/taesdxl": ("tiny_vae", AUTOENCODER),
    "latent-consistency/lcm-lora-sdv1-5": ("lora", ["pytorch_lora_weights.safetensors"]),
    "latent-consistency/lcm-lora-sdxl": ("lora", ["pytorch_lora_weights.safetensors"]),
    **{
        repo: ("controlnet", ["config.json", "diffusion_pytorch_model.fp16.safetensors"])
        for repo in (
            "lllyasviel/control_v11p_sd15_canny",
            "lllyasviel/control_v11f1p_sd15_depth",
            "diffusers/controlnet-canny-sdxl-1.0",
            "diffusers/controlnet-depth-sdxl-1.0",
        )
    },
    # FLUX.1's union ControlNet: one file, bf16 (the images of its card are not fetched).
    variants.FLUX1_UNION_CONTROLNET: ("controlnet", ["config.json", "diffusion_pytorch_model.safetensors"]),
    # The transformers: every component folder (shards and their index, the chat template, T5's
    # spiece.model), never the original single-file checkpoints at the root.
    **{repo: ("model", transformer_files(repo)) for repo in TRANSFORMER_REPOS},
    "madebyollin/taef1": ("tiny_vae", AUTOENCODER),
    "fal/FLUX.2-Tiny-AutoEncoder": ("tiny_vae", AUTOENCODER),
    # Published only as a pickle: fetched, then converted to safetensors (fetch_source).
    **{
        repo: ("controlnet", ["config.json", "diffusion_pytorch_model.bin"])
        for repo in ("thibaud/controlnet-sd21-canny-diffusers", "thibaud/controlnet-sd21-depth-diffusers")
    },
}


# Roles of a repo that is also a model (the SD1.5 repo holds the classic checker): by (role, repo).
CHECKERS = {
    (layout.SAFETY_CHECKER, variants.SAFETY_CHECKER_REPO): [
        "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json",
        "safety_checker/model.fp16.safetensors",
    ],
    (layout.NSFW_CLASSIFIER, variants.NSFW_CLASSIFIER_REPO): [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ],
}


def selected(source: layout.Source) -> list[str]:
    repo = REPOS[source.repo]
    return download.select_files(
        source.role, repo["files"], repo.get("index"), filename=source.filename, skip=source.skip
    )


@pytest.mark.parametrize("hub_id", sorted(EXPECTED))
def test_selection_is_exactly_what_the_pipeline_loads(hub_id):
    role, expected = EXPECTED[hub_id]
    assert selected(layout.Source(role, hub_id)) == sorted(expected)


def test_a_single_file_controlnet_fetches_its_checkpoint_and_the_config_its_loader_reads():
    """Z-Image's union ControlNet: one checkpoint of a repo holding two versions, and the config
    diffusers' single-file loader reads for it (from its own conversion repo), once for both names."""
    zimage = variants.VARIANTS["z-image-turbo"].with_controlnets(("canny", "depth"))
    found = [(source.repo, selected(source)) for source in layout.sources(zimage) if source.role == layout.CONTROLNET]
    assert found == [
        (variants.ZIMAGE_UNION_CONTROLNET, ["Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"]),
        ("hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1", ["config.json"]),
    ]


@pytest.mark.parametrize("role, repo", sorted(CHECKERS))
def test_the_checkers_are_fetched_without_pickles_or_exports(role, repo):
    assert selected(layout.Source(role, repo)) == CHECKERS[role, repo]


def test_a_full_precision_deployment_fetches_the_full_precision_checker():
    files = REPOS[variants.SAFETY_CHECKER_REPO]["files"]
    chosen = download.select_files(layout.SAFETY_CHECKER, files, precision="full")
    assert "safety_checker/model.safetensors" in chosen and "safety_checker/model.fp16.safetensors" not in chosen


def test_a_repo_that_is_not_the_classifier_is_named():
    with pytest.raises(download.WeightsDownloadError, match="preprocessor_config.json"):
        download.select_files(layout.NSFW_CLASSIFIER, ["config.json", "model.safetensors"])


def every_source() -> set[layout.Source]:
    """Every source of every preset, and the acceleration files of every custom acceleration."""
    found = {
        source
        for variant in variants.VARIANTS.values()
        for source in layout.sources(variant.with_controlnets(variant.controlnet_choices()))
    }
    for recipe in variants.all_recipes():
        found |= {layout.Source(layout.LORA, lora.file.repo, lora.file.filename) for lora in recipe.loras}
    return found


def test_every_source_is_covered_by_the_recorded_repos():
    for source in every_source():
        assert source.repo in REPOS, source
        if (source.role, source.repo) in CHECKERS:
            assert selected(source) == CHECKERS[source.role, source.repo]
        elif source.filename:  # one file of a repo of many: that file, nothing else
            assert selected(source) == [source.filename]
        else:
            assert EXPECTED[source.repo][0] == source.role


def test_a_preset_that_replaces_the_base_vae_or_unet_does_not_fetch_them():
    sdxl_lcm = layout.sources(variants.VARIANTS["sdxl-lcm"])[0]
    assert selected(sdxl_lcm) == [name for name in SDXL_FP16 if name != "vae/diffusion_pytorch_model.fp16.safetensors"]
    lightning = layout.sources(variants.VARIANTS["sdxl-lightning"])[0]
    assert selected(lightning) == [
        name
        for name in SDXL_FP16
        if name not in ("vae/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors")
    ]
    assert "unet/config.json" in selected(lightning)  # the Lightning UNet's config is the base's


def test_a_file_missing_from_its_repo_is_named():
    with pytest.raises(download.WeightsDownloadError, match="no sdxl_lightning_3step_unet.safetensors"):
        download.select_files(
            "unet", REPOS["ByteDance/SDXL-Lightning"]["files"], filename="sdxl_lightning_3step_unet.safetensors"
        )


def test_full_precision_everywhere_when_one_component_lacks_fp16():
    # pipelines.weights_variant loads fp16 only when every component has it: match that.
    files = [*REPOS["stabilityai/sd-turbo"]["files"]]
    files.remove("vae/diffusion_pytorch_model.fp16.safetensors")
    selected = download.select_files("model", files, REPOS["stabilityai/sd-turbo"]["index"])
    assert [f for f in selected if f.endswith(".safetensors")] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_sharded_weights_come_with_their_index():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    assert download.select_files("model", files, index("StableDiffusionPipeline", "unet")) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]


@pytest.mark.parametrize(
    "role, files, message",
    [
        ("lora", ["README.md", "lora.safetensors"], "no pytorch_lora_weights.safetensors"),
        ("vae", ["sdxl_vae.safetensors", "config.json"], "no diffusion_pytorch_model.safetensors"),
        ("model", ["sd_turbo.safetensors"], "no model_index.json"),
    ],
)
def test_a_repo_of_the_wrong_kind_is_named(role, files, message):
    with pytest.raises(download.WeightsDownloadError, match=message):
        download.select_files(role, files, {} if role == "model" else None)


# --- the command, without the network -----------------------------------------------------------


def run_command(*args: str, env: dict[str, str] | None = None, root: Path) -> tuple[subprocess.CompletedProcess, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environment.update(env or {})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "download_weights.py"), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
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
    assert "sd-turbo" in done.stdout and "missing" in done.stdout and "stabilityai/sd-turbo," in done.stdout
    assert "ByteDance/Hyper-SD/Hyper-SDXL-1step-lora.safetensors" in done.stdout


class FakeHub(LoopbackServer):
    """Answers model_info the way the hub does for a gated repo, a missing one, or a bad token."""

    ANSWERS = {
        "/api/models/org/gated": (401, "GatedRepo"),
        "/api/models/org/missing": (404, "RepoNotFound"),
        "/api/models/org/forbidden": (403, None),
        "/api/models/org/broken": (500, None),
    }

    def __init__(self):
        super().__init__()
        self.url = self.root

    def respond(self, handler, send_body: bool) -> None:
        status, code = self.ANSWERS.get(handler.path.split("?")[0], (404, "RepoNotFound"))
        headers = {"Content-Type": "application/json", **({"X-Error-Code": code} if code else {})}
        reply(handler, status, json.dumps({"error": "no"}).encode(), headers, send_body)


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.mark.parametrize(
    "repo, message",
    [
        ("org/gated", "org/gated is gated: accept its conditions at http://127.0.0.1:"),
        ("org/missing", "org/missing was not found on the hub"),
        ("org/forbidden", "The hub refused org/forbidden (HTTP 403): HF_TOKEN is missing, wrong or lacks access"),
    ],
)
def test_gated_missing_and_forbidden_repos_are_one_sentence(repo, message, fake_hub, tmp_path):
    done, seconds = run_command("--model", repo, env={"HF_ENDPOINT": fake_hub.url}, root=tmp_path)
    assert done.returncode == 1 and seconds < 10
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


# --- a whole download, from a stand-in hub on loopback ------------------------------------------


class LocalHub(LoopbackServer):
    """Serves folders as hub repos, the way huggingface_hub reads them: model_info with file
    metadata, the recursive tree listing, HEAD and GET (with Range) on /resolve/. Extra files
    (root checkpoints, pickles) are added to each repo to prove they are not fetched."""

    SHA = "0123456789abcdef0123456789abcdef01234567"
    EXTRA = {
        "sd_turbo.safetensors": b"x" * 3000,
        "unet/diffusion_pytorch_model.bin": b"p" * 2000,
        "README.md": b"# readme\n",
    }

    def __init__(self, repos: dict[str, Path]):
        import hashlib

        self.files: dict[str, dict[str, bytes]] = {}
        for repo, folder in repos.items():
            contents = {
                p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*"))
                if p.is_file() and ".cache" not in p.parts and not p.name.startswith(".fastsd")
            }
            if (folder / "model_index.json").is_file():
                contents.update(self.EXTRA)
            self.files[repo] = contents
        self.gets: list[str] = []

        def entry(data: bytes, lfs: bool) -> dict:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            sha256 = hashlib.sha256(data).hexdigest()
            return dict(blob=blob, sha256=sha256, lfs=lfs)

        self.meta = {
            repo: {name: entry(data, name.endswith((".safetensors", ".bin"))) for name, data in files.items()}
            for repo, files in self.files.items()
        }
        super().__init__()
        self.url = self.root

    def respond(self, handler, send_body: bool) -> None:
        path = handler.path.split("?")[0]
        if path.startswith("/api/models/"):
            self._model_info(handler, path[len("/api/models/") :])
            return
        marker = f"/resolve/{self.SHA}/"
        if marker not in path:
            reply(handler, 404, send_body=send_body)
            return
        repo, name = path.split(marker, 1)
        repo = repo.lstrip("/")
        data = self.files.get(repo, {}).get(name)
        if data is None:
            reply(handler, 404, headers={"X-Error-Code": "EntryNotFound"}, send_body=send_body)
            return
        entry = self.meta[repo][name]
        headers = {"X-Repo-Commit": self.SHA, "ETag": f'"{entry["sha256"] if entry["lfs"] else entry["blob"]}"'}
        if send_body:
            self.gets.append(f"{repo}/{name}")
        requested = handler.headers.get("Range")
        if requested and send_body:
            start = int(requested.split("=")[1].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            reply(handler, 206, data[start:], headers)
            return
        reply(handler, 200, data, headers, send_body)

    def _model_info(self, handler, rest: str) -> None:
        """model_info with file metadata, or the recursive tree listing."""
        repo = (rest.partition("/tree/")[0] if "/tree/" in rest else rest).split("/revision/")[0]
        if repo not in self.files:
            reply(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"})
            return
        listed = []
        for name, entry in self.meta[repo].items():
            size = len(self.files[repo][name])
            if "/tree/" in rest:
                lfs = {"lfs": dict(oid=entry["sha256"], size=size, pointerSize=134)} if entry["lfs"] else {}
                listed.append(dict(type="file", path=name, size=size, oid=entry["blob"], **lfs))
            else:
                lfs = {"lfs": dict(sha256=entry["sha256"], size=size, pointerSize=134)} if entry["lfs"] else {}
                listed.append(dict(rfilename=name, size=size, blobId=entry["blob"], **lfs))
        body = listed if "/tree/" in rest else dict(id=repo, modelId=repo, sha=self.SHA, siblings=listed)
        reply(handler, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_download_fetches_exactly_the_selection_writes_manifests_and_repairs(weights_root, tmp_path):
    variant = variants.VARIANTS["sd-turbo"]
    repos = {source.repo: weights_root / source.relative_folder for source in layout.sources(variant)}
    hub = LocalHub(repos)
    try:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
        done, _ = run_command("sd-turbo", env=env, root=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr

        model = tmp_path / "weights" / variant.model
        listed = json.loads((model / ".fastsd-manifest.json").read_text())
        expected = download.select_files(
            "model", hub.files[variant.model], json.loads(hub.files[variant.model]["model_index.json"])
        )
        assert sorted(listed["files"]) == expected
        assert all(name.endswith(".fp16.safetensors") for name in expected if name.endswith(".safetensors"))
        assert listed["revision"] == LocalHub.SHA
        assert listed["files"]["unet/config.json"]["git_sha1"] == hub.meta[variant.model]["unet/config.json"]["blob"]
        assert not any(name.endswith(("sd_turbo.safetensors", ".bin", "README.md")) for name in hub.gets)
        on_disk = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file() and ".cache" not in p.parts}
        assert on_disk == {*expected, ".fastsd-manifest.json"}
        assert (tmp_path / "weights" / variant.tiny_vae / ".fastsd-manifest.json").is_file()
        for checker in (variants.SAFETY_CHECKER_REPO, variants.NSFW_CLASSIFIER_REPO):  # fetched for every variant
            assert (tmp_path / "weights" / checker / ".fastsd-manifest.json").is_file()
        assert "4 sources," in done.stdout, done.stdout

        # A second run checks and fetches nothing.
        fetched = len(hub.gets)
        done, _ = run_command("sd-turbo", env=env, root=tmp_path)
        assert done.returncode == 0 and "already there" in done.stdout and len(hub.gets) == fetched

        # A truncated file fails the boot check, and the same command fetches it again.
        unet = model / "unet" / "diffusion_pytorch_model.fp16.safetensors"
        with open(unet, "r+b") as stream:
            stream.truncate(100)
        with pytest.raises(provision.WeightsMissing, match="damaged"):
            with_root(tmp_path, provision.require_weights, variant)
        done, _ = run_command("sd-turbo", env=env, root=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"{variant.model}/unet/diffusion_pytorch_model.fp16.safetensors" in hub.gets[fetched:]
        with_root(tmp_path, provision.require_weights, variant)
    finally:
        hub.close()


def with_root(root: Path, function, *args):
    """function(*args) on this weights root: the root, or settings naming it, as the function takes."""
    settings = Settings.from_environment(weights_root=root)
    return function(*args, root if function is provision.require_weights else settings)


def test_full_precision_on_request():
    repo = REPOS["stabilityai/sd-turbo"]
    selected = download.select_files("model", repo["files"], repo["index"], precision="full")
    assert [f for f in selected if f.endswith(".safetensors")] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_presets_sharing_a_repo_fetch_only_their_files_into_one_folder(weights_root, tmp_path):
    """hyper-sd15 and hyper-sdxl take one LoRA each out of ByteDance/Hyper-SD: each run fetches its
    own file, and the folder's manifest keeps both. hyper-sdxl replaces the SDXL base's VAE: the
    base's VAE weights are not fetched."""
    chosen = [variants.VARIANTS["hyper-sd15"], variants.VARIANTS["hyper-sdxl"]]
    repos = {source.repo: weights_root / source.relative_folder for v in chosen for source in layout.sources(v)}
    hub = LocalHub(repos)
    try:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
        hyper = tmp_path / "lora" / "ByteDance" / "Hyper-SD"
        done, _ = run_command("hyper-sd15", env=env, root=tmp_path)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in hyper.iterdir() if p.is_file()) == [
            ".fastsd-manifest.json",
            "Hyper-SD15-1step-lora.safetensors",
        ]
        done, _ = run_command("hyper-sdxl", env=env, root=tmp_path)
        assert done.returncode == 0, done.stderr
        listed = json.loads((hyper / ".fastsd-manifest.json").read_text())
        assert sorted(listed["files"]) == ["Hyper-SD15-1step-lora.safetensors", "Hyper-SDXL-1step-lora.safetensors"]
        base = tmp_path / "weights" / "stabilityai" / "stable-diffusion-xl-base-1.0"
        assert (base / "vae" / "config.json").is_file() and not list((base / "vae").glob("*.safetensors"))
        for variant in chosen:  # both boot
            with_root(tmp_path, provision.require_weights, variant)
    finally:
        hub.close()


def test_a_controlnet_published_as_a_pickle_is_converted_once_and_never_unpickled_when_serving(tmp_path, monkeypatch):
    """The SD 2.1 ControlNets come as diffusion_pytorch_model.bin only: the download converts it
    (torch.load with weights_only) to safetensors, records the source's hash, removes the pickle;
    a second run converts nothing; setup loads the safetensors."""
    from fastsd_testing import random_models

    repo = "thibaud/controlnet-sd21-canny-diffusers"
    published = tmp_path / "published"
    random_models.build_controlnet_repo(repo, published, hub_layout=True)
    assert (published / "weights" / repo / "diffusion_pytorch_model.bin").is_file()
    sd_turbo = variants.VARIANTS["sd-turbo"].with_controlnets(("canny",))
    hub = LocalHub({repo: published / "weights" / repo})
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        root = tmp_path / "root"
        source = next(s for s in layout.sources(sd_turbo) if s.role == layout.CONTROLNET)
        with_root(root, download.fetch_source, source)
        folder = root / "weights" / repo
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
            ".fastsd-manifest.json",
            "config.json",
            "diffusion_pytorch_model.safetensors",
        ]
        listed = json.loads((folder / ".fastsd-manifest.json").read_text())
        converted = listed["files"]["diffusion_pytorch_model.safetensors"]
        pickled = hub.meta[repo]["diffusion_pytorch_model.bin"]["sha256"]
        assert converted["converted_from"] == {
            "file": "diffusion_pytorch_model.bin",
            "size": len(hub.files[repo]["diffusion_pytorch_model.bin"]),
            "sha256": pickled,
        }
        fetched = len(hub.gets)
        assert with_root(root, download.fetch_source, source).already_there
        assert len(hub.gets) == fetched
        import torch

        from fastsd import pipelines
        from fastsd.families import family_of

        family = family_of(sd_turbo.architecture)
        controlnet = pipelines._load_controlnets(sd_turbo, family, torch.float32, root, "cpu")["canny"]
        assert controlnet.dtype == torch.float32  # loaded from the safetensors: no pickle is left to read
    finally:
        hub.close()


def test_the_transformers_fetch_their_folders_not_the_single_file_checkpoints_or_remote_code():
    schnell = selected(layout.Source(layout.MODEL, "black-forest-labs/FLUX.1-schnell"))
    assert "flux1-schnell.safetensors" not in schnell and "ae.safetensors" not in schnell
    assert {"tokenizer_2/spiece.model", "transformer/diffusion_pytorch_model.safetensors.index.json"} <= set(schnell)
    klein = selected(layout.Source(layout.MODEL, "black-forest-labs/FLUX.2-klein-4B"))
    assert "flux-2-klein-4b.safetensors" not in klein and "tokenizer/chat_template.jinja" in klein
    assert selected(layout.Source(layout.TINY_VAE, "fal/FLUX.2-Tiny-AutoEncoder")) == AUTOENCODER  # not its .py
