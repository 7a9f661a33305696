"""Fetching a weights tar at boot (Cog's setup(weights) = COG_WEIGHTS, or FASTSD_WEIGHTS_URL).

The tar holds weights/<hub id>/ and lora/<hub id>/ folders with their manifests, as
scripts/pack_weights.py makes it. It is downloaded and unpacked at once, into a staging folder
under the weights root; each folder the variant needs is checked against its manifest and only
then moved into place (a rename), so an interrupted boot never leaves a half-filled folder that
the next boot would take for complete.

The downloader: `pget` when it is on PATH (Replicate's images have it: parallel chunks, unpacked
from memory). Otherwise a small one here, on the standard library: parallel HTTP Range requests of
fixed-size chunks, handed in order to tarfile's streaming reader, so the archive never touches
the disk and unpacking overlaps the transfer. Why not a library: none maintained on PyPI does
ranged parallel GETs into a stream (they write whole files), and urllib needs no new dependency
in the image; the code that matters (retry a chunk from the byte where it broke, refuse a server
that ignores Range, check every length) is short enough to read and is tested against a local
server. A server without Range support is read as one stream.

Unpacking is strict: only regular files and folders, only under weights/ and lora/, no absolute
paths, no `..`, no links of any kind (weights need none, and a link is the usual way out of the
target folder).
"""

from __future__ import annotations

import collections
import gzip
import http.client
import io
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from ..errors import ConfigurationError
from . import manifest

CHUNK_SIZE = 16 * 1024 * 1024
WORKERS = 8  # parallel range requests (Settings.download_workers)
ATTEMPTS = 4  # per chunk: a dropped connection resumes from the byte it reached
TIMEOUT_S = 30.0  # connect and per-read
ALLOWED_TOP = ("weights", "lora")
STAGING_PREFIX = ".fastsd-incoming-"
_COPY_BLOCK = 4 * 1024 * 1024


class ArchiveError(ConfigurationError):
    """The weights tar could not be fetched or is not acceptable; the message says which and why."""


