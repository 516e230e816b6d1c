"""``base`` on a disk: the machine's own qcow2 overlay over a (pulled) base image, in the
machine's folder (``state:``), grown to ``size``; the base is never written."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from vmrun.block.options import open_disk_from
from vmrun.config import ConfigError, load_machine
from vmrun.testing import kernels

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(base)], check=True,
                   capture_output=True)
    return base


def machine(tmp_path: Path, disk: str) -> Path:
    (tmp_path / "vmlinux").write_bytes(kernels.pvh_elf("poweroff"))
    f = tmp_path / "m.toml"
    f.write_text(f'name = "cloudy"\n[boot]\nkernel = "vmlinux"\n[devices.disk]\n'
                 f'model = "virtio-blk"\n{disk}\n')
    return f


def error_of(f: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_machine(f)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_overlay_is_made_in_the_machines_folder_and_grown(tmp_path: Path) -> None:
    base = _base(tmp_path)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    cfg = load_machine(machine(tmp_path, f'path = "state:disk.qcow2"\nbase = "{base}"\n'
                                         'size = "64M"'))
    opts = cfg.devices["disk"].options
    overlay = tmp_path / "data" / "vmrun" / "machines" / "cloudy" / "disk.qcow2"
    assert opts["path"] == overlay and not overlay.exists()
    created: list[Path] = []
    with open_disk_from(opts, created) as disk:
        assert disk.size == 64 * MiB
    assert created == [overlay]
    info = subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                          capture_output=True, text=True, check=True).stdout
    assert f'"backing-filename": "{base}"' in info and '"virtual-size": 67108864' in info
    got = subprocess.run(["qemu-io", "-c", "read -P 0x5a 0 1M", str(overlay)],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in got.stdout and got.returncode == 0
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", str(overlay)], check=True,
                   capture_output=True)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    # The next up continues the same disk: an existing overlay is opened, not remade.
    cfg = load_machine(tmp_path / "m.toml")
    with open_disk_from(cfg.devices["disk"].options, created := []):
        pass
    assert created == []
    got = subprocess.run(["qemu-io", "-c", "read -P 0x11 0 64k", str(overlay)],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in got.stdout


@pytest.mark.parametrize("disk, expected", [
    ('path = "state:d.qcow2"\nbase = "missing.qcow2"', "devices.disk.base: "),
    ('path = "state:d.qcow2"\nbase = "image:ubuntu-24.04/disk.qcow2"',
     "base image does not exist (not pulled yet: run `vmrun image pull ubuntu-24.04`; "
     "vmrun up pulls it)"),
    ('path = "state:d.qcow2"\nbase = "BASE"\nro = true', "devices.disk.base: base makes a "
                                                         "writable overlay"),
    ('path = "state:d.qcow2"\nbase = "BASE"\nsparse = true', "devices.disk.base: base makes "
                                                            "a qcow2 overlay; it cannot be "
                                                            "sparse"),
    ('path = "state:d.qcow2"\nbase = "BASE"\nsize = "16M"', "devices.disk.size: size 16777216 "
                                                           "is smaller than the base image"),
    ('path = "BASE"\nbase = "BASE"', "path and base are the same file"),
    ('path = "state:../escape.qcow2"\nbase = "BASE"', "devices.disk.path: must be "
                                                      "state:NAME/FILE inside that folder"),
])
def test_bad_overlays_are_one_line(tmp_path: Path, disk: str, expected: str) -> None:
    base = _base(tmp_path)
    msg = error_of(machine(tmp_path, disk.replace("BASE", str(base))))
    assert expected in msg, msg
