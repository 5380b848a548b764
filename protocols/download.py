"""Getting one file onto disk safely: short timeouts, a progress bar, checksums, atomic writes,
safe archive extraction, and a cache of file digests keyed by size and mtime.

Written with the standard library (urllib, tarfile, hashlib), as torchvision's own
`download_url` is, because none of the field's downloaders does all of what a sweep needs at once:
torchvision's retries, keeps a partial file under the final name while it downloads and checks only
md5; timm's hub path retries for about a minute before it fails. Here:

- a download streams into a hidden temporary file beside its destination
  (`.<name>.<random>.part<suffix>`), hashing as it goes (md5 and sha256 at once); the file is
  fsynced and renamed to its final name only after its size and every expected checksum match, so a
  partial or wrong download never looks complete, and it is deleted on any failure;
- every failure the user can act on (no network, a timeout, an HTTP error, an interrupted transfer,
  a checksum that does not match, an archive member that would land outside its folder) is one
  `FetchError` naming the file, the URL and what to do, raised within the socket timeout;
- checksums a server declares are checked too: the Hugging Face hub's LFS sha256 (its
  `X-Linked-Etag` header) and Google Cloud Storage's md5 (`x-goog-hash`);
- a `mirror` base URL (or a local folder) replaces the publisher's location: the file is then
  looked for as `<mirror>/<file name>`;
- an archive is extracted into a hidden temporary folder beside its destination and moved into
  place in one rename, after every member was checked (no absolute path, no `..`, no link or device,
  Python's `tarfile` "data" filter on top), so a half-extracted tree never looks complete either.

This module knows nothing of the suite (`protocols.prepare` does); it imports no other module of it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from tqdm import tqdm

#: seconds a connection or a read may stall before the download fails (not the whole transfer)
DEFAULT_TIMEOUT = 15.0
CHUNK = 1 << 20
ALGORITHMS = ("md5", "sha256")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(RuntimeError):
    """A file could not be fetched or verified: network, HTTP, interrupted transfer, checksum, or
    an archive refused for safety. The message names the file, the URL and the fix."""


@dataclass(frozen=True)
class Digests:
    size: int
    md5: str
    sha256: str

    def get(self, algorithm: str) -> str:
        return getattr(self, algorithm)


def file_digests(path: str | os.PathLike) -> Digests:
    """md5 and sha256 of a file in one read."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return Digests(size, md5.hexdigest(), sha.hexdigest())


