"""From nothing on disk to a sweep: the check names every missing piece at once; fetch downloads
synthetic archives in the real formats from a local HTTP server (127.0.0.1, as a --mirror), verifies
and extracts them, and a 2-task sweep runs on what it fetched; a wrong checksum, an interrupted
transfer and an unsafe archive are refused and leave nothing that looks complete. No test reaches
the outside network: every source URL points at a closed local port and the files come from the
mirror."""
from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

import run_suite
from benchmarks import cifar100, cub200, imagenet_r
from benchmarks.synthetic import write_cifar100, write_cub200, write_imagenet_r
from leaderboard.store import RunStore
from methods import backbones
from protocols import download, prepare, sources
from protocols.errors import USER_ERRORS, NotReadyError
from protocols.download import FetchError
from protocols.runner import RunOptions
from protocols.sweep import SweepRequest, plan

torch.set_num_threads(1)
NOWHERE = "http://127.0.0.1:9/never-contacted/"  # the discard port: a fetch that ignores the mirror fails


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tar_folder(folder: Path, archive: Path, extra: dict[str, bytes] | None = None) -> Path:
    mode = "w:gz" if archive.name.endswith(("gz", "tgz")) else "w"
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=folder.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        Server.requests.append(self.path)


class Server:
    requests: list[str] = []


@pytest.fixture()
def mirror(tmp_path):
    """A folder served on 127.0.0.1 (a thread of http.server); yields (folder, base URL)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    Server.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def archives(tmp_path, mirror, monkeypatch):
    """The three real archives' layouts, tiny, on the mirror, pinned in the catalog by their md5."""
    folder, _ = mirror
    build = tmp_path / "build"
    write_cifar100(build, train_per_class=2, test_per_class=1)
    write_imagenet_r(build, per_class=4)
    write_cub200(build, num_classes=4, per_class=4)
    made = {
        "cifar100": tar_folder(build / "cifar-100-python", folder / "cifar-100-python.tar.gz"),
        "imagenet_r": tar_folder(build / "imagenet-r", folder / "imagenet-r.tar"),
        # the real archive holds attributes.txt beside CUB_200_2011/
        "cub200": tar_folder(build / "CUB_200_2011", folder / "CUB_200_2011.tgz",
                             {"attributes.txt": b"1 has_bill_shape::curved\n"}),
    }
    contents = {f: md5(build / "cifar-100-python" / f) for f in cifar100.FILES}
    for name, path in made.items():
        real = sources.DATA[name][0]
        monkeypatch.setitem(sources.DATA, name, (replace(
            real, url=NOWHERE + path.name, md5=md5(path),
            contents_md5=contents if name == "cifar100" else {}),))
    return made


