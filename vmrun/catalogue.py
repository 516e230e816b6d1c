"""The built-in catalogue of distribution cloud images, and pulling them into the cache.

Each entry names where the distribution publishes its x86_64 cloud image, the checksum list it
publishes beside it (which every file is verified against before it is used), and, for direct
kernel boot, the kernel and initrd (Ubuntu publishes them unpacked beside the image). A pulled
image lives in the cache as ``~/.cache/vmrun/images/NAME/`` with fixed file names that machine
files use: ``image:ubuntu-24.04/disk.qcow2``, ``image:ubuntu-24.04/vmlinuz``,
``image:ubuntu-24.04/initrd``.

``VMRUN_IMAGE_MIRROR`` replaces every entry's base URL by ``MIRROR/NAME/`` (an ``http(s)://``
or ``file://`` URL laid out like the distribution's folder): offline hosts and CI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmrun.download import Progress, download, fetch_bytes, parse_sums, part_path
from vmrun.errors import VmrunError
from vmrun.image import image_dir

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a catalogue image: where it is below the base URL, the checksum list that
    covers it (below the base URL too), and its name in the cache."""

    remote: str
    sums: str
    local: str


@dataclass(frozen=True)
class CatalogueImage:
    name: str
    title: str
    base: str
    files: tuple[RemoteFile, ...]
    #: The kernel command line's root for direct kernel boot.
    root: str = "LABEL=cloudimg-rootfs"
    #: The user cloud-init creates when the machine file names none.
    default_user: str = "ubuntu"
    #: Take the kernel and initrd from the image's own /boot (a distribution that publishes
    #: none beside its image): (glob of the kernel, glob of the initrd) in /boot.
    extract_boot: tuple[str, str] | None = None

    def url(self, path: str) -> str:
        mirror = os.environ.get("VMRUN_IMAGE_MIRROR")
        base = f"{mirror.rstrip('/')}/{self.name}/" if mirror else self.base
        return base + path


def _ubuntu(version: str, codename: str) -> CatalogueImage:
    stem = f"{codename}-server-cloudimg-amd64"
    return CatalogueImage(
        f"ubuntu-{version}", f"Ubuntu {version} LTS ({codename}) server cloud image",
        f"https://cloud-images.ubuntu.com/{codename}/current/",
        (RemoteFile(f"{stem}.img", "SHA256SUMS", "disk.qcow2"),
         RemoteFile(f"unpacked/{stem}-vmlinuz-generic", "unpacked/SHA256SUMS", "vmlinuz"),
         RemoteFile(f"unpacked/{stem}-initrd-generic", "unpacked/SHA256SUMS", "initrd")))


CATALOGUE: dict[str, CatalogueImage] = {
    img.name: img for img in (
        _ubuntu("24.04", "noble"),
        _ubuntu("22.04", "jammy"),
        # Debian publishes no unpacked kernel: the pull copies the kernel and initrd out of
        # the image's own /boot (its root partition, read through vmrun's qcow2 backend).
        CatalogueImage(
            "debian-12", "Debian 12 (bookworm) generic cloud image",
            "https://cloud.debian.org/images/cloud/bookworm/latest/",
            (RemoteFile("debian-12-genericcloud-amd64.qcow2", "SHA512SUMS", "disk.qcow2"),),
            root="/dev/vda1", default_user="debian",
            extract_boot=("vmlinuz-*", "initrd.img-*")),
    )
}


def lookup(name: str) -> CatalogueImage:
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join(sorted(CATALOGUE))
        raise VmrunError(f"no image {name!r} in the catalogue (known: {known})") from None


def is_pulled(img: CatalogueImage) -> bool:
    d = image_dir(img.name)
    extra = ["vmlinuz", "initrd"] if img.extract_boot else []
    return all((d / f).exists() for f in [*(f.local for f in img.files), *extra])


def _algorithm(sums: str) -> str:
    base = Path(sums).name.upper()
    for alg in ("SHA512", "SHA256"):
        if base.startswith(alg):
            return alg.lower()
    raise VmrunError(f"{sums}: unknown checksum list (SHA256SUMS or SHA512SUMS)")


def pull(name: str, progress: Callable[[str], Progress] | None = None) -> Path:
    """Download what is missing of catalogue image ``name`` (resuming partial files) and
    return its cache folder. ``progress(label)`` gives a callback per file."""
    img = lookup(name)
    d = image_dir(img.name)
    d.mkdir(parents=True, exist_ok=True)
    sums_cache: dict[str, str] = {}
    manifest = _read_manifest(d)
    for f in img.files:
        dest = d / f.local
        if dest.exists():
            continue
        if f.sums not in sums_cache:
            sums_url = img.url(f.sums)
            sums_cache[f.sums] = fetch_bytes(sums_url).decode(errors="replace")
        digest = parse_sums(sums_cache[f.sums], Path(f.remote).name)
        if digest is None:
            raise VmrunError(f"{img.url(f.sums)}: lists no checksum for {Path(f.remote).name}")
        alg = _algorithm(f.sums)
        url = img.url(f.remote)
        download(url, dest, algorithm=alg, digest=digest,
                 progress=progress(f"{img.name}/{f.local}") if progress else None)
        manifest[f.local] = {"url": url, alg: digest, "pulled": int(time.time())}
        _write_manifest(d, manifest)
    if img.extract_boot and not ((d / "vmlinuz").exists() and (d / "initrd").exists()):
        from vmrun.bootfiles import extract_boot_files

        names = extract_boot_files(d / "disk.qcow2", img.extract_boot, d)
        manifest["vmlinuz"] = {"from": f"disk.qcow2:/boot/{names[0]}"}
        manifest["initrd"] = {"from": f"disk.qcow2:/boot/{names[1]}"}
        _write_manifest(d, manifest)
    return d


def _read_manifest(d: Path) -> dict:
    try:
        return json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(d: Path, manifest: dict) -> None:
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, d / MANIFEST)


@dataclass(frozen=True)
class CachedImage:
    name: str
    files: dict[str, int]       # local name -> bytes (partial downloads as NAME.part)
    complete: bool

    @property
    def size(self) -> int:
        return sum(self.files.values())


def cached() -> list[CachedImage]:
    """What is in the image cache: catalogue images (complete or partly pulled) and built
    ones (``tiny``)."""
    root = image_dir("x").parent
    out = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {p.name: p.stat().st_size for p in sorted(d.iterdir())
                 if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
        img = CATALOGUE.get(d.name)
        complete = is_pulled(img) if img else bool(files)
        out.append(CachedImage(d.name, files, complete))
    return out


def remove(name: str) -> int:
    """Delete image ``name`` from the cache (partial downloads too); returns bytes freed."""
    d = image_dir(name)
    if name in ("", ".", "..") or "/" in name or not d.is_dir():
        raise VmrunError(f"no image {name!r} in the cache ({d.parent})")
    freed = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    shutil.rmtree(d)
    return freed


def missing_parts(name: str) -> list[Path]:
    """The partial downloads of ``name`` (what the next pull resumes)."""
    img = lookup(name)
    d = image_dir(img.name)
    return [part_path(d / f.local) for f in img.files if part_path(d / f.local).exists()]


def referenced(text: str) -> list[str]:
    """The catalogue images a machine file's text names (``image:NAME/...``), in order."""
    import re

    names: list[str] = []
    for m in re.finditer(r"image:([A-Za-z0-9._-]+)/", text):
        if m.group(1) in CATALOGUE and m.group(1) not in names:
            names.append(m.group(1))
    return names
