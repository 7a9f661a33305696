"""The manifest a weights folder carries: which files it must hold, their sizes and their hashes.

Every folder that download_weights.py fetches or pack_weights.py packs gets a
`.fastsd-manifest.json`. At boot, check() compares the files on disk with it by size only (one
stat per file: milliseconds even for SDXL), so a truncated or missing file fails setup with a
message that names it, before safetensors fails deep inside a loader. verify() also re-hashes
(seconds per GB): download_weights.py --verify and pack_weights.py use it, setup() does not.

Hashes are the hub's own: sha256 for files stored in LFS/Xet (the weights), the git blob id
(git-sha1) for small files stored in git (configs, tokenizers). A folder packed from local files
(random-weight models, hand-made folders) gets sha256 for every file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = ".fastsd-manifest.json"
FORMAT = 1
# Not part of a model: huggingface_hub's resume metadata (local_dir/.cache/huggingface/) and the
# manifest itself.
IGNORED_TOP_LEVEL = {".cache", MANIFEST_NAME}
_HASH_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str  # "missing", or "N bytes, expected M", or "sha256 differs"

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def manifest_path(folder: Path) -> Path:
    return folder / MANIFEST_NAME


def load(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none."""
    path = manifest_path(folder)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(entry.get("size"), int) for entry in files.values()):
            raise ValueError("files must map each path to an object with an integer size")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a valid fastsd manifest ({error})") from None
    return manifest


def write(folder: Path, files: dict[str, dict], **about) -> Path:
    """Write the manifest atomically: a reader sees the old one or the new one, never half."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {"format": FORMAT, **about, "files": dict(sorted(files.items()))}
    path = manifest_path(folder)
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(temporary, path)
    return path


def local_files(folder: Path) -> list[str]:
    """Every file under folder, as posix paths relative to it, without the ignored ones."""
    found: list[str] = []
    for directory, subdirectories, names in os.walk(folder):
        relative = Path(directory).relative_to(folder)
        if relative == Path("."):
            subdirectories[:] = [d for d in subdirectories if d not in IGNORED_TOP_LEVEL]
            names = [n for n in names if n not in IGNORED_TOP_LEVEL]
        found.extend((relative / name).as_posix() for name in names)
    return sorted(found)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def git_sha1_of(path: Path) -> str:
    """The git blob id of a file: what the hub reports for files kept in git rather than LFS."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def describe_local(folder: Path) -> dict[str, dict]:
    """Manifest entries for the files a folder holds now, hashed here (sha256)."""
    return {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
        for name in local_files(folder)
    }


def check(folder: Path, manifest: dict | None = None) -> list[Problem]:
    """Files that are missing or of the wrong size. Sizes only: cheap enough for every boot."""
    manifest = manifest if manifest is not None else load(folder)
    if manifest is None:
        return []
    problems = []
    for name, entry in manifest["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(Problem(path, "missing"))
            continue
        if size != entry["size"]:
            problems.append(Problem(path, f"{size} bytes, expected {entry['size']}"))
    return problems


def verify(folder: Path, manifest: dict | None = None) -> list[Problem]:
    """check(), then every file's hash against the manifest: reads every byte."""
    manifest = manifest if manifest is not None else load(folder)
    if manifest is None:
        return []
    problems = check(folder, manifest)
    broken = {problem.path for problem in problems}
    for name, entry in manifest["files"].items():
        path = folder / name
        if path in broken:
            continue
        if "sha256" in entry and sha256_of(path) != entry["sha256"]:
            problems.append(Problem(path, "sha256 differs"))
        elif "git_sha1" in entry and git_sha1_of(path) != entry["git_sha1"]:
            problems.append(Problem(path, "git blob id differs"))
    return problems


def total_size(manifest: dict) -> int:
    return sum(entry["size"] for entry in manifest["files"].values())


def _safetensors_problem(path: Path) -> Problem | None:
    """A safetensors file says how long it must be: an 8-byte header length, a JSON header, then
    the tensors, whose end offsets the header lists. Reading the header (a few kB) catches a
    truncated or mangled file without a manifest and without hashing."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 or header_length > 100 * 2**20:
                return Problem(path, f"not a safetensors file ({size} bytes)")
            if header_length > size - 8:
                return Problem(path, f"{size} bytes, truncated inside its {header_length}-byte header")
            header = json.loads(file.read(header_length))
        data_end = max(
            (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return Problem(path, f"unreadable safetensors header: {error}")
    expected = 8 + header_length + data_end
    if size != expected:
        return Problem(path, f"{size} bytes, expected {expected} from its header")
    return None


def restricted(manifest: dict, covers) -> dict:
    """The manifest with only the files covers(name) keeps: what one preset loads of a shared folder."""
    return {**manifest, "files": {name: entry for name, entry in manifest["files"].items() if covers(name)}}


def check_without_manifest(folder: Path, covers=lambda name: True) -> list[Problem]:
    """For a folder that carries no manifest (placed by hand): every safetensors file that covers
    keeps must be as long as its header says."""
    return [
        problem
        for path in sorted(folder.rglob("*.safetensors"))
        if covers(path.relative_to(folder).as_posix()) and (problem := _safetensors_problem(path)) is not None
    ]


# Components a pipeline repo ships that fastsd never loads (it passes None for them).
UNLOADED_COMPONENTS = {"safety_checker", "feature_extractor"}


def check_components(folder: Path, skip: tuple[str, ...] = ()) -> list[Problem]:
    """Every component with weights that model_index.json lists (but those in skip, which the
    preset replaces) must have some: one preset may have fetched a shared base without them."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        return [Problem(index_path, f"unreadable: {error}")]
    problems = []
    for name, spec in index.items():
        weighted = (
            isinstance(spec, list)
            and len(spec) == 2
            and spec[1]
            and ("Model" in spec[1] or spec[1].startswith("Autoencoder"))
        )
        if weighted and name not in skip and name not in UNLOADED_COMPONENTS:
            if not any((folder / name).glob("*.safetensors")):
                problems.append(Problem(folder / name, "missing: no .safetensors weights"))
    return problems
