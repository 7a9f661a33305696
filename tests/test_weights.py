"""Weights on disk: manifests checked at boot, the weights tar fetched at start, packing, baking.

Everything runs offline: the weights tar is served from a local HTTP server on 127.0.0.1 that
can honour or ignore Range requests, drop connections midway, or serve damaged archives.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import re
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from fastsd import variants
from fastsd.engine import Engine
from fastsd.errors import ConfigurationError
from fastsd.settings import Settings
from fastsd.weights import fetch, layout, manifest, provision
from fastsd_testing.helpers import PROJECT_ROOT, current_root, dockerignore_excludes, script_module
from fastsd_testing.loopback import LoopbackServer, reply

pack_weights = script_module("scripts/pack_weights.py")
select_variant = script_module("scripts/select_variant.py")

SD_TURBO = variants.VARIANTS["sd-turbo"]
SD15_LCM = variants.VARIANTS["sd15-lcm"]
SD15_LCM_LORA = next(source for source in layout.sources(SD15_LCM) if source.role == layout.LORA)


def copy_variant(source_root: Path, variant, root: Path) -> Path:
    """A private copy of a variant's tiny model folders (the session's shared root stays intact)."""
    for source in layout.sources(variant):
        folder = source_root / source.relative_folder
        if folder.is_dir():
            shutil.copytree(folder, root / source.relative_folder, dirs_exist_ok=True)
    return root


@pytest.fixture
def root(tmp_path, weights_root, monkeypatch) -> Path:
    """A weights root holding sd-turbo and sd15-lcm (model + LoRA), tiny, without manifests."""
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    mine = tmp_path / "root"
    for variant in (SD_TURBO, SD15_LCM):
        copy_variant(weights_root, variant, mine)
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(mine))
    return mine


def add_manifest(folder: Path) -> dict:
    files = manifest.describe_local(folder)
    manifest.write(folder, files, repo="test")
    return files


# --- the manifest check at boot -----------------------------------------------------------------


def test_folder_without_manifest_loads_and_says_so(root, caplog):
    from fastsd.engine import Engine

    caplog.set_level(logging.INFO, logger="fastsd.weights.provision")
    provision._logged_unverified.clear()
    provision.ensure_weights(SD_TURBO, Settings.from_environment())
    engine = Engine.load(SD_TURBO, Settings.from_environment())
    assert engine.pipelines.text_to_image is not None
    assert f"{layout.model_folder(current_root(), SD_TURBO.model)} has no .fastsd-manifest.json" in caplog.text


def test_a_truncated_file_in_a_folder_without_manifest_fails_setup_naming_it(root):
    unet = layout.model_folder(current_root(), SD_TURBO.model) / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    with open(unet, "r+b") as file:
        file.truncate(unet.stat().st_size // 2)
    with pytest.raises(
        provision.WeightsMissing,
        match=re.escape(str(unet)) + r" \(\d+ bytes, expected \d+ from its "
        r"header\).*python scripts/download_weights.py sd-turbo",
    ):
        provision.require_weights(SD_TURBO, current_root())


def test_a_mangled_header_or_missing_component_weights_fail_setup_without_manifest(root):
    vae = layout.model_folder(current_root(), SD_TURBO.model) / "vae"
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(provision.WeightsMissing, match="unreadable safetensors header"):
        provision.require_weights(SD_TURBO, current_root())
    for file in vae.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(provision.WeightsMissing, match=re.escape(str(vae)) + r" \(missing: no .safetensors weights\)"):
        provision.require_weights(SD_TURBO, current_root())


def test_complete_folder_with_manifest_passes(root):
    for folder in {source.folder(current_root()) for source in layout.sources(SD15_LCM)}:
        if folder.is_dir():
            add_manifest(folder)
    provision.ensure_weights(SD15_LCM, Settings.from_environment())  # no error


def test_truncated_file_fails_setup_naming_it_and_the_fetch_command(root):
    folder = layout.model_folder(current_root(), SD_TURBO.model)
    add_manifest(folder)
    unet = sorted((folder / "unet").glob("*.safetensors"))[0]
    size = unet.stat().st_size
    with open(unet, "r+b") as stream:
        stream.truncate(size // 2)
    with pytest.raises(provision.WeightsMissing) as raised:
        provision.ensure_weights(SD_TURBO, Settings.from_environment())
    message = str(raised.value)
    assert f"{unet} ({size // 2} bytes, expected {size})" in message
    assert "python scripts/download_weights.py sd-turbo" in message
    assert "\n" not in message


def test_missing_file_listed_in_manifest_fails_setup(root):
    folder = SD15_LCM_LORA.folder(current_root())
    add_manifest(folder)
    provision.require_weights(SD15_LCM, current_root())
    (folder / SD15_LCM_LORA.filename).rename(folder / "moved-away")
    with pytest.raises(provision.WeightsMissing, match="missing") as raised:
        provision.require_weights(SD15_LCM, current_root())
    assert SD15_LCM_LORA.filename in str(raised.value)
    assert "python scripts/download_weights.py sd15-lcm" in str(raised.value)


def test_missing_config_file_named_by_manifest(root):
    folder = layout.model_folder(current_root(), SD_TURBO.model)
    add_manifest(folder)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(provision.WeightsMissing, match=re.escape(str(folder / "unet" / "config.json") + " (missing)")):
        provision.require_weights(SD_TURBO, current_root())


def test_verify_catches_a_changed_byte_that_the_size_check_cannot(root):
    folder = SD15_LCM_LORA.folder(current_root())
    add_manifest(folder)
    path = folder / SD15_LCM_LORA.filename
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert manifest.check(folder) == []
    assert [str(p) for p in manifest.verify(folder)] == [f"{path} (sha256 differs)"]


def test_unreadable_manifest_is_reported_not_a_traceback(root):
    folder = layout.model_folder(current_root(), SD_TURBO.model)
    manifest.manifest_path(folder).write_text("{not json")
    with pytest.raises(provision.WeightsMissing, match="not a valid fastsd manifest"):
        provision.require_weights(SD_TURBO, current_root())


def test_missing_weights_without_url_and_without_hub_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(tmp_path))
    monkeypatch.delenv(provision.WEIGHTS_URL_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(provision.WeightsMissing) as raised:
        provision.ensure_weights(SD_TURBO, Settings.from_environment())
    message = str(raised.value)
    assert message.startswith("Weights for variant sd-turbo are missing:")
    assert "python scripts/download_weights.py sd-turbo" in message and "FASTSD_WEIGHTS_URL" in message
    assert "cannot be reached" in message


def test_hub_not_asked_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(provision.WEIGHTS_URL_ENV, raising=False)
    with pytest.raises(provision.WeightsMissing, match="HF_HUB_OFFLINE is set"):
        provision.ensure_weights(SD_TURBO, Settings.from_environment())


# --- a local HTTP server for the weights tar ----------------------------------------------------


class TarServer(LoopbackServer):
    """Serves one payload at /weights.tar on 127.0.0.1, with single-range Range support.

    drop: how many responses cut off after half their body (then the connection closes);
    ranges: False to ignore Range headers (answer 200 with everything).
    """

    def __init__(self, payload: bytes, *, ranges: bool = True, drop: int = 0, status: int = 200):
        self.payload, self.ranges, self.drop, self.status = payload, ranges, drop, status
        self.requests: list[str | None] = []  # the Range header of each GET
        self.lock = threading.Lock()
        super().__init__()
        self.url = f"{self.root}/weights.tar?signature=secret"

    def respond(self, handler, send_body: bool) -> None:
        requested = handler.headers.get("Range")
        with self.lock:
            self.requests.append(requested)
            cut = self.drop > 0
            self.drop -= cut
        if self.status != 200 or handler.path.split("?")[0] != "/weights.tar":
            reply(handler, self.status if self.status != 200 else 404)
            return
        data = self.payload
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested or "")
        if self.ranges and match:
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            status, body = 206, data[start : end + 1]
            headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
        else:
            status, body, headers = 200, data, {}
        headers["Accept-Ranges"] = "bytes" if self.ranges else "none"
        if not cut:
            reply(handler, status, body, headers)
            return
        reply(handler, status, body, headers, send_body=False)
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(2)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 KiB and quick retries, so that a tiny model's tar takes many range requests."""
    monkeypatch.setattr(fetch, "CHUNK_SIZE", 64 * 1024)
    monkeypatch.setattr(fetch, "WORKERS", 4)
    monkeypatch.setenv("FASTSD_NO_PGET", "1")


