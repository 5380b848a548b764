"""What a planned sweep needs on disk, whether it is there and intact, and fetching what is not.

Three steps, each one call (the CLI's `fetch` and `check` commands, and the check a sweep and a dry
run make before anything runs):

- `requirements(protocols, backbones, data_root, weights_dir)` (or `requirements_for_runs(specs,
  options)` for planned runs): every data set and checkpoint the runs read, with exactly the paths
  the readers and `methods.backbones` look at, in their order, and the files `fetch` would download;
- `check(reqs)`: every piece that is missing or damaged, all at once; `require(reqs)` raises
  `NotReadyError` with one message naming each (data set or backbone, the runs that need it, the
  paths looked at, the checksum state) and the fetch command;
- `fetch(reqs, mirror=None)`: downloads what is missing from `protocols.sources` (or a mirror),
  verified and written atomically (`protocols.download`), and extracts archives into the layout the
  readers expect.

What "damaged" means, so that a check takes seconds, not minutes: a check reads no image and hashes
no large file unless asked (`verify=True`, the CLI's `check --verify`). It checks that the files a
reader needs exist (CIFAR-100's three pickles, the four Fashion-MNIST files, every one of the 30,000
files of the shipped ImageNet-R split, every image CUB's images.txt lists: directory listings and
stats, well under a second each) and compares a file's checksum with its pin (the catalog's, or the
sha256 recorded in `SHA256SUMS` at its first download) only from the digest cache: digests computed
by `fetch` or by an earlier `check --verify`, valid while the file's size and mtime are unchanged.
A file never hashed is "present, not verified" (not a problem); a cached or computed digest that
differs from its pin is "damaged" (a problem). Folders extracted by `fetch` carry a
`.promptcl-source.json` naming the archive and the checksums it was verified against.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import cifar100, cub200, fashion_mnist, imagenet_r
from benchmarks.common import cache_dir, entry_kind, path_kind, resolve_data_root, scan
from methods.backbones import BackboneError, find_weights, get_spec, verify_checkpoint

from .download import DEFAULT_TIMEOUT, DigestCache, Digests, FetchError, download, extract, mirrored, now
from .errors import NotReadyError
from .runner import RunOptions
from .schema import Protocol, load_protocol
from .sources import DATA, WEIGHTS, Source
from .sweep import resolve_backbones

#: the sha256 of every file fetch downloaded, beside it (`sha256sum -c SHA256SUMS` checks them)
SUMS = "SHA256SUMS"
#: what fetch writes into a folder it extracted
MARKER = ".promptcl-source.json"
#: where archives are downloaded to, under the data root, until they are extracted
DOWNLOADS = ".promptcl-downloads"
NAMES = {"cifar100": "CIFAR-100", "imagenet_r": "ImageNet-R", "cub200": "CUB-200-2011",
         "fashion_mnist": "Fashion-MNIST"}


@dataclass(frozen=True)
class Requirement:
    """One data set or checkpoint that planned runs read."""
    kind: str  # "data" | "weights"
    name: str  # the data set (cifar100, ...) or the backbone (sup21k, ...)
    root: Path  # --data-root or --weights-dir
    looked_for: tuple[Path, ...]  # the paths the suite looks at, in its order, each once
    sources: tuple[Source, ...]  # what fetch downloads; () when there is nothing to fetch
    needed_by: tuple[str, ...] = ()  # the protocols as given (data), or "protocol backbone" pairs
    split: str | None = None  # ImageNet-R: "coda" | "stratified" | "file" (what "complete" means)
    system_copy: bool = True  # Fashion-MNIST: whether the system-wide copy may stand in

    @property
    def title(self) -> str:
        return f"data {NAMES.get(self.name, self.name)}" if self.kind == "data" else f"weights {self.name}"


@dataclass(frozen=True)
class State:
    """What `check` found for one requirement."""
    requirement: Requirement
    state: str  # "ok" | "missing" | "damaged"
    path: Path | None  # what the suite would read, when there is one
    checksum: str  # "verified ...", "not verified ...", "no checksum pinned", "mismatch ..."
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def line(self) -> str:
        r = self.requirement
        who = f" (for {', '.join(r.needed_by)})" if r.needed_by else ""
        if self.state == "missing":
            where = "looked in" if r.kind == "data" else "looked for"
            return f"{r.title}{who}: missing; {where} {', '.join(str(p) for p in r.looked_for)}"
        text = f"{r.title}{who}: " + ("" if self.ok else f"{self.state} at ") + f"{self.path}: {self.checksum}"
        return text + (f"; {self.detail}" if self.detail else "")


# ------------------------------------------------------------------ what a sweep needs


def _data_requirement(proto: Protocol, data_root: str | os.PathLike | None, given: str,
                      system_copy: bool = True) -> Requirement:
    """`given`: the protocol as the user named it (a name, or a YAML path), so that the fetch
    command built from the requirement names it the same way."""
    root = resolve_data_root(data_root)
    reader = {"cifar100": cifar100, "imagenet_r": imagenet_r, "cub200": cub200,
              "fashion_mnist": fashion_mnist}[proto.dataset]
    split = None
    if proto.dataset == "imagenet_r":
        split = "file" if proto.split_file else proto.split
    dirs = (fashion_mnist.candidate_dirs(data_root, system_copy) if proto.dataset == "fashion_mnist"
            else reader.candidate_dirs(data_root))
    return Requirement("data", proto.dataset, root, tuple(dict.fromkeys(dirs)), DATA[proto.dataset], (given,),
                       split, system_copy)


def _weights_requirement(name: str, weights_dir: str | os.PathLike | None,
                         needed_by: tuple[str, ...] = ()) -> Requirement:
    spec = get_spec(name)
    _, tried = find_weights(name, weights_dir)
    source = WEIGHTS.get(name)
    return Requirement("weights", name, Path(weights_dir or "pretrained"), tuple(tried),
                       (source,) if source and not spec.shipped else (), needed_by)


def _merge(reqs: Iterable[Requirement]) -> list[Requirement]:
    """One requirement per thing on disk, listing everything that needs it."""
    out: dict[tuple, Requirement] = {}
    for r in reqs:
        key = (r.kind, r.name, r.root, r.split)
        if key in out:
            have = out[key]
            out[key] = replace(have, needed_by=tuple(dict.fromkeys(have.needed_by + r.needed_by)))
        else:
            out[key] = r
    return list(out.values())


def requirements(protocols: Sequence[str], backbones: str | Sequence[str] = "default",
                 data_root: str | os.PathLike | None = "data",
                 weights_dir: str | os.PathLike | None = "pretrained", *,
                 system_copy: bool = True) -> list[Requirement]:
    """The data of each protocol (names or YAML paths) and the checkpoints of `backbones`: names,
    or "default" / "all" (each protocol's first / all of its backbones, as a sweep resolves them).
    Named backbones are needed whatever the protocols (`fetch --backbones sup21k_npz` alone).
    Raises ProtocolError / SweepError / BackboneError for unknown names."""
    reqs = []
    for p in protocols:
        proto = load_protocol(p)
        reqs.append(_data_requirement(proto, data_root, str(p), system_copy))
        if backbones in ("default", "all"):
            reqs += [_weights_requirement(b, weights_dir, (f"{proto.name} {b}",))
                     for b in resolve_backbones(p, backbones)]
    if backbones not in ("default", "all"):
        names = backbones.split(",") if isinstance(backbones, str) else backbones
        reqs += [_weights_requirement(b.strip(), weights_dir) for b in names if b.strip()]
    return _merge(reqs)


def requirements_for_runs(specs: Iterable, options: RunOptions) -> list[Requirement]:
    """What the planned runs (`protocols.runner.RunSpec`s) read under `options`: no checkpoint with
    `random_init`, no hub checkpoint with `allow_download` (timm fetches it), no Fashion-MNIST with
    `download` (torchvision fetches it)."""
    reqs = []
    protocols: dict[str, Protocol] = {}
    for s in specs:
        proto = protocols.setdefault(s.protocol, load_protocol(s.protocol))
        if not (options.download and proto.dataset == "fashion_mnist"):
            reqs.append(_data_requirement(proto, options.data_root, s.protocol, options.system_copy))
        hub = options.allow_download and get_spec(s.backbone).timm_name
        if not options.random_init and not hub:
            reqs.append(_weights_requirement(s.backbone, options.weights_dir, (f"{proto.name} {s.backbone}",)))
    return _merge(reqs)


# ------------------------------------------------------------------ is it there, is it intact


def digest_cache() -> DigestCache:
    return DigestCache(cache_dir() / "digests.json")


def read_sums(folder: Path) -> dict[str, str]:
    """{file name: sha256} of `folder/SHA256SUMS` (what fetch recorded)."""
    try:
        lines = (folder / SUMS).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        digest, _, name = line.strip().partition("  ")
        if len(digest) == 64 and name:
            out[name.lstrip("*")] = digest.lower()
    return out


def record_sum(folder: Path, name: str, sha256: str) -> None:
    sums = read_sums(folder)
    sums[name] = sha256
    tmp = folder / f".{SUMS}.tmp"
    tmp.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())), encoding="utf-8")
    os.replace(tmp, folder / SUMS)


def _compare(path: Path, pins: dict[str, str], cache: DigestCache, verify: bool, what: str
             ) -> tuple[bool, str]:
    """(intact, checksum text) of `path` against `pins` ({"md5"|"sha256": hex})."""
    if not pins:
        return True, "no checksum pinned"
    got: Digests | None = cache.digests(path) if verify else cache.get(path)
    if got is None:
        return True, f"not verified (pinned {what}; `check --verify` hashes it)"
    for algo, want in pins.items():
        if got.get(algo) != want:
            return False, f"{algo} mismatch: {got.get(algo)}, pinned {want} ({what})"
    return True, f"verified ({', '.join(pins)} {what})"


def _marker_text(folder: Path) -> str | None:
    try:
        m = json.loads((folder / MARKER).read_text())
        return f"fetched {m.get('fetched', '?')} from {m.get('archive', '?')}, md5 {m.get('md5', '?')} verified"
    except (OSError, ValueError, AttributeError):
        return None


def _missing_listed(folder: Path, rels: Iterable[str]) -> list[str]:
    """The relative paths of `rels` not present under `folder` (one listing per subfolder). A
    symbolic link loop in a listed subfolder is a `DataError` naming it, as the readers say it
    (`benchmarks.common.entry_kind`): an input error before any run, not a missing file."""
    seen: dict[str, set[str]] = {}
    out = []
    for rel in rels:
        sub, _, leaf = rel.rpartition("/")
        if sub not in seen:
            d = folder / sub
            seen[sub] = {e.name for e in scan(d) if entry_kind(e) == "file"} if path_kind(d) == "dir" else set()
        if leaf not in seen[sub]:
            out.append(rel)
    return out


def _check_tree(d: Path) -> None:
    """Look at every entry of the class folders of the ImageNet-R folder `d`, as the reader will:
    a symbolic link loop there is a `DataError` naming it now, before any run."""
    for e in scan(d):
        if imagenet_r.WNID.match(e.name) and entry_kind(e) == "dir":
            for f in scan(Path(e.path)):
                entry_kind(f)


def _incomplete(missing: list[str], total: int, what: str) -> str:
    shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
    return f"{len(missing)} of the {total} files {what} are missing ({shown})"


def _data_state(r: Requirement, cache: DigestCache, verify: bool) -> State:
    root = r.root
    if r.name == "fashion_mnist":
        found = fashion_mnist.find_files(root, system_copy=r.system_copy)
        if found is None:
            return State(r, "missing", None, "")
        files = found[0]
        pins = {s.file: s.md5 for s in r.sources}
        texts = []
        for f in files.values():
            ok, text = _compare(f, {"md5": pins[f.name]} if f.name in pins else {}, cache, verify,
                                "by torchvision")
            if not ok:
                return State(r, "damaged", f, text)
            texts.append(text)
        return State(r, "ok", next(iter(files.values())).parent, texts[0])
    finder = {"cifar100": cifar100.find_dir, "imagenet_r": imagenet_r.find_dir, "cub200": cub200.find_dir}
    d = finder[r.name](root)
    if d is None:
        return State(r, "missing", None, "")
    marker = _marker_text(d)
    checksum = marker or "present, not fetched by the suite (the archive's checksum is unknown)"
    if r.name == "cifar100":
        contents = r.sources[0].contents_md5
        texts = []
        for f in cifar100.FILES:
            ok, text = _compare(d / f, {"md5": contents[f]}, cache, verify, "by torchvision")
            if not ok:
                return State(r, "damaged", d / f, text, "replace the folder: move it away and rerun fetch")
            texts.append(text)
        return State(r, "ok", d, texts[0] if texts[0].startswith("verified") else marker or texts[0])
    if r.name == "imagenet_r":
        _check_tree(d)
        if r.split == "coda":
            entries, _ = imagenet_r.read_split_folder(imagenet_r.CODA_SPLIT_DIR)
            missing = _missing_listed(d, (rel for _, rel in entries))
            if missing:
                return State(r, "damaged", d, checksum, _incomplete(
                    missing, len(entries), "of the shipped split (split: coda)")
                    + "; move the folder away and rerun fetch, or use split: stratified / split_file:")
        return State(r, "ok", d, checksum)
    # cub200: every image images.txt lists
    try:
        lines = (d / "images.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return State(r, "damaged", d, checksum, f"{d / 'images.txt'} unreadable ({e})")
    rels = [ln.split(maxsplit=1)[1] for ln in lines if len(ln.split(maxsplit=1)) == 2]
    missing = _missing_listed(d / "images", rels)
    if missing:
        return State(r, "damaged", d, checksum, _incomplete(missing, len(rels), "images.txt lists")
                     + "; move the folder away and rerun fetch")
    return State(r, "ok", d, checksum)


def _weights_state(r: Requirement, cache: DigestCache, verify: bool) -> State:
    path, _ = find_weights(r.name, r.root)
    if path is None:
        return State(r, "missing", None, "")
    source = r.sources[0] if r.sources else None
    if source is not None and path.name == source.file and source.pinned:
        pins, what = source.pinned, "in protocols/sources.py"
    else:
        recorded = read_sums(path.parent).get(path.name)
        pins, what = ({"sha256": recorded}, f"recorded in {path.parent / SUMS}") if recorded else ({}, "")
    ok, text = _compare(path, pins, cache, verify, what)
    if not ok:
        return State(r, "damaged", path, text, "rerun fetch to replace it")
    return State(r, "ok", path, text)


def inspect(reqs: Iterable[Requirement], *, verify: bool = False) -> list[State]:
    """The state of every requirement (see the module docstring for what is checked and how fast)."""
    cache = digest_cache()
    return [(_data_state if r.kind == "data" else _weights_state)(r, cache, verify) for r in reqs]


def from_system_copy(states: Iterable[State]) -> list[State]:
    """The data that will be read from the system-wide copy (Fashion-MNIST's Debian package),
    which a sweep names, since it is used only when no --data-root was given."""
    system = [Path(d) for d in fashion_mnist.SYSTEM_DIRS]
    return [s for s in states if s.requirement.kind == "data" and s.path is not None
            and any(Path(s.path).is_relative_to(d) for d in system)]


def check(reqs: Iterable[Requirement], *, verify: bool = False) -> list[State]:
    """The requirements that are missing or damaged, all of them."""
    return [s for s in inspect(reqs, verify=verify) if not s.ok]


def fetch_command(reqs: Iterable[Requirement]) -> str:
    """The command that fetches `reqs`."""
    reqs = list(reqs)
    protos = dict.fromkeys(p for r in reqs if r.kind == "data" for p in r.needed_by)
    names = dict.fromkeys(r.name for r in reqs if r.kind == "weights")
    cmd = ["python run_suite.py fetch"]
    if protos:
        cmd.append(f"--protocols {','.join(protos)}")
    if names:
        cmd.append(f"--backbones {','.join(names)}")
    data = next((r.root for r in reqs if r.kind == "data"), None)
    weights = next((r.root for r in reqs if r.kind == "weights"), None)
    if data is not None:
        cmd.append(f"--data-root {data}")
    if weights is not None:
        cmd.append(f"--weights-dir {weights}")
    return " ".join(cmd)


def format_problems(problems: Sequence[State]) -> str:
    """One message naming every missing or damaged piece, and the command that fetches them."""
    lines = [f"the planned runs cannot start: {len(problems)} piece(s) missing or damaged:"]
    lines += [f"  - {p.line()};" for p in problems]
    fetchable = [p.requirement for p in problems if p.requirement.sources]
    if fetchable:
        lines.append(f"fetch them with: {fetch_command(fetchable)}")
    for p in problems:
        if p.requirement.kind == "weights" and not p.requirement.sources:
            lines.append(f"{p.requirement.title} cannot be fetched: "
                         f"{get_spec(p.requirement.name).download_hint}")
    lines.append("(on a cluster whose compute nodes have no network, run it on the login node, "
                 "or give --mirror URL|FOLDER)")
    return "\n".join(lines)


def format_report(states: Sequence[State]) -> str:
    """One line per requirement, then the fetch command if anything is missing or damaged."""
    lines = [("ok      " if s.ok else f"{s.state.upper():<8}") + s.line() for s in states]
    bad = [s.requirement for s in states if not s.ok and s.requirement.sources]
    if bad:
        lines.append(f"fetch with: {fetch_command(bad)}")
    return "\n".join(lines)


def require(reqs: Iterable[Requirement], *, verify: bool = False) -> None:
    """Raise `NotReadyError` naming every missing or damaged piece (what a sweep and a dry run call
    before anything runs or is stored)."""
    problems = check(reqs, verify=verify)
    if problems:
        raise NotReadyError(format_problems(problems))


# ------------------------------------------------------------------ getting it


def _verifier(name: str) -> Callable[[Path], None]:
    def verify(tmp: Path) -> None:
        try:
            verify_checkpoint(name, tmp)
        except BackboneError as e:
            raise FetchError(f"the downloaded file for backbone {name!r} does not load: {e}; nothing "
                             "was kept") from None
    return verify


def _announce_unpinned(source: Source, folder: Path, sha256: str, key: str, log: Callable[[str], None]) -> None:
    log(f"  {source.file}: no checksum is published ({source.checksum_source.split(':')[0]}); "
        f"recorded sha256 {sha256} in {folder / SUMS}. To pin it for everyone, set "
        f"sha256=\"{sha256}\" in protocols/sources.py ({key}) in a commit saying where and when you "
        "fetched it")


def _fetch_weights(r: Requirement, mirror, timeout: float, progress: bool, cache: DigestCache,
                   log: Callable[[str], None]) -> Path:
    (source,) = r.sources
    dest = r.root / source.file
    url = mirrored(source.url, mirror, source.file)
    log(f"weights {r.name}: {url} -> {dest}")
    digests, declared = download(url, dest, expected=source.pinned, timeout=timeout, progress=progress,
                                 verify=_verifier(r.name), what=f"{r.name} ({source.file})")
    cache.put(dest, digests)
    record_sum(dest.parent, dest.name, digests.sha256)
    if not source.pinned:
        if declared:
            log(f"  {source.file}: {', '.join(declared)} declared by the server verified")
        _announce_unpinned(source, dest.parent, digests.sha256, f"WEIGHTS['{r.name}']", log)
    return dest


def _fetch_data(r: Requirement, mirror, timeout: float, progress: bool, cache: DigestCache,
                log: Callable[[str], None]) -> list[Path]:
    out = []
    for source in r.sources:
        url = mirrored(source.url, mirror, source.file)
        if source.extract is None:  # a plain file (Fashion-MNIST)
            dest = r.root / source.subdir / source.file
            if dest.is_file() and _compare(dest, source.pinned, cache, True, "")[0]:
                continue
            log(f"data {r.name}: {url} -> {dest}")
            digests, _ = download(url, dest, expected=source.pinned, timeout=timeout, progress=progress,
                                  what=source.file)
            cache.put(dest, digests)
            out.append(dest)
            continue
        archive = r.root / DOWNLOADS / source.file
        if archive.is_file() and source.pinned and _compare(archive, source.pinned, cache, True, "")[0]:
            log(f"data {r.name}: using {archive} (checksum verified)")
            digests = cache.digests(archive)
        else:
            log(f"data {r.name}: {url} -> {archive}")
            digests, _ = download(url, archive, expected=source.pinned, timeout=timeout, progress=progress,
                                  what=source.file)
        marker = {"archive": source.file, "url": url, "md5": digests.md5, "sha256": digests.sha256,
                  "fetched": now(), "checksum_source": source.checksum_source}
        folder = extract(archive, r.root, source.extract, progress=progress, marker=marker)
        record_sum(archive.parent, archive.name, digests.sha256)
        archive.unlink()
        log(f"  extracted {folder} (archive removed; its sha256 is kept in {archive.parent / SUMS})")
        out.append(folder)
    return out


def fetch(reqs: Iterable[Requirement], *, mirror: str | os.PathLike | None = None, progress: bool = True,
          timeout: float = DEFAULT_TIMEOUT, log: Callable[[str], None] = print) -> list[Path]:
    """Download, verify and put in place every missing or damaged requirement (module docstring);
    what is already there and intact is left alone. With `mirror`, each file comes from
    `<mirror>/<file>` (a URL or a folder). Returns what was written. Raises `FetchError` (network,
    checksum, unsafe archive; nothing incomplete is left) or `NotReadyError` (a piece no source
    provides, or a damaged data folder fetch will not overwrite), before downloading anything for
    the latter."""
    reqs = list(reqs)
    problems = check(reqs)
    blocked = [p for p in problems if not p.requirement.sources
               or (p.state == "damaged" and p.requirement.kind == "data")]
    if blocked:
        raise NotReadyError("fetch cannot provide: " + "; ".join(
            p.line() + ("" if p.requirement.sources else
                        f" (get it yourself: {get_spec(p.requirement.name).download_hint})")
            for p in blocked))
    cache = digest_cache()
    written: list[Path] = []
    for p in problems:
        r = p.requirement
        r.root.mkdir(parents=True, exist_ok=True)
        if r.kind == "weights":
            written.append(_fetch_weights(r, mirror, timeout, progress, cache, log))
        else:
            written += _fetch_data(r, mirror, timeout, progress, cache, log)
    left = check(reqs)
    if left:  # e.g. an archive that does not hold what the readers need
        raise NotReadyError(format_problems(left))
    return written