def mirrored(url: str, mirror: str | os.PathLike | None, name: str) -> str:
    """`url`, or `<mirror>/<name>` when a mirror is given (a URL, or a local folder)."""
    if not mirror:
        return url
    base = str(mirror)
    if "://" not in base:
        base = Path(base).expanduser().resolve().as_uri()
    return base.rstrip("/") + "/" + urllib.parse.quote(name)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping each hop's headers: the hub declares a file's
    sha256 on its redirect, not on the CDN's final answer."""

    def __init__(self):
        self.headers: list[Mapping[str, str]] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def declared_checksums(headers: list[Mapping[str, str]]) -> dict[str, str]:
    """Checksums the server states for the file: the hub's LFS sha256 (`X-Linked-Etag`, or an
    `ETag` that is a bare sha256) and Google Cloud Storage's md5 (`x-goog-hash: md5=<base64>`)."""
    out: dict[str, str] = {}
    for h in headers:
        for key in ("X-Linked-Etag", "ETag"):
            value = (h.get(key) or "").strip().strip('"').lower()
            if value.startswith("w/"):
                continue
            if _HEX64.match(value):
                out.setdefault("sha256", value)
        for part in (h.get("x-goog-hash") or "").split(","):
            algo, _, value = part.strip().partition("=")
            if algo == "md5" and value:
                try:
                    out.setdefault("md5", base64.b64decode(value).hex())
                except (binascii.Error, ValueError):
                    pass
    return out


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def download(url: str, dest: str | os.PathLike, *, expected: Mapping[str, str] | None = None,
             timeout: float = DEFAULT_TIMEOUT, progress: bool = True,
             verify: Callable[[Path], None] | None = None, what: str = "") -> tuple[Digests, dict[str, str]]:
    """Download `url` to `dest` (module docstring): every checksum of `expected` ({"md5"|"sha256":
    hex}) and every one the server declares must match, and `verify(temporary path)` (which raises
    to refuse the file, e.g. a checkpoint that does not load) must pass, before `dest` appears.
    Returns the file's digests and the checksums the server declared. Raises `FetchError`."""
    dest = Path(dest)
    what = what or dest.name
    expected = {k: v.lower() for k, v in (expected or {}).items() if v}
    unknown = set(expected) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown checksum algorithm(s) {sorted(unknown)}; use {ALGORITHMS}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=f".part{dest.suffix}")
    tmp = Path(tmp_name)
    redirects = _Redirects()
    opener = urllib.request.build_opener(redirects)
    md5, sha = hashlib.md5(), hashlib.sha256()
    got = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "promptcl-fetch"})
                with opener.open(request, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    declared = declared_checksums([*redirects.headers, resp.headers])
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                              disable=not progress, leave=False) as bar:
                        while True:
                            chunk = resp.read(CHUNK)
                            if not chunk:
                                break
                            out.write(chunk)
                            md5.update(chunk)
                            sha.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeouts, resets
                raise FetchError(
                    f"{what}: download from {url} failed after {got:,} bytes ({_reason(e)}); nothing "
                    "was kept. Check the network (or fetch on a machine that has one and copy the "
                    "files, or give --mirror URL|FOLDER), then rerun") from None
            if total is not None and got != total:
                raise FetchError(f"{what}: the transfer from {url} was interrupted ({got:,} of {total:,} "
                                 "bytes); nothing was kept: rerun to download it again")
            out.flush()
            os.fsync(out.fileno())
        digests = Digests(got, md5.hexdigest(), sha.hexdigest())
        for source, wanted in (("pinned", expected), ("declared by the server", declared)):
            for algo, value in wanted.items():
                if digests.get(algo) != value:
                    raise FetchError(
                        f"{what}: checksum mismatch for {url}: {algo} {digests.get(algo)}, expected "
                        f"{value} ({source}); the download is corrupt or the server sends another "
                        "file, and nothing was kept. Rerun, or fetch from another --mirror")
        if verify is not None:
            verify(tmp)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return digests, declared
    finally:
        if tmp.exists():
            tmp.unlink()


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why `member` may not be extracted, or None."""
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or path.is_absolute() or re.match(r"^[A-Za-z]:", member.name):
        return "an absolute path"
    if ".." in path.parts:
        return "a path with '..'"
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname})"
    if not (member.isfile() or member.isdir()):
        return "a device, fifo or other special file"
    return None


def extract(archive: str | os.PathLike, root: str | os.PathLike, top: str, *,
            progress: bool = True, marker: Mapping[str, object] | None = None) -> Path:
    """Extract the members of `archive` under its folder `top` into `root/top` (other members
    are skipped) and return that folder. Every member is checked first (module docstring); the
    tree is built in a hidden folder beside it and moved into place in one rename. `marker`, when
    given, is written into the tree as `.promptcl-source.json` (what was fetched, from where,
    its checksums). Raises `FetchError`."""
    archive, root = Path(archive), Path(root)
    final = root / top
    if final.exists():
        raise FetchError(f"{final} already exists; fetch does not overwrite a folder it did not make "
                         f"complete: move it away (mv {final} {final}.old) and rerun")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise FetchError(f"{archive}: not a readable tar archive ({_reason(e)}); delete it and rerun") from None
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{top}.", suffix=".extracting"))
    try:
        with tar:
            members = []
            for m in tar.getmembers():
                why = _unsafe(m)
                if why is not None:
                    raise FetchError(f"{archive}: member {m.name!r} is {why}; refused (it could write "
                                     f"outside {final}). Nothing was extracted: the archive is not the "
                                     "published one")
                if PurePosixPath(m.name).parts[:1] == (top,):
                    members.append(m)
            if not members:
                raise FetchError(f"{archive}: holds no {top}/ folder; it is not the published archive")
            for m in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress,
                          leave=False):
                try:
                    tar.extract(m, tmp, filter="data")
                except (tarfile.TarError, OSError) as e:
                    raise FetchError(f"{archive}: cannot extract {m.name} ({_reason(e)}); the archive is "
                                     "truncated or corrupt: delete it and rerun") from None
        if marker is not None:
            (tmp / top / ".promptcl-source.json").write_text(json.dumps(dict(marker), indent=1) + "\n")
        os.replace(tmp / top, final)
        _fsync_dir(root)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DigestCache:
    """Digests of files already hashed, keyed by absolute path and valid while the file's size
    and mtime are unchanged: lets a check say "verified" without re-reading gigabytes. One JSON
    file, rewritten atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._data: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._data = {}

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def get(self, path: str | os.PathLike) -> Digests | None:
        key, size, mtime = self._key(Path(path))
        e = self._data.get(key)
        if e and e.get("size") == size and e.get("mtime_ns") == mtime:
            return Digests(size, e["md5"], e["sha256"])
        return None

    def put(self, path: str | os.PathLike, digests: Digests) -> None:
        key, size, mtime = self._key(Path(path))
        self._data[key] = {"size": size, "mtime_ns": mtime, "md5": digests.md5, "sha256": digests.sha256}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache only costs a re-hash later
            pass

    def digests(self, path: str | os.PathLike) -> Digests:
        """Cached, else computed and cached."""
        got = self.get(path)
        if got is None:
            got = file_digests(path)
            self.put(path, got)
        return got