@pytest.fixture
def sd_turbo_tar(root, tmp_path) -> bytes:
    out = tmp_path / "sd-turbo.tar"
    pack_weights.pack(SD_TURBO, current_root(), out, report=lambda line: None)
    return out.read_bytes()


def test_a_tar_holds_the_checkers_but_not_the_rest_of_their_repo_and_can_leave_them_out(sd_turbo_tar, root, tmp_path):
    """The classic checker lives in the SD1.5 repo, which this root also holds whole (sd15-lcm)."""
    names = tarfile.open(fileobj=io.BytesIO(sd_turbo_tar)).getnames()
    sd15 = f"weights/{variants.SAFETY_CHECKER_REPO}/"
    assert f"{sd15}safety_checker/config.json" in names
    assert f"{sd15}feature_extractor/preprocessor_config.json" in names
    assert f"weights/{variants.NSFW_CLASSIFIER_REPO}/model.safetensors" in names
    assert not [name for name in names if name.startswith(f"{sd15}unet/") or name == f"{sd15}model_index.json"]
    unchecked = tmp_path / "unchecked.tar"
    pack_weights.pack(SD_TURBO.with_safety_checker(False), current_root(), unchecked, report=lambda line: None)
    names = tarfile.open(unchecked).getnames()
    assert not [name for name in names if name.startswith((sd15, f"weights/{variants.NSFW_CLASSIFIER_REPO}"))]