def redact(url: str) -> str:
    """The URL without credentials or query (signed URLs carry secrets there)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


# --- the ranged, parallel reader ----------------------------------------------------------------


class _Retry(Exception):
    pass


class RangedReader(io.RawIOBase):
    """A read-only stream of the resource at url, fetched as parallel Range requests."""

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int | None = None,
        workers: int | None = None,
        attempts: int | None = None,
        timeout: float = TIMEOUT_S,
        backoff: float = 0.5,
    ):
        super().__init__()
        self.url, self.shown = url, redact(url)
        self.chunk_size = chunk_size or CHUNK_SIZE
        self.workers = max(1, workers or WORKERS)
        self.attempts = attempts or ATTEMPTS
        self.timeout, self.backoff = timeout, backoff
        self.position = 0
        self.total: int | None = None
        self.ranged = False
        self.requests = 0  # how many HTTP requests were made (for the logs and the tests)
        self._buffer = memoryview(b"")
        self._pending: collections.deque[Future] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self._next_start = 0
        self._stream = None  # the response, when the server ignores Range
        self._open()

    # HTTP -----------------------------------------------------------------------------------------
    def _request(self, start: int, end: int | None):
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{'' if end is None else end}"})
        self.requests += 1
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            if error.code >= 500 or error.code == 429:
                raise _Retry(f"HTTP {error.code}") from None
            if error.code == 416:
                raise ArchiveError(
                    f"The weights URL {self.shown} refused the byte range {start}-{end} "
                    "(HTTP 416): the file changed or is shorter than announced."
                ) from None
            raise ArchiveError(
                f"The weights URL {self.shown} answered HTTP {error.code} {error.reason}: check "
                "the URL (a signed URL may have expired)."
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _Retry(str(getattr(error, "reason", error))) from None

    def _content_range(self, response, start: int) -> int:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if not match or int(match[1]) != start:
            raise ArchiveError(
                f"The weights URL {self.shown} answered a range request with "
                f"Content-Range {response.headers.get('Content-Range')!r}, not bytes {start}-."
            )
        return int(match[3]) if match[3] != "*" else -1

    def _open(self) -> None:
        """The first chunk, which also tells whether the server does ranges and the total size."""
        for attempt in range(1, self.attempts + 1):
            try:
                response = self._request(0, self.chunk_size - 1)
                break
            except _Retry as error:
                if attempt == self.attempts:
                    raise ArchiveError(f"The weights URL {self.shown} cannot be reached ({error}).") from None
                time.sleep(self.backoff * attempt)
        if response.status == 206:
            self.ranged = True
            self.total = self._content_range(response, 0)
            if self.total < 0:
                raise ArchiveError(f"The weights URL {self.shown} does not say its size (Content-Range */*).")
            first_end = min(self.chunk_size, self.total) - 1
            first = self._read_body(response, 0, first_end)
            self._buffer = memoryview(first)
            self._next_start = len(first)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastsd-fetch")
            self._fill()
        else:  # 200: the whole file, as one stream that cannot resume
            length = response.headers.get("Content-Length")
            self.total = int(length) if length is not None else None
            self._stream = response

    def _read_body(self, response, start: int, end: int) -> bytes:
        """The bytes start..end (inclusive), resuming with new requests where a connection broke."""
        wanted = end - start + 1
        received = bytearray()
        failures = 0
        while True:
            try:
                with response:
                    while len(received) < wanted:
                        block = response.read(min(1024 * 1024, wanted - len(received)))
                        if not block:
                            break
                        received += block
                if len(received) == wanted:
                    return bytes(received)
                raise _Retry(f"the connection closed after {len(received)} of {wanted} bytes")
            except (OSError, http.client.HTTPException, _Retry) as error:
                failures += 1
                if failures >= self.attempts:
                    raise ArchiveError(
                        f"Downloading {self.shown} failed at byte {start + len(received)} after {failures} "
                        f"attempts ({error}); check the network and the URL, then restart."
                    ) from None
                time.sleep(self.backoff * failures)
            # resume from where the data stopped
            while True:
                try:
                    response = self._request(start + len(received), end)
                    break
                except _Retry as error:
                    failures += 1
                    if failures >= self.attempts:
                        raise ArchiveError(
                            f"Downloading {self.shown} failed at byte {start + len(received)} "
                            f"after {failures} attempts ({error})."
                        ) from None
                    time.sleep(self.backoff * failures)
            if response.status != 206:
                raise ArchiveError(f"The weights URL {self.shown} ignored a range request (HTTP {response.status}).")
            total = self._content_range(response, start + len(received))
            if self.total is not None and total not in (self.total, -1):
                raise ArchiveError(
                    f"The weights file at {self.shown} changed size during the download "
                    f"({self.total} then {total} bytes)."
                )

    def _chunk(self, start: int, end: int) -> bytes:
        for attempt in range(1, self.attempts + 1):
            try:
                response = self._request(start, end)
                break
            except _Retry as error:
                if attempt == self.attempts:
                    raise ArchiveError(
                        f"Downloading {self.shown} failed at byte {start} after {attempt} attempts ({error})."
                    ) from None
                time.sleep(self.backoff * attempt)
        if response.status != 206:
            raise ArchiveError(f"The weights URL {self.shown} ignored a range request (HTTP {response.status}).")
        total = self._content_range(response, start)
        if total not in (self.total, -1):
            raise ArchiveError(
                f"The weights file at {self.shown} changed size during the download ({self.total} then {total} bytes)."
            )
        return self._read_body(response, start, end)

    def _fill(self) -> None:
        # Keep every worker busy plus a few chunks ready: memory is bounded by that many chunks.
        assert self.total is not None and self._pool is not None  # ranged: the size and the workers are known
        while self._next_start < self.total and len(self._pending) < self.workers + 2:
            start = self._next_start
            end = min(start + self.chunk_size, self.total) - 1
            self._pending.append(self._pool.submit(self._chunk, start, end))
            self._next_start = end + 1

    # io.RawIOBase ---------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        if self._stream is not None:
            try:
                count = self._stream.readinto(target)
            except (OSError, http.client.HTTPException) as error:
                raise ArchiveError(
                    f"Downloading {self.shown} broke after {self.position} bytes ({error}); the server does not "
                    "support range requests, so it cannot resume: restart, or serve the tar from a server that does."
                ) from None
            self.position += count
            return count
        while not self._buffer:
            if not self._pending:
                return 0
            self._buffer = memoryview(self._pending.popleft().result())
            self._fill()
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        self.position += count
        return count

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._stream is not None:
            self._stream.close()
        super().close()


# --- safe unpacking -----------------------------------------------------------------------------


def member_path(name: str) -> PurePosixPath:
    """The relative path a tar member may be written to, or ArchiveError."""
    path = PurePosixPath(name)
    parts = [part for part in path.parts if part not in ("", ".")]
    if path.is_absolute() or name.startswith(("/", "\\")) or ".." in parts or any("\\" in p for p in parts):
        raise ArchiveError(f"The weights tar holds {name!r}, a path that leads outside its folder: refused.")
    if not parts or parts[0] not in ALLOWED_TOP:
        raise ArchiveError(
            f"The weights tar holds {name!r}, outside weights/ and lora/: make it with scripts/pack_weights.py."
        )
    return PurePosixPath(*parts)


def extract_stream(stream, destination: Path) -> int:
    """Unpack a tar read front to back (no seeking) into destination; returns the bytes written."""
    written = 0
    try:
        # Stream mode reads front to back; 1 MiB reads instead of tarfile's default 10 KiB.
        with tarfile.open(fileobj=stream, mode="r|*", bufsize=1024 * 1024) as archive:
            for member in archive:
                relative = member_path(member.name)
                if ".cache" in relative.parts:  # huggingface_hub's resume metadata: not weights
                    continue
                target = destination.joinpath(*relative.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isreg():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    assert source is not None  # a regular file has a body
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _COPY_BLOCK)
                    written += member.size
                else:
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    raise ArchiveError(
                        f"The weights tar holds {member.name!r}, a {kind}: only files and folders are accepted."
                    )
            # The rest is the tar's zero padding: read it, so that a short download is noticed.
            while stream.read(_COPY_BLOCK):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as error:
        raise ArchiveError(f"The weights tar is damaged or not a tar ({type(error).__name__}: {error}).") from None
    return written


def _check_tree(staging: Path) -> None:
    """What pget unpacked must obey the same rules as extract_stream (no links, weights/ and lora/)."""
    for directory, subdirectories, names in os.walk(staging):
        for name in subdirectories + names:
            path = Path(directory) / name
            relative = path.relative_to(staging).as_posix()
            member_path(relative)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise ArchiveError(f"The weights tar holds {relative!r}, a link or special file: refused.")


# --- fetching and installing --------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("", "file")


def _download_into(url: str, staging: Path, log, workers: int = WORKERS, pget_allowed: bool = True) -> None:
    if _is_local(url):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
        log(f"unpacking the weights tar {path}")
        with open(path, "rb") as stream:
            extract_stream(stream, staging)
        return
    pget = shutil.which("pget")
    if pget and pget_allowed:
        log(f"fetching the weights tar {redact(url)} with {pget}")
        target = staging / "unpacked"
        done = subprocess.run([pget, "-x", url, str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ArchiveError(f"pget could not fetch {redact(url)} (exit {done.returncode}: {tail[0]}).")
        _check_tree(target)
        for top in target.iterdir():
            os.replace(top, staging / top.name)
        target.rmdir()
        return
    log(f"fetching the weights tar {redact(url)} ({workers} parallel range requests)")
    with RangedReader(url, workers=workers) as reader:
        extract_stream(reader, staging)
        if reader.total is not None and reader.position != reader.total:
            raise ArchiveError(
                f"The weights tar at {redact(url)} is {reader.total} bytes but {reader.position} "
                "were read: the download is incomplete."
            )


def fetch_archive(
    url: str,
    root: Path,
    folders: list[Path],
    optional: list[Path] | tuple[()] = (),
    log=print,
    workers: int = WORKERS,
    no_pget: bool = False,
) -> list[Path]:
    """Fetch the tar at url, and install from it the given folders (relative to root, e.g.
    weights/stabilityai/sd-turbo) after checking each against its manifest; the optional ones
    (the tiny autoencoder) too when the tar has them. Returns the folders installed. workers:
    parallel range requests; no_pget: never use pget (Settings.download_workers, no_pget)."""
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        _download_into(url, staging, log, workers, not no_pget)
        installed = []
        size = 0
        wanted = list(folders) + [
            folder for folder in optional if folder not in folders and (staging / folder).is_dir()
        ]
        for relative in wanted:
            source = staging / relative
            if not source.is_dir():
                raise ArchiveError(
                    f"The weights tar at {redact(url)} has no {relative.as_posix()}/: it was packed "
                    "for another variant (scripts/pack_weights.py VARIANT OUT.tar)."
                )
            try:
                listed = manifest.load(source)
            except ValueError as error:
                raise ArchiveError(str(error)) from None
            if listed is None:
                log(f"{relative.as_posix()} in the weights tar has no manifest: its files are not verified")
            else:
                problems = manifest.check(source, listed)
                if problems:
                    shown = ", ".join(f"{p.path.relative_to(staging)} ({p.reason})" for p in problems)
                    raise ArchiveError(f"The weights tar at {redact(url)} does not match its manifest: {shown}.")
                size += manifest.total_size(listed)
            installed.append(_install(source, root / relative, staging))
        seconds = time.perf_counter() - started
        log(
            f"installed {', '.join(p.as_posix() for p in wanted)} from the weights tar "
            f"({size / 1e9:.2f} GB in {seconds:.1f} s)"
        )
        return installed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(source: Path, destination: Path, staging: Path) -> Path:
    """Move a checked folder into place; an incomplete one already there is replaced."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        os.replace(destination, staging / f"replaced-{uuid.uuid4().hex[:8]}")
    os.replace(source, destination)
    return destination