def protocol(tmp_path, name, dataset, tasks, extra=""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ndataset: {dataset}\nnum_tasks: {tasks}\nbackbones: [tiny]\n{extra}")
    return str(path)


@pytest.fixture()
def no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTCL_CACHE", str(tmp_path / "cache"))


def test_fetch_from_a_local_mirror_check_and_a_two_task_sweep(tmp_path, mirror, archives, no_cache):
    _, url = mirror
    data = tmp_path / "data"
    protos = [protocol(tmp_path, "c2", "cifar100", 2, "subsample: {train_per_class: 2, test_per_class: 1}\n"
                       "methods:\n  head_only: {epochs: 1}\n"),
              protocol(tmp_path, "r2", "imagenet_r", 3, "split: stratified\n"),
              protocol(tmp_path, "b2", "cub200", 2)]
    reqs = prepare.requirements(protos, "default", data, tmp_path / "weights")
    missing = prepare.check(reqs)
    assert {p.requirement.name for p in missing} == {"cifar100", "imagenet_r", "cub200"}

    lines: list[str] = []
    written = prepare.fetch(reqs, mirror=url, progress=False, log=lines.append)
    assert sorted(Server.requests) == ["/CUB_200_2011.tgz", "/cifar-100-python.tar.gz", "/imagenet-r.tar"]
    assert set(written) == {data / "cifar-100-python", data / "imagenet-r", data / "CUB_200_2011"}
    assert prepare.check(reqs) == []
    # the layout the readers expect, and only the archive's data folder (not attributes.txt)
    assert cifar100.find_dir(data) == data / "cifar-100-python"
    assert imagenet_r.find_dir(data) == data / "imagenet-r" and cub200.find_dir(data) == data / "CUB_200_2011"
    assert not (data / "attributes.txt").exists()
    # archives removed once extracted, their sha256 kept; nothing half-made left behind
    sums = prepare.read_sums(data / prepare.DOWNLOADS)
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in archives.values()}
    assert not [p for p in data.rglob("*") if p.name.endswith((".part", ".extracting")) or
                p.suffix in (".tar", ".tgz", ".gz")]
    states = {s.requirement.name: s for s in prepare.inspect(reqs) if s.requirement.kind == "data"}
    assert all(s.checksum.startswith("fetched ") for s in states.values())  # the archives' md5, verified
    # a second fetch finds everything there and downloads nothing
    Server.requests.clear()
    assert prepare.fetch(reqs, mirror=url, progress=False, log=lines.append) == []
    assert Server.requests == []

    # a 2-task sweep on the fetched CIFAR-100 files, through the CLI's existing flags
    store = tmp_path / "runs.sqlite"
    assert run_suite.main(["--protocols", protos[0], "--data-root", str(data), "--store", str(store),
                           "--methods", "head_only", "--seeds", "1", "--quiet", "--workers", "1",
                           "--threads", "1", "--no-render"]) == 0
    (record,) = RunStore(store).records()
    assert record["status"] == "ok" and len(record["acc_matrix"]) == 2


def test_check_verify_hashes_and_catches_a_damaged_file(tmp_path, mirror, archives, no_cache):
    _, url = mirror
    data = tmp_path / "data"
    reqs = prepare.requirements([protocol(tmp_path, "c2", "cifar100", 2)], "default", data, None)
    prepare.fetch(reqs, mirror=url, progress=False, log=lambda _: None)
    state = prepare.inspect(reqs, verify=True)[0]
    assert state.requirement.name == "cifar100" and state.ok and state.checksum.startswith("verified (md5 by torchvision)")
    test = data / "cifar-100-python" / "test"
    test.write_bytes(test.read_bytes()[:-1] + b"\0")  # same size, new mtime: the cache no longer applies
    assert prepare.inspect(reqs)[0].ok  # not hashed unless asked ...
    (bad,) = prepare.check(reqs, verify=True)  # ... and caught when asked
    assert bad.state == "damaged" and bad.path == test and "md5 mismatch" in bad.checksum
    with pytest.raises(NotReadyError, match="move it away"):
        prepare.fetch(reqs, mirror=url, progress=False, log=lambda _: None)


def _nothing_complete(root: Path) -> None:
    """No file under `root` but hidden, empty leftovers: nothing a reader or a check could take."""
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert files == [], files


def test_a_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, mirror, archives, monkeypatch, no_cache):
    _, url = mirror
    real = sources.DATA["cifar100"][0]
    monkeypatch.setitem(sources.DATA, "cifar100", (replace(real, md5="0" * 32),))
    data = tmp_path / "data"
    reqs = prepare.requirements([protocol(tmp_path, "c2", "cifar100", 2)], "default", data, None)
    with pytest.raises(FetchError, match="checksum mismatch.*md5.*expected 0{32}.*nothing was kept"):
        prepare.fetch(reqs, mirror=url, progress=False, log=lambda _: None)
    _nothing_complete(data)
    assert isinstance(FetchError("x"), USER_ERRORS)


class Truncating(Quiet):
    """Announces the whole file, sends half of it, and hangs up: an interrupted transfer."""

    def do_GET(self):
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


