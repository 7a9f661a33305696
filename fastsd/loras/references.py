"""Per-request LoRAs: what a lora_weights reference points to, the files on disk, and their checks.

A reference is one of
- an https URL of a .safetensors file (Civitai, a Hugging Face `resolve` link, object storage);
- a Hugging Face repo id, `owner/name` (its one .safetensors file) or `owner/name/file.safetensors`;
- an https URL of a Replicate LoRA training output: a .tar holding lora.safetensors, and, where the
  training made new tokens, embeddings.pti with special_params.json (the tokens then work in the
  prompt, as on Replicate).

Files are fetched with fastsd.loras.remote (public https only, size cap, timeouts) into a size-capped
cache keyed by the reference, so a repeated request pays no download. Only safetensors are taken:
a pickle is refused by its first bytes, whatever its name, and never opened; a safetensors header
is checked before anything loads it. The LoRA's base architecture is read from its shapes (the
width of SD's cross-attention keys) or its layer names (the transformers'), so a LoRA for another
base fails with one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..errors import InputError
from ..settings import Settings
from ..variants import ARCHITECTURE_NAMES, FLUX1, FLUX2_KLEIN, SD2, SD15, SDXL, ZIMAGE
from . import remote


@dataclass(frozen=True)
class Rules:
    """What fetching a stranger's LoRA may take: the deployment's FASTSD_LORA_* settings."""

    cache: Path  # the cache folder
    max_bytes: int = 2048 * 2**20  # one file
    cache_bytes: int = 20 * 2**30  # the whole cache; the least recently used go first
    deadline_s: float = 300.0  # the whole download
    allow_private: bool = False  # FASTSD_ALLOW_PRIVATE_URLS (tests): any address, http too
    hub: str = "https://huggingface.co"  # where owner/name references are looked up

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            settings.lora_cache_folder,
            int(settings.lora_max_mb * 2**20),
            int(settings.lora_cache_gb * 2**30),
            settings.lora_timeout_s,
            settings.allow_private_urls,
            settings.hub,
        )


# The width of cross-attention keys (attn2.to_k's input) says which base a LoRA was made for.
_ARCHITECTURE_OF_WIDTH = {768: SD15, 1024: SD2, 2048: SDXL}
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80")  # torch's zip format, a raw pickle


@dataclass(frozen=True)
class LoraFile:
    name: str  # the input that named it: lora_weights or extra_lora
    reference: str  # what the request named
    path: Path  # the safetensors file in the cache
    digest: str  # sha256 of its content: one adapter per content, whatever the URL
    architecture: str | None  # None when its keys do not say
    text_encoder: bool  # it changes the text encoders too (so prompts encode differently)
    # Replicate trainings that made new tokens: the placeholder in prompts and the tokens it stands
    # for, renamed for this file ("TOK" -> "<s0><s1>" -> "<user_1a2b..._s0><user_1a2b..._s1>") so
    # that no other prompt or LoRA shares them; and the embeddings of those tokens.
    placeholders: dict[str, str] = field(default_factory=dict)
    embeddings: Path | None = None

    @property
    def adapter(self) -> str:
        return _adapter_name(self.digest)


def _adapter_name(digest: str) -> str:
    return f"user_{digest[:16]}"


_cache_lock = threading.Lock()
_fetching: dict[str, threading.Lock] = {}  # one download per reference; a second request waits for it
# Two downloads at a time: 16 requests naming 16 new LoRAs must not stage 16 x FASTSD_LORA_MAX_MB at once.
_downloads = threading.Semaphore(2)


def resolve(name: str, reference: str, rules: Rules) -> LoraFile:
    """The LoRA a request names, fetched (or found in the cache) and checked."""
    reference = reference.strip()
    if not reference:
        raise InputError(
            f"{name} is empty: give an https URL of a .safetensors file or a Hugging Face repo id.", field=name
        )
    if "://" in reference:
        # The URL rules before the cache: a file fetched where they were lifted (FASTSD_ALLOW_PRIVATE_URLS)
        # or while the host's addresses were public is served only if it could be fetched now.
        remote.check(name, reference, rules.allow_private)
    folder = rules.cache / hashlib.sha256(reference.encode()).hexdigest()[:32]
    with _cache_lock:
        fetching = _fetching.setdefault(folder.name, threading.Lock())
    try:
        with fetching:
            if not (folder / "ready.json").is_file():
                with _downloads:
                    _fetch_to_cache(name, reference, folder, rules)
            os.utime(folder)  # most recently used: the last to go when the cache is over its size
            return _describe(name, reference, folder)
    finally:
        with _cache_lock:  # strangers' references are endless: keep no lock nobody holds
            if not fetching.locked():
                _fetching.pop(folder.name, None)


def _fetch_to_cache(name: str, reference: str, folder: Path, rules: Rules) -> None:
    # A staging folder of its own: a partial download is never where a reader looks.
    staging = folder.with_name(f"{folder.name}.{uuid.uuid4().hex[:8]}.incoming")
    staging.mkdir(parents=True)
    try:
        _fetch_into(name, reference, staging, rules)
        with _cache_lock:
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _trim_cache(folder, rules)


def _fetch_into(name: str, reference: str, folder: Path, rules: Rules) -> None:
    if "://" in reference:
        # Civitai's download links name no file: what arrived decides (a tar or a safetensors file).
        download = remote.fetch(
            name,
            reference,
            folder / "download",
            rules.max_bytes,
            deadline_s=rules.deadline_s,
            allow_private=rules.allow_private,
        )
        if tarfile.is_tarfile(download):
            _unpack_training(name, download, folder, rules.max_bytes)
        else:
            download.rename(folder / "lora.safetensors")
    elif _is_repo_reference(reference):
        _fetch_from_hub(name, reference, folder, rules)
    else:
        raise InputError(
            f"{name} must be an https URL of a .safetensors file or a Hugging Face repo id (owner/name), "
            f"got {reference[:100]!r}.",
            field=name,
        )
    lora = folder / "lora.safetensors"
    check_safetensors(name, lora)
    (folder / "ready.json").write_text(json.dumps({"reference": reference, "sha256": _sha256(lora)}))


def _is_repo_reference(reference: str) -> bool:
    """owner/name or owner/name/path/file.safetensors, as the hub spells repo ids and paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = reference.split("/")
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts):
        return False
    try:
        validate_repo_id("/".join(parts[:2]))
    except HFValidationError:
        return False
    return all(re.fullmatch(r"[\w.\- ]+", part) for part in parts[2:])