def empty_root(tmp_path, monkeypatch) -> Path:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(fresh))
    return fresh


@pytest.mark.slow
def test_setup_fetches_a_missing_variant_from_the_tar_with_parallel_range_requests(
    sd_turbo_tar, small_chunks, tmp_path, monkeypatch, caplog
):
    from fastsd.engine import Engine

    fresh = empty_root(tmp_path, monkeypatch)
    caplog.set_level(logging.INFO, logger="fastsd.weights.provision")
    with TarServer(sd_turbo_tar) as server:
        provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    ranges = [r for r in server.requests if r]
    assert len(ranges) == len(server.requests) >= len(sd_turbo_tar) // (64 * 1024)
    assert "bytes=0-65535" in ranges
    folder = fresh / "weights" / SD_TURBO.model
    assert manifest.load(folder) is not None and manifest.check(folder) == []
    assert not list(fresh.glob(".fastsd-incoming-*"))
    assert "secret" not in caplog.text  # the signed URL's query stays out of the logs
    Engine.load(SD_TURBO, Settings.from_environment())


@pytest.mark.slow
def test_weights_url_from_the_environment(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    fresh = empty_root(tmp_path, monkeypatch)
    with TarServer(sd_turbo_tar) as server:
        monkeypatch.setenv(provision.WEIGHTS_URL_ENV, server.url)
        provision.ensure_weights(SD_TURBO, Settings.from_environment())
    assert (fresh / "weights" / SD_TURBO.model / "model_index.json").is_file()


@pytest.mark.slow
def test_a_dropped_connection_resumes_from_the_byte_it_reached(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    fresh = empty_root(tmp_path, monkeypatch)
    with TarServer(sd_turbo_tar, drop=3) as server:
        provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    # A resumed request starts inside a chunk, not at a multiple of the chunk size.
    starts = [int(re.match(r"bytes=(\d+)-", r)[1]) for r in server.requests]
    assert any(start % (64 * 1024) for start in starts)
    assert manifest.check(fresh / "weights" / SD_TURBO.model) == []


def test_a_connection_that_keeps_dropping_fails_clearly_and_leaves_nothing(
    sd_turbo_tar, small_chunks, tmp_path, monkeypatch
):
    fresh = empty_root(tmp_path, monkeypatch)
    monkeypatch.setattr(fetch, "ATTEMPTS", 2)
    with TarServer(sd_turbo_tar, drop=10_000) as server:
        with pytest.raises(fetch.ArchiveError, match=r"failed at byte \d+ after 2 attempts") as raised:
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    assert "secret" not in str(raised.value)
    assert list(fresh.iterdir()) == []


def test_a_server_without_range_support_is_read_as_one_stream(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    fresh = empty_root(tmp_path, monkeypatch)
    with TarServer(sd_turbo_tar, ranges=False) as server:
        provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    assert len(server.requests) == 1
    assert manifest.check(fresh / "weights" / SD_TURBO.model) == []


def test_a_dropped_connection_without_range_support_is_a_clear_error(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    empty_root(tmp_path, monkeypatch)
    with TarServer(sd_turbo_tar, ranges=False, drop=1) as server:
        with pytest.raises(ConfigurationError, match="cannot resume|damaged"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)


def test_http_error_is_one_sentence(small_chunks, tmp_path, monkeypatch):
    empty_root(tmp_path, monkeypatch)
    with TarServer(b"", status=403) as server:
        with pytest.raises(fetch.ArchiveError, match=r"answered HTTP 403 .*signed URL may have expired"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)


def test_a_corrupt_archive_is_refused(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    fresh = empty_root(tmp_path, monkeypatch)
    damaged = bytearray(sd_turbo_tar)
    damaged[100:400] = b"\x07" * 300  # inside the first member's header: its checksum fails
    with TarServer(bytes(damaged)) as server:
        with pytest.raises(fetch.ArchiveError, match="damaged or not a tar"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    with TarServer(b"this is not a tar at all" * 1000) as server:
        with pytest.raises(fetch.ArchiveError, match="damaged or not a tar"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    assert list(fresh.iterdir()) == []


@pytest.mark.slow
def test_a_truncated_archive_is_refused(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    empty_root(tmp_path, monkeypatch)
    with TarServer(sd_turbo_tar[: len(sd_turbo_tar) // 2]) as server:
        with pytest.raises(fetch.ArchiveError, match="damaged or not a tar"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.slow
def test_a_file_of_the_wrong_size_in_the_tar_is_refused(root, small_chunks, tmp_path, monkeypatch):
    folder = layout.model_folder(current_root(), SD_TURBO.model)
    files = add_manifest(folder)
    members = []
    for name in sorted(files):
        data = (folder / name).read_bytes()
        if name == "unet/config.json":
            data = data[:-10]
        members.append(_file(f"weights/{SD_TURBO.model}/{name}", data))
    members.append(
        _file(f"weights/{SD_TURBO.model}/{manifest.MANIFEST_NAME}", manifest.manifest_path(folder).read_bytes())
    )
    fresh = empty_root(tmp_path, monkeypatch)
    with TarServer(_tar(members)) as server:
        with pytest.raises(
            fetch.ArchiveError,
            match=r"does not match its manifest: .*unet/config.json \(\d+ bytes, "
            r"expected \d+\)",
        ):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize("name", ["../escaped", "weights/../../escaped", "/tmp/escaped", "weights/a/../../../escaped"])
def test_path_traversal_is_refused(name, small_chunks, tmp_path, monkeypatch):
    fresh = empty_root(tmp_path, monkeypatch)
    payload = _tar([_file(f"weights/{SD_TURBO.model}/model_index.json", b"{}"), _file(name, b"owned")])
    with TarServer(payload) as server:
        with pytest.raises(fetch.ArchiveError, match="leads outside its folder"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    assert list(fresh.iterdir()) == []


def test_links_and_members_outside_weights_are_refused(small_chunks, tmp_path, monkeypatch):
    empty_root(tmp_path, monkeypatch)
    link = tarfile.TarInfo(f"weights/{SD_TURBO.model}/model_index.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with TarServer(_tar([(link, None)])) as server:
        with pytest.raises(fetch.ArchiveError, match="a link"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)
    with TarServer(_tar([_file("predict.py", b"print('replaced')")])) as server:
        with pytest.raises(fetch.ArchiveError, match="outside weights/ and lora/"):
            provision.ensure_weights(SD_TURBO, Settings.from_environment(), server.url)


@pytest.mark.slow
def test_a_tar_for_another_variant_is_refused(sd_turbo_tar, small_chunks, tmp_path, monkeypatch):
    empty_root(tmp_path, monkeypatch)
    with TarServer(sd_turbo_tar) as server:
        with pytest.raises(fetch.ArchiveError, match="it was packed for another variant"):
            provision.ensure_weights(SD15_LCM, Settings.from_environment(), server.url)


def test_a_local_tar_path_works_too(sd_turbo_tar, tmp_path, monkeypatch):
    fresh = empty_root(tmp_path, monkeypatch)
    path = tmp_path / "local.tar"
    path.write_bytes(sd_turbo_tar)
    provision.ensure_weights(SD_TURBO, Settings.from_environment(), str(path))
    assert manifest.check(fresh / "weights" / SD_TURBO.model) == []


def test_pget_is_used_when_on_path_and_its_output_is_checked(sd_turbo_tar, tmp_path, monkeypatch):
    """A stand-in pget (unpacks with tar, as the real one does) proves the command line and that
    what it unpacked passes the same checks: a link it let through is refused."""
    fresh = empty_root(tmp_path, monkeypatch)
    monkeypatch.delenv("FASTSD_NO_PGET", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "pget-args"
    (bin_dir / "pget").write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {record}\n'
        '[ "$1" = "-x" ] || exit 2\n'
        'mkdir -p "$3" && tar -xf "$SOURCE_TAR" -C "$3" && [ -z "$ADD_LINK" ] || ln -s /etc "$3/weights/link"\n'
    )
    (bin_dir / "pget").chmod(0o755)
    archive = tmp_path / "served.tar"
    archive.write_bytes(sd_turbo_tar)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SOURCE_TAR", str(archive))
    provision.ensure_weights(SD_TURBO, Settings.from_environment(), "https://example.invalid/sd-turbo.tar")
    assert record.read_text().split()[:2] == ["-x", "https://example.invalid/sd-turbo.tar"]
    assert manifest.check(fresh / "weights" / SD_TURBO.model) == []

    shutil.rmtree(fresh / "weights")
    monkeypatch.setenv("ADD_LINK", "1")
    with pytest.raises(fetch.ArchiveError, match="a link or special file"):
        provision.ensure_weights(SD_TURBO, Settings.from_environment(), "https://example.invalid/sd-turbo.tar")


# --- packing ------------------------------------------------------------------------------------


def test_pack_writes_a_manifest_for_a_folder_without_one(root, tmp_path):
    out = tmp_path / "out.tar"
    pack_weights.pack(SD15_LCM, current_root(), out, report=lambda line: None)
    with tarfile.open(out) as archive:
        names = archive.getnames()
        model_manifest = json.load(archive.extractfile(f"weights/{SD15_LCM.model}/{manifest.MANIFEST_NAME}"))
    folder = layout.model_folder(current_root(), SD15_LCM.model)
    assert set(model_manifest["files"]) == set(manifest.local_files(folder))
    unet = next(n for n in model_manifest["files"] if n.startswith("unet/") and n.endswith(".safetensors"))
    assert model_manifest["files"][unet]["sha256"] == manifest.sha256_of(folder / unet)
    assert f"lora/{SD15_LCM_LORA.repo}/{SD15_LCM_LORA.filename}" in names
    assert all(n.startswith(("weights/", "lora/")) for n in names)
    assert not manifest.manifest_path(folder).exists()  # the folder itself is left as it was


def test_pack_keeps_to_the_manifest_and_refuses_a_damaged_folder(root, tmp_path):
    folder = SD15_LCM_LORA.folder(current_root())
    add_manifest(folder)
    (folder / "notes.txt").write_text("not listed in the manifest")
    out = tmp_path / "out.tar"
    pack_weights.pack(SD15_LCM, current_root(), out, report=lambda line: None)
    with tarfile.open(out) as archive:
        assert f"lora/{SD15_LCM_LORA.repo}/notes.txt" not in archive.getnames()
    with open(folder / SD15_LCM_LORA.filename, "r+b") as stream:
        stream.truncate(10)
    with pytest.raises(ConfigurationError, match="does not match its manifest"):
        pack_weights.pack(SD15_LCM, current_root(), out, report=lambda line: None)


def test_pack_takes_only_what_the_preset_loads_from_shared_folders(weights_root, tmp_path, monkeypatch):
    """hyper-sdxl takes one LoRA out of ByteDance/Hyper-SD (whose folder also holds the SD1.5 one)
    and replaces the SDXL base's VAE: the tar holds neither the other LoRA nor the base's VAE
    weights, its manifests list only what it holds, and a fresh root set up from it boots."""
    hyper_sdxl = variants.VARIANTS["hyper-sdxl"]
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    out = tmp_path / "hyper-sdxl.tar"
    pack_weights.pack(hyper_sdxl, current_root(), out, report=lambda line: None)
    with tarfile.open(out) as archive:
        names = archive.getnames()
        lora_manifest = json.load(archive.extractfile(f"lora/ByteDance/Hyper-SD/{manifest.MANIFEST_NAME}"))
    assert "lora/ByteDance/Hyper-SD/Hyper-SDXL-1step-lora.safetensors" in names
    assert "lora/ByteDance/Hyper-SD/Hyper-SD15-1step-lora.safetensors" not in names
    assert list(lora_manifest["files"]) == ["Hyper-SDXL-1step-lora.safetensors"]
    base = f"weights/{hyper_sdxl.model}"
    assert f"{base}/vae/config.json" in names
    assert not [name for name in names if name.startswith(f"{base}/vae/") and name.endswith(".safetensors")]
    fresh = empty_root(tmp_path, monkeypatch)
    provision.ensure_weights(hyper_sdxl, Settings.from_environment(), str(out))
    assert (fresh / "lora" / "ByteDance" / "Hyper-SD" / "Hyper-SDXL-1step-lora.safetensors").is_file()


# --- baking one variant into an image -----------------------------------------------------------


def test_select_variant_writes_dockerignore_and_cog_yaml(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    cog_yaml = (PROJECT_ROOT / "cog.yaml").read_text()
    (project / "cog.yaml").write_text(cog_yaml)
    assert select_variant.main(["sdxl-lcm", "--project", str(project)]) == 0
    written = (project / "cog.yaml").read_text()
    assert "  - FASTSD_VARIANT=sdxl-lcm\n" in written
    assert written.replace("FASTSD_VARIANT=sdxl-lcm", "FASTSD_VARIANT=X") == re.sub(
        r"FASTSD_VARIANT=[^\s]+", "FASTSD_VARIANT=X", cog_yaml
    )  # nothing else changed

    patterns = [
        line for line in (project / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    ]
    kept = [
        "predict.py",
        "fastsd/engine.py",
        "cog.yaml",
        "requirements.txt",
        "weights/stabilityai/stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.fp16.safetensors",
        "weights/madebyollin/sdxl-vae-fp16-fix/config.json",
        "lora/latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors",
        "weights/madebyollin/taesdxl/config.json",
    ]
    left_out = [
        ".git/config",
        ".venv/bin/python",
        "tests/test_weights.py",
        "fastsd/__pycache__/x.pyc",
        "weights/stabilityai/sd-turbo/model_index.json",
        "lora/latent-consistency/lcm-lora-sdv1-5/x",
        "weights/stabilityai/stable-diffusion-xl-base-1.0/.cache/huggingface/download/x.metadata",
        "weights/madebyollin/taesd/config.json",
        "sd-turbo.tar",
        ".fastsd-incoming-abc/weights/x",
    ]
    assert [p for p in kept if dockerignore_excludes(patterns, p)] == []
    assert [p for p in left_out if not dockerignore_excludes(patterns, p)] == []


def test_select_variant_bakes_the_safety_checkers_unless_told_not_to(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "cog.yaml").write_text((PROJECT_ROOT / "cog.yaml").read_text())
    checker = f"weights/{variants.SAFETY_CHECKER_REPO}/safety_checker/model.fp16.safetensors"
    classifier = f"weights/{variants.NSFW_CLASSIFIER_REPO}/model.safetensors"
    sd15_unet = f"weights/{variants.SAFETY_CHECKER_REPO}/unet/diffusion_pytorch_model.fp16.safetensors"

    def patterns() -> list[str]:
        lines = (project / ".dockerignore").read_text().splitlines()
        return [line for line in lines if line and not line.startswith("#")]

    assert select_variant.main(["sd-turbo", "--project", str(project)]) == 0
    assert "  - FASTSD_SAFETY_CHECKER=on\n" in (project / "cog.yaml").read_text()
    assert not dockerignore_excludes(patterns(), checker) and not dockerignore_excludes(patterns(), classifier)
    assert dockerignore_excludes(patterns(), sd15_unet)  # the rest of the SD1.5 repo stays out
    assert select_variant.main(["sd-turbo", "--no-safety-checker", "--project", str(project)]) == 0
    assert "  - FASTSD_SAFETY_CHECKER=off\n" in (project / "cog.yaml").read_text()
    assert dockerignore_excludes(patterns(), checker) and dockerignore_excludes(patterns(), classifier)


def test_select_variant_bakes_only_the_files_a_preset_takes_from_shared_folders(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "cog.yaml").write_text((PROJECT_ROOT / "cog.yaml").read_text())
    assert select_variant.main(["hyper-sdxl", "--project", str(project)]) == 0
    patterns = [
        line for line in (project / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    ]
    base = "weights/stabilityai/stable-diffusion-xl-base-1.0"
    kept = [
        "lora/ByteDance/Hyper-SD/Hyper-SDXL-1step-lora.safetensors",
        "lora/ByteDance/Hyper-SD/.fastsd-manifest.json",
        f"{base}/unet/diffusion_pytorch_model.fp16.safetensors",
        f"{base}/vae/config.json",
        "weights/madebyollin/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors",
    ]
    left_out = [
        "lora/ByteDance/Hyper-SD/Hyper-SD15-1step-lora.safetensors",
        f"{base}/vae/diffusion_pytorch_model.fp16.safetensors",
        "weights/ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
        "lora/h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors",
    ]
    assert [p for p in kept if dockerignore_excludes(patterns, p)] == []
    assert [p for p in left_out if not dockerignore_excludes(patterns, p)] == []


def test_select_variant_refuses_an_unknown_variant_or_a_cog_yaml_without_the_line(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "cog.yaml").write_text("build:\n  gpu: true\n")
    assert select_variant.main(["sd-turbo", "--project", str(project)]) == 1
    assert "no `  - FASTSD_VARIANT=...` line" in capsys.readouterr().err
    assert select_variant.main(["nope", "--project", str(project)]) == 1
    assert "not a known variant" in capsys.readouterr().err
    assert not (project / ".dockerignore").exists()


def test_committed_dockerignore_is_the_one_for_the_default_variant(monkeypatch):
    kept = select_variant.kept_paths(layout.sources(SD_TURBO))
    assert f"!weights/{SD_TURBO.model}/**" in kept
    assert (PROJECT_ROOT / ".dockerignore").read_text() == select_variant.dockerignore_text("sd-turbo", kept)
    assert "FASTSD_VARIANT=sd-turbo" in (PROJECT_ROOT / "cog.yaml").read_text()


def test_fnmatch_is_not_used_by_the_selection_escape():
    # allow_patterns are fnmatch patterns: a file name with [ must only match itself.
    from fastsd.weights.download import _escape_glob

    assert fnmatch.fnmatch("a[1].json", _escape_glob("a[1].json"))
    assert not fnmatch.fnmatch("a1.json", _escape_glob("a[1].json"))


def test_a_custom_model_is_fetched_from_the_tar_before_its_configs_are_read(root, tmp_path, monkeypatch):
    """FASTSD_MODEL=<hub id>: the engine must fetch the folder before custom_variant reads it."""
    shutil.copytree(layout.model_folder(current_root(), SD15_LCM.model), root / "weights" / "someone" / "custom-sd15")
    out = tmp_path / "custom.tar"
    assert pack_weights.main(["custom", str(out), "--model", "someone/custom-sd15"]) == 0
    fresh = empty_root(tmp_path, monkeypatch)
    monkeypatch.setenv("FASTSD_MODEL", "someone/custom-sd15")
    monkeypatch.setenv("FASTSD_ACCELERATION", "lcm-lora")
    variant = Engine.from_settings(Settings.from_environment(), weights_url=str(out)).variant  # what setup() does
    assert variant.recipe.loras == SD15_LCM.recipe.loras
    assert (fresh / SD15_LCM_LORA.relative_folder / SD15_LCM_LORA.filename).is_file()  # came along, optional
    provision.ensure_weights(variant, Settings.from_environment(), str(out))  # nothing left to fetch
    assert manifest.check(fresh / "weights" / "someone" / "custom-sd15") == []


def test_a_custom_model_without_tar_or_hub_is_one_clear_error(tmp_path, monkeypatch):
    empty_root(tmp_path, monkeypatch)
    monkeypatch.delenv(provision.WEIGHTS_URL_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(
        provision.WeightsMissing,
        match=r"python scripts/download_weights.py --model someone/x, .*cannot be reached",
    ):
        provision.ensure_model_folder("someone/x", Settings.from_environment())
    monkeypatch.setenv("FASTSD_ACCELERATION", "tcd")  # one named is passed on
    with pytest.raises(provision.WeightsMissing, match=r"--model someone/x --acceleration tcd, "):
        provision.ensure_model_folder("someone/x", Settings.from_environment())