def test_an_interrupted_transfer_is_refused_and_leaves_nothing(tmp_path, mirror, archives, no_cache):
    folder, _ = mirror
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Truncating, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        data = tmp_path / "data"
        reqs = prepare.requirements([protocol(tmp_path, "c2", "cifar100", 2)], "default", data, None)
        with pytest.raises(FetchError, match="interrupted|failed after"):
            prepare.fetch(reqs, mirror=f"http://127.0.0.1:{httpd.server_address[1]}", progress=False,
                          log=lambda _: None, timeout=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
    _nothing_complete(data)


def test_no_network_is_one_clear_error_within_the_timeout(tmp_path, no_cache):
    with pytest.raises(FetchError, match=r"download from http://127\.0\.0\.1:9/x.*failed after 0 bytes.*--mirror"):
        download.download("http://127.0.0.1:9/x", tmp_path / "x.bin", timeout=2, progress=False)
    _nothing_complete(tmp_path)


@pytest.mark.parametrize("name, why", [("../evil.txt", "'..'"), ("/etc/evil", "absolute"),
                                       ("cifar-100-python/link", "a link")])
def test_an_unsafe_archive_is_refused_before_anything_is_extracted(tmp_path, name, why):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        ok = tarfile.TarInfo("cifar-100-python/train")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        bad = tarfile.TarInfo(name)
        if why == "a link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            bad.size = 3
        tar.addfile(bad, io.BytesIO(b"xyz"))
    root = tmp_path / "root"
    with pytest.raises(FetchError, match=f"{why}.*refused"):
        download.extract(archive, root, "cifar-100-python", progress=False)
    _nothing_complete(root)
    assert not (tmp_path / "evil.txt").exists()


def test_a_mirror_is_a_flat_folder_of_file_names(tmp_path):
    url = sources.DATA["cifar100"][0].url
    assert download.mirrored(url, None, "x") == url
    assert download.mirrored(url, "http://m.lab/cl/", "cifar-100-python.tar.gz") == \
        "http://m.lab/cl/cifar-100-python.tar.gz"
    assert download.mirrored(url, tmp_path, "ViT-B_16.npz") == (tmp_path / "ViT-B_16.npz").resolve().as_uri()


def test_server_declared_checksums_are_read():
    sha = "ab" * 32
    assert download.declared_checksums([{"X-Linked-Etag": f'"{sha}"'}, {"ETag": '"deadbeef"'}]) == {"sha256": sha}
    assert download.declared_checksums([{"x-goog-hash": "crc32c=AAAA==,md5=1B2M2Y8AsgTpgAmY7PhCfg=="}]) == \
        {"md5": "d41d8cd98f00b204e9800998ecf8427e"}


# ------------------------------------------------------------------ checkpoints


@pytest.fixture()
def small_backbone(monkeypatch):
    """A backbone `mini` (the tiny architecture) with a catalog entry that pins no checksum."""
    spec = replace(backbones.get_spec("tiny"), name="mini", files=("mini.pt",), shipped=False,
                   download_hint="mini.pt from a test")
    monkeypatch.setitem(backbones.BACKBONES, "mini", spec)
    monkeypatch.setitem(sources.WEIGHTS, "mini", sources.Source("mini.pt", NOWHERE + "mini.pt", "none published"))


def test_a_checkpoint_without_a_published_checksum_is_kept_only_if_it_loads(
        tmp_path, mirror, small_backbone, no_cache):
    folder, url = mirror
    weights = tmp_path / "weights"
    reqs = prepare.requirements([], ["mini"], tmp_path / "data", weights)
    (folder / "mini.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(FetchError, match="does not load.*nothing was kept"):
        prepare.fetch(reqs, mirror=url, progress=False, log=lambda _: None)
    _nothing_complete(weights)

    torch.save(backbones.build_architecture("tiny").state_dict(), folder / "mini.pt")
    lines: list[str] = []
    assert prepare.fetch(reqs, mirror=url, progress=False, log=lines.append) == [weights / "mini.pt"]
    sha = hashlib.sha256((folder / "mini.pt").read_bytes()).hexdigest()
    assert prepare.read_sums(weights) == {"mini.pt": sha}
    assert any(f"recorded sha256 {sha}" in line and "protocols/sources.py" in line for line in lines)
    (state,) = prepare.inspect(reqs)
    assert state.ok and state.checksum.startswith("verified (sha256 recorded in")
    assert backbones.load("mini", str(weights)).sha256 == sha


def test_a_users_copy_comes_in_through_a_folder_mirror(tmp_path, small_backbone, no_cache):
    """The case of ViT-B_16.npz when its original location no longer serves it."""
    copy = tmp_path / "from-a-colleague"
    copy.mkdir()
    torch.save(backbones.build_architecture("tiny").state_dict(), copy / "mini.pt")
    reqs = prepare.requirements([], "mini", tmp_path / "data", tmp_path / "w")
    assert prepare.fetch(reqs, mirror=copy, progress=False, log=lambda _: None) == [tmp_path / "w" / "mini.pt"]


# ------------------------------------------------------------------ the check before a sweep


def test_a_sweep_on_the_three_real_protocols_with_nothing_present_names_every_piece_at_once(
        tmp_path, monkeypatch, no_cache):
    """One message: every data set and backbone, the runs that need them, every path looked at and
    the fetch command; nothing read, hashed or written."""
    monkeypatch.chdir(tmp_path)  # the relative pretrained/ fallback is looked at here
    monkeypatch.setattr(download, "file_digests", lambda p: pytest.fail(f"hashed {p}"))
    specs = plan(SweepRequest(protocols=["cifar100-10t", "imagenet-r-10t", "cub200-10t"],
                              backbones="default", methods=["smope", "l2p"], seeds=5))
    options = RunOptions(data_root=str(tmp_path / "data"), weights_dir=str(tmp_path / "w"))
    with pytest.raises(NotReadyError) as e:
        prepare.require(prepare.requirements_for_runs(specs, options))
    msg = str(e.value)
    assert msg.count("\n  - ") == 5  # three data sets, two backbones: each once
    for piece in ("data CIFAR-100 (for cifar100-10t)", "data ImageNet-R (for imagenet-r-10t)",
                  "data CUB-200-2011 (for cub200-10t)", "weights sup21k (for cifar100-10t sup21k, cub200-10t sup21k)",
                  "weights sup1k (for imagenet-r-10t sup1k)",
                  str(tmp_path / "data" / "cifar-100-python"), str(tmp_path / "data" / "imagenet-r"),
                  str(tmp_path / "data" / "CUB_200_2011"),
                  str(tmp_path / "w" / "vit_base_patch16_224.augreg_in21k.safetensors"),
                  str(tmp_path / "w" / "vit_base_patch16_224_augreg2_in21k_ft_in1k.bin"),
                  "fetch them with: python run_suite.py fetch --protocols cifar100-10t,imagenet-r-10t,cub200-10t "
                  f"--backbones sup21k,sup1k --data-root {tmp_path / 'data'} --weights-dir {tmp_path / 'w'}"):
        assert piece in msg, piece
    paths = [p for p in msg.split() if p.startswith(str(tmp_path / "w"))]
    assert len(paths) == len(set(paths)), "a path listed twice"
    assert isinstance(e.value, USER_ERRORS)
    assert list(tmp_path.iterdir()) == []


def test_options_that_fetch_by_themselves_need_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = plan(SweepRequest(protocols=["cifar100-10t"], backbones=["sup21k"], methods=["l2p"], seeds=1))
    base = RunOptions(data_root=str(tmp_path), weights_dir=str(tmp_path))
    names = {r.name for r in prepare.requirements_for_runs(specs, base)}
    assert names == {"cifar100", "sup21k"}
    assert {r.name for r in prepare.requirements_for_runs(specs, replace(base, random_init=True))} == {"cifar100"}
    assert {r.name for r in prepare.requirements_for_runs(specs, replace(base, allow_download=True))} == {"cifar100"}