def _fetch_from_hub(name: str, reference: str, folder: Path, rules: Rules) -> None:
    """owner/name (its one .safetensors file) or owner/name/path/to/file.safetensors.

    Through fastsd.loras.remote rather than huggingface_hub's downloader: the same size cap, deadline and
    address checks on every redirect (the hub sends files from its CDN), and no token is sent, so a
    stranger's request can never read the deployment's private or gated repos."""
    endpoint = rules.hub
    parts = reference.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not filename:
        missing = f"{name}: {repo} is not a public Hugging Face model repo."
        listing = remote.fetch(
            name,
            f"{endpoint}/api/models/{repo}",
            folder / "listing.json",
            16 * 2**20,
            not_found=missing,
            allow_private=rules.allow_private,
        )
        try:
            files = [s["rfilename"] for s in json.loads(listing.read_text()).get("siblings", [])]
        except (ValueError, AttributeError, KeyError, TypeError):
            raise InputError(f"{name}: the hub's answer for {repo} could not be read.", field=name) from None
        candidates = [f for f in files if f.endswith(".safetensors")]
        if len(candidates) != 1:
            found = ", ".join(candidates[:5]) or "none"
            raise InputError(
                f"{name}: {repo} holds {len(candidates)} .safetensors files ({found}); name one: {repo}/FILE.",
                field=name,
            )
        filename = candidates[0]
    if not filename.endswith(".safetensors"):
        raise InputError(
            f"{name} must name a .safetensors file; pickles (.bin, .pt, .ckpt) are never loaded.", field=name
        )
    url = f"{endpoint}/{repo}/resolve/main/{quote(filename)}"
    missing = f"{name}: {repo} is not a public Hugging Face model repo with a file {filename}."
    remote.fetch(
        name,
        url,
        folder / "lora.safetensors",
        rules.max_bytes,
        deadline_s=rules.deadline_s,
        not_found=missing,
        allow_private=rules.allow_private,
    )


