"""``vmrun image pull`` against a mirror the test serves on loopback, laid out like the
distributions' folders: verified downloads, resume after a dropped connection (HTTP Range),
tampered files refused, nothing partial under a final name."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmrun import catalogue
from vmrun.download import parse_sums
from vmrun.errors import VmrunError

REPO = Path(__file__).resolve().parents[1]


class Mirror(http.server.ThreadingHTTPServer):
    """Serves ``root`` with Range support; ``drop_after`` closes the first transfer of a file
    after that many bytes; ``ignore_range`` answers every request with the whole file."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.drop_after: int | None = None
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        rng = self.headers.get("Range")
        self.server.requests.append((self.path, rng))
        p = self.server.root / self.path.lstrip("/")
        if not p.is_file():
            self.send_error(404)
            return
        data = p.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not self.server.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drop = self.server.drop_after
        if drop is not None and len(body) > drop:
            self.server.drop_after = None
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


def _layout(root: Path, name: str = "ubuntu-24.04", size: int = 3 << 20) -> dict[str, bytes]:
    img = catalogue.lookup(name)
    files = {}
    sums: dict[str, list[str]] = {}
    for i, f in enumerate(img.files):
        data = bytes([i + 1]) * 1000 + os.urandom(size // (i + 1))
        files[f.local] = data
        path = root / name / f.remote
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        alg = "sha512" if f.sums.endswith("SHA512SUMS") else "sha256"
        digest = hashlib.new(alg, data).hexdigest()
        sums.setdefault(f.sums, []).append(f"{digest} *{Path(f.remote).name}")
    for s, lines in sums.items():
        (root / name / s).write_text("\n".join(["0" * 64 + " *other.img", *lines]) + "\n")
    return files


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "mirror"
    server = Mirror(root)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("VMRUN_IMAGE_MIRROR", server.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("vmrun.download.RETRY_DELAY", 0.0)
    yield server
    server.shutdown()
    server.server_close()


def _cache(tmp_path: Path, name: str = "ubuntu-24.04") -> Path:
    return tmp_path / "cache" / "vmrun" / "images" / name


def test_pull_verifies_and_places_every_file(mirror: Mirror, tmp_path: Path) -> None:
    files = _layout(mirror.root)
    seen: dict[str, list[tuple[int, int | None]]] = {}
    d = catalogue.pull("ubuntu-24.04", lambda label: lambda done, total: seen.setdefault(
        label, []).append((done, total)))
    assert d == _cache(tmp_path)
    for local, data in files.items():
        assert (d / local).read_bytes() == data
    assert sorted(p.name for p in d.iterdir()) == sorted([*files, "manifest.json"])
    assert seen["ubuntu-24.04/disk.qcow2"][-1] == (len(files["disk.qcow2"]),) * 2
    assert catalogue.is_pulled(catalogue.lookup("ubuntu-24.04"))
    # A second pull finds everything there and fetches nothing.
    mirror.requests.clear()
    catalogue.pull("ubuntu-24.04")
    assert mirror.requests == []


def test_a_dropped_connection_is_resumed_with_range(mirror: Mirror, tmp_path: Path) -> None:
    files = _layout(mirror.root)
    mirror.drop_after = 1 << 20
    d = catalogue.pull("ubuntu-24.04")
    assert (d / "disk.qcow2").read_bytes() == files["disk.qcow2"]
    assert ("/ubuntu-24.04/noble-server-cloudimg-amd64.img", f"bytes={1 << 20}-") in \
        mirror.requests


def test_an_interrupted_pull_leaves_only_a_part_file_and_resumes(mirror: Mirror,
                                                                 tmp_path: Path,
                                                                 monkeypatch) -> None:
    files = _layout(mirror.root)
    monkeypatch.setattr("vmrun.download.RETRIES", 0)
    mirror.drop_after = 1 << 20
    with pytest.raises(VmrunError, match="gave up after 0 resumed attempts"):
        catalogue.pull("ubuntu-24.04")
    d = _cache(tmp_path)
    assert not (d / "disk.qcow2").exists()
    assert (d / "disk.qcow2.part").stat().st_size == 1 << 20
    monkeypatch.setattr("vmrun.download.RETRIES", 5)
    catalogue.pull("ubuntu-24.04")
    assert (d / "disk.qcow2").read_bytes() == files["disk.qcow2"]
    assert not list(d.glob("*.part"))


def test_a_server_without_range_support_restarts_the_file(mirror: Mirror,
                                                          tmp_path: Path) -> None:
    files = _layout(mirror.root)
    d = _cache(tmp_path)
    d.mkdir(parents=True)
    (d / "disk.qcow2.part").write_bytes(b"garbage from an older, different file")
    mirror.ignore_range = True
    catalogue.pull("ubuntu-24.04")
    assert (d / "disk.qcow2").read_bytes() == files["disk.qcow2"]


def test_a_tampered_file_is_refused_and_removed(mirror: Mirror, tmp_path: Path) -> None:
    _layout(mirror.root)
    p = mirror.root / "ubuntu-24.04" / "noble-server-cloudimg-amd64.img"
    data = bytearray(p.read_bytes())
    data[5000] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(VmrunError, match=r"sha256 checksum mismatch .*the download was removed"):
        catalogue.pull("ubuntu-24.04")
    d = _cache(tmp_path)
    assert not (d / "disk.qcow2").exists() and not (d / "disk.qcow2.part").exists()


def test_a_file_missing_from_the_checksum_list_is_refused(mirror: Mirror) -> None:
    _layout(mirror.root)
    (mirror.root / "ubuntu-24.04" / "SHA256SUMS").write_text("0" * 64 + " *other.img\n")
    with pytest.raises(VmrunError, match="lists no checksum for noble-server-cloudimg"):
        catalogue.pull("ubuntu-24.04")


def test_sha512_lists_and_file_mirrors(tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    # (random bytes are no disk to take a kernel from: that is the next test's business)
    monkeypatch.setitem(catalogue.CATALOGUE, "debian-12", dataclasses.replace(
        catalogue.CATALOGUE["debian-12"], extract_boot=None))
    root = tmp_path / "mirror"
    files = _layout(root, "debian-12")
    monkeypatch.setenv("VMRUN_IMAGE_MIRROR", root.as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = catalogue.pull("debian-12")
    assert (d / "disk.qcow2").read_bytes() == files["disk.qcow2"]


def test_unreachable_mirror_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VMRUN_IMAGE_MIRROR", "http://127.0.0.1:9")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(VmrunError, match=r"127\.0\.0\.1:9/ubuntu-24\.04/SHA256SUMS: cannot "
                                         r"connect"):
        catalogue.pull("ubuntu-24.04")


@pytest.mark.parametrize("text, digest", [
    ("ab" * 32 + " *noble.img\n", "ab" * 32),
    ("ab" * 32 + "  ./noble.img\n", "ab" * 32),
    ("SHA256 (noble.img) = " + "CD" * 32 + "\n", "cd" * 32),
    ("ab" * 32 + " *noble.img.part\n", None),
])
def test_checksum_list_formats(text: str, digest: str | None) -> None:
    assert parse_sums(text, "noble.img") == digest


def _vmrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env, "PYTHONPATH": str(REPO)})


def test_cli_pull_ls_rm(mirror: Mirror, tmp_path: Path) -> None:
    _layout(mirror.root, size=1 << 20)
    env = {"VMRUN_IMAGE_MIRROR": mirror.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = _vmrun(["image", "pull", "ubuntu-24.04"], env)
    assert out.returncode == 0, out.stderr
    ls = _vmrun(["image", "ls"], env)
    assert re.search(r"ubuntu-24\.04\s+[\d.]+ MiB\s+ready", ls.stdout), ls.stdout
    assert re.search(r"debian-12\s+-\s+not pulled", ls.stdout)
    out = _vmrun(["image", "rm", "ubuntu-24.04"], env)
    assert out.returncode == 0 and "removed ubuntu-24.04" in out.stderr
    assert not _cache(tmp_path).exists()


def test_cli_errors_are_one_line(mirror: Mirror, tmp_path: Path) -> None:
    env = {"VMRUN_IMAGE_MIRROR": mirror.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = _vmrun(["image", "pull", "fedora"], env)
    assert out.returncode == 4 and out.stderr.strip().splitlines() == [
        "vmrun: no image 'fedora' in the catalogue (known: debian-12, ubuntu-22.04, "
        "ubuntu-24.04)"]
    _layout(mirror.root, size=1 << 20)
    (mirror.root / "ubuntu-24.04" / "unpacked" / "noble-server-cloudimg-amd64-initrd-generic"
     ).write_bytes(b"tampered")
    out = _vmrun(["image", "pull", "ubuntu-24.04"], env)
    assert out.returncode == 4, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch" in lines[0], out.stderr
    assert not list(_cache(tmp_path).glob("initrd*"))
    out = _vmrun(["image", "rm", "nothing-here"], env)
    assert out.returncode == 4 and "no image 'nothing-here' in the cache" in out.stderr


def test_up_pulls_what_the_machine_file_names(mirror: Mirror, tmp_path: Path) -> None:
    """`vmrun check` says the image is not pulled; `vmrun up` pulls it, then boots it."""
    from vmrun.testing import kernels

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    files = _layout(mirror.root, size=1 << 16)
    kernel = kernels.pvh_elf("poweroff")
    stem = mirror.root / "ubuntu-24.04" / "unpacked" / "noble-server-cloudimg-amd64"
    Path(f"{stem}-vmlinuz-generic").write_bytes(kernel)
    sums = mirror.root / "ubuntu-24.04" / "unpacked" / "SHA256SUMS"
    sums.write_text("\n".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()} *{p.name}"
        for p in sorted(sums.parent.iterdir()) if p.name != "SHA256SUMS") + "\n")
    m = tmp_path / "m.toml"
    m.write_text('name = "pulled"\nmemory = "64M"\n[boot]\nkernel = "image:ubuntu-24.04/vmlinuz"'
                 '\ninitrd = "image:ubuntu-24.04/initrd"\n[serial.com1]\nbackend = "null"\n')
    env = {"VMRUN_IMAGE_MIRROR": mirror.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = _vmrun(["check", str(m)], env)
    assert out.returncode == 4 and "is not pulled yet: run `vmrun image pull ubuntu-24.04` " \
        "(vmrun up pulls it)" in out.stderr
    out = _vmrun(["up", str(m)], env)
    assert out.returncode == 1, out.stderr                 # the kernel powers off
    assert "pulling ubuntu-24.04 (first use)" in out.stderr
    d = _cache(tmp_path)
    assert (d / "vmlinuz").read_bytes() == kernel
    assert (d / "initrd").read_bytes() == files["initrd"]


def test_debian_pull_takes_the_kernel_from_the_images_own_boot(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Debian publishes no kernel beside its image: the pull reads the qcow2 image's GPT,
    finds the Linux partition and copies the newest /boot kernel and initrd out."""
    from tests.e2e.harness import make_ext4, make_gpt_disk

    root = tmp_path / "mirror" / "debian-12"
    root.mkdir(parents=True)
    files = {"boot/vmlinuz-6.1.0-9-amd64": b"old kernel", "boot/vmlinuz-6.1.0-10-amd64":
             b"new kernel" * 1000, "boot/initrd.img-6.1.0-10-amd64": b"new initrd" * 500,
             "boot/initrd.img-6.1.0-9-amd64": b"old initrd", "etc/hostname": b"debian\n"}
    make_ext4(tmp_path / "root.fs", 16, files, "root")
    make_gpt_disk(tmp_path / "disk.raw", tmp_path / "root.fs")
    image = root / "debian-12-genericcloud-amd64.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
                    str(tmp_path / "disk.raw"), str(image)], check=True)
    digest = hashlib.sha512(image.read_bytes()).hexdigest()
    (root / "SHA512SUMS").write_text(f"{digest}  {image.name}\n")
    monkeypatch.setenv("VMRUN_IMAGE_MIRROR", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = catalogue.pull("debian-12")
    assert (d / "vmlinuz").read_bytes() == files["boot/vmlinuz-6.1.0-10-amd64"]
    assert (d / "initrd").read_bytes() == files["boot/initrd.img-6.1.0-10-amd64"]
    assert catalogue.is_pulled(catalogue.lookup("debian-12"))
    assert not list(d.glob(".extract-*"))


def test_an_image_without_the_boot_files_is_one_line(tmp_path: Path) -> None:
    from tests.e2e.harness import make_ext4, make_gpt_disk
    from vmrun.bootfiles import extract_boot_files

    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(1 << 20))
    with pytest.raises(VmrunError, match="the image has no GPT partition table"):
        extract_boot_files(raw, ("vmlinuz-*", "initrd.img-*"), tmp_path)
    make_ext4(tmp_path / "root.fs", 8, {"etc/hostname": b"x\n"}, "root")
    make_gpt_disk(tmp_path / "disk.raw", tmp_path / "root.fs")
    with pytest.raises(VmrunError, match=r"no /boot/vmlinuz-\* and /boot/initrd.img-\* on any"):
        extract_boot_files(tmp_path / "disk.raw", ("vmlinuz-*", "initrd.img-*"), tmp_path)