def _unpack_training(name: str, archive: Path, folder: Path, max_bytes: int) -> None:
    """A Replicate training output: lora.safetensors, and embeddings.pti with special_params.json."""
    wanted = {"lora.safetensors", "embeddings.pti", "special_params.json"}
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if base in wanted and member.isfile() and member.size <= max_bytes:
                    source = tar.extractfile(member)
                    assert source is not None  # a file: it has a body
                    with open(folder / base, "wb") as out:
                        shutil.copyfileobj(source, out)
    except (tarfile.TarError, OSError):
        raise InputError(f"{name} is not a readable tar of a LoRA training.", field=name) from None
    finally:
        archive.unlink(missing_ok=True)
    if not (folder / "lora.safetensors").is_file():
        raise InputError(f"{name}: the tar holds no lora.safetensors.", field=name)
    if (folder / "embeddings.pti").is_file():
        check_safetensors(name, folder / "embeddings.pti")
    _rename_attention_processor_keys(name, folder / "lora.safetensors")


def _rename_attention_processor_keys(name: str, path: Path) -> None:
    """Replicate's SDXL trainer saves its UNet LoRA under attention-processor names
    (down_blocks...attn1.processor.to_q_lora.down.weight), which diffusers no longer loads as they
    are: renamed once, with diffusers' own mapping, to the peft names it loads (unet.<path>.to_q.lora_A)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file, save_file

    tensors = check_safetensors(name, path)
    if not any(".processor." in key and not key.startswith(("unet.", "text_encoder")) for key in tensors):
        return
    renamed = {f"unet.{key}": value for key, value in convert_unet_state_dict_to_peft(load_file(path)).items()}
    save_file(renamed, path)


def check_safetensors(name: str, path: Path) -> dict:
    """The file's safetensors header (name -> dtype, shape), after checking it is one: a pickle
    is refused by its first bytes and never opened further; a header must describe the file."""
    not_safetensors = InputError(f"{name} is not a safetensors file.", field=name)
    try:
        with open(path, "rb") as file:
            start = file.read(8)
            if start.startswith(_PICKLE_STARTS):
                raise InputError(
                    f"{name} is a pickle (a .bin, .pt or .ckpt file); only safetensors are loaded.", field=name
                )
            if len(start) < 8:
                raise not_safetensors
            (length,) = struct.unpack("<Q", start)
            if length > 100 * 2**20:
                raise not_safetensors
            header = json.loads(file.read(length))
        size = path.stat().st_size
    except InputError:
        raise
    except (OSError, ValueError):
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    try:
        end = max(int(value["data_offsets"][1]) for value in tensors.values()) if tensors else 0
        shapes_are_lists = all(isinstance(value["shape"], list) for value in tensors.values())
    except (TypeError, KeyError, IndexError, ValueError):
        raise not_safetensors from None
    if not tensors or not shapes_are_lists or 8 + length + end != size:
        raise InputError(f"{name} is not a complete safetensors file.", field=name)
    return tensors


def architecture_of(tensors: dict) -> str | None:
    """The architecture a LoRA was made for, in any key format: SD15, SD2 or SDXL from its
    cross-attention key width; the transformers from the layers they have (_transformer_of)."""
    for key, value in tensors.items():
        flat = key.replace(".", "_")
        if "attn2_to_k" in flat and ("lora_down" in flat or "lora_A" in flat) and len(value["shape"]) == 2:
            return _ARCHITECTURE_OF_WIDTH.get(value["shape"][1])
    return _transformer_of(tensors)


# Layer names that only one transformer has, as diffusers, peft, kohya and ComfyUI (BFL's names)
# spell them once dots become underscores. Z-Image: its refiners and SwiGLU w1/w2/w3, its "layers"
# with "attention". FLUX.2: SwiGLU linear_in/linear_out, the single blocks' fused projection, the
# shared modulation. FLUX.1: GELU's net.0, the per-block modulation norms, the single blocks' own
# to_q and proj_mlp (BFL: img_mod, txt_mod, modulation).
_ONLY_IN = (
    (ZIMAGE, re.compile(r"(context|noise)_refiner|feed_forward_w[123]|adaLN_modulation|(^|_)layers_\d+_attention")),
    (FLUX2_KLEIN, re.compile(r"ff(_context)?_linear_(in|out)|to_qkv_mlp_proj|stream_modulation")),
    (FLUX1, re.compile(r"ff(_context)?_net_[02]|norm1(_context)?_linear|proj_mlp|"
                       r"single_transformer_blocks_\d+_attn_to_q|(img|txt)_mod_lin|single_blocks_\d+_modulation")),
)  # fmt: skip
_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_")
_UNET = re.compile(r"(down|up)_blocks|mid_block|(input|output|middle)_blocks")


def _transformer_of(tensors: dict) -> str | None:
    """FLUX.1, FLUX.2 [klein] or Z-Image from a LoRA's layer names; for BFL-named FLUX files that
    name no such layer, from how much wider than the model a layer's output is (_WIDENING) or a
    block FLUX.2 [klein] does not have."""
    flat = [key.replace(".", "_") for key in tensors]
    if any(_UNET.search(key) for key in flat):
        return None  # a UNet's (SD's, whose feed-forward names FLUX.1 shares) without its cross-attention
    for architecture, names in _ONLY_IN:
        if any(names.search(key) for key in flat):
            return architecture
    for layer, by_ratio in _WIDENING.items():
        down = [v["shape"] for k, v in tensors.items() if layer.search(k.replace(".", "_")) and _is_down(k)]
        up = [v["shape"] for k, v in tensors.items() if layer.search(k.replace(".", "_")) and _is_up(k)]
        if down and up and len(down[0]) == 2 and len(up[0]) == 2 and down[0][1]:
            return by_ratio.get(up[0][0] / down[0][1])
    blocks = {(kind, int(index)) for key in flat for kind, index in _BLOCK.findall(key)}
    if any(kind == "double" and index > 7 or kind == "single" and index > 23 for kind, index in blocks):
        return FLUX1  # klein's largest (9B) has 8 double and 24 single blocks; FLUX.1 19 and 38
    return None


# BFL's names are FLUX.1's and FLUX.2's alike; their widths are not: a single block's first
# projection holds attention and a 4x GELU MLP in FLUX.1 (7 widths), attention and a 3x SwiGLU's
# two halves in FLUX.2 (9); a double block's first MLP layer is 4 widths in FLUX.1, 6 in FLUX.2.
_WIDENING = {
    re.compile(r"single_blocks_\d+_linear1"): {7.0: FLUX1, 9.0: FLUX2_KLEIN},
    re.compile(r"double_blocks_\d+_(img|txt)_mlp_0"): {4.0: FLUX1, 6.0: FLUX2_KLEIN},
}


def _is_down(key: str) -> bool:
    return "lora_A" in key or "lora_down" in key


def _is_up(key: str) -> bool:
    return "lora_B" in key or "lora_up" in key


def _describe(name: str, reference: str, folder: Path) -> LoraFile:
    lora = folder / "lora.safetensors"
    tensors = check_safetensors(name, lora)
    ready = json.loads((folder / "ready.json").read_text())
    placeholders = {}
    if (folder / "special_params.json").is_file():
        try:
            special = json.loads((folder / "special_params.json").read_text())
            placeholders = {str(k): str(v) for k, v in special.items()}
        except (ValueError, AttributeError):
            raise InputError(f"{name}: special_params.json in the tar could not be read.", field=name) from None
    adapter = _adapter_name(ready["sha256"])
    placeholders = {k: re.sub(r"<s(\d+)>", rf"<{adapter}_s\1>", v) for k, v in placeholders.items() if k}
    text_encoder = any(key.startswith(("lora_te", "text_encoder", "te_")) for key in tensors)
    embeddings = folder / "embeddings.pti"
    return LoraFile(
        name,
        reference,
        lora,
        ready["sha256"],
        architecture_of(tensors),
        text_encoder,
        placeholders,
        embeddings if embeddings.is_file() else None,
    )


def require_architecture(name: str, lora: LoraFile, architecture: str, served: str) -> None:
    if lora.architecture is not None and lora.architecture != architecture:
        model = ARCHITECTURE_NAMES[architecture]
        raise InputError(
            f"{name} is a LoRA for {ARCHITECTURE_NAMES[lora.architecture]} models; {served} is "
            f"{'an' if model.startswith('S') else 'a'} {model} model.",
            field=name,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _trim_cache(keep: Path, rules: Rules) -> None:
    """Remove the least recently used entries until the cache is within its size, and downloads
    a stopped worker left half done."""
    root = rules.cache
    with _cache_lock:
        entries = [entry for entry in root.iterdir() if entry.is_dir()]
        for entry in [e for e in entries if e.name.endswith(".incoming")]:
            entries.remove(entry)
            if entry.stat().st_mtime < time.time() - 2 * rules.deadline_s:
                shutil.rmtree(entry, ignore_errors=True)
        sizes = {entry: sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) for entry in entries}
        total = sum(sizes.values())
        recent = time.time() - 600  # in use by a request now, or about to be
        for entry in sorted(entries, key=lambda e: e.stat().st_mtime):
            if total <= rules.cache_bytes:
                break
            if entry != keep and entry.stat().st_mtime < recent:
                shutil.rmtree(entry, ignore_errors=True)
                total -= sizes[entry]
