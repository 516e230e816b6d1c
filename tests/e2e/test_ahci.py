"""AHCI end to end: the default Linux guest (initramfs, busybox shell) with three AHCI
controllers, in the shared device boot (tests/e2e/conftest.py).

- ``ahci-hd``: a 64 MiB raw disk with 512-byte logical, 4 KiB physical sectors;
- ``ahci-cd``: an ISO 9660 image made on the host with ``xorriso``;
- ``ahci``: two ports, an ext4 disk and an empty CD drive.

Linux's ``ahci`` must probe all of them (sd, sr, NCQ depth 32, 6 Gbps links, MSI). In the
shell the guest reports the block devices' sysfs figures, mounts the CD, copies a file from it
onto the raw disk with ``dd``, discards a range of that disk (TRIM), and mounts the ext4 disk
read-write to read one file and write another. Every verdict on data is the host's: it reads
the images back after the guest powered off (bytes copied, zeros where TRIM went, ``e2fsck``
clean, the guest's file in the ext4 image through ``debugfs``).

The file is in three parts, so the checks can join a shared boot: :func:`ahci_devices`
(host-side set-up and the ``[devices.*]`` TOML), :func:`drive_ahci_shell` (what the guest
shell does) and the ``test_*`` checks on the boot's console and the host-side files.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.harness import POWEROFF, GuestRun, make_ext4

pytestmark = pytest.mark.e2e

HD_SECTORS = 131072             # 64 MiB in 512-byte sectors
EXT_SECTORS = 65536             # 32 MiB
PAYLOAD_AT = 1 << 20            # the guest dd's the CD's file to this offset of the disk
TRIM_AT, TRIM_LEN = 8 << 20, 1 << 20
EXT_TEXT = b"ahci-ext4-from-host\n"
GUEST_TEXT = b"written-by-guest\n"


@dataclass
class AhciSetup:
    dir: Path
    hd: Path
    iso: Path
    ext: Path
    payload: bytes


def ahci_devices(d: Path) -> tuple[str, AhciSetup]:
    """Make the images and return the ``[devices.*]`` fragment that uses them."""
    hd, iso, ext = d / "hd.img", d / "cd.iso", d / "ext.img"
    with open(hd, "wb") as f:
        for _ in range(64):
            f.write(b"\xaa" * (1 << 20))
    payload = os.urandom((1 << 20) + 4096)
    tree = d / "iso-root"
    tree.mkdir(exist_ok=True)
    (tree / "payload.bin").write_bytes(payload)
    (tree / "hello.txt").write_bytes(b"hello from the cd\n")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "VMRUNCD", "-o", str(iso),
                    str(tree)], check=True)
    make_ext4(ext, EXT_SECTORS // 2048, {"hello.txt": EXT_TEXT}, "ahciext")
    devices = f'''
[devices.sata0]
model = "ahci-hd"
path = "{hd}"
sectorsize = "512/4096"
serial = "VMRUN-E2E-HD"
[devices.cd0]
model = "ahci-cd"
path = "{iso}"
[devices.sata1]
model = "ahci"
ports = [{{type = "hd", path = "{ext}"}}, {{type = "cd"}}]
'''
    return devices, AhciSetup(d, hd, iso, ext, payload)


def drive_ahci_shell(run: GuestRun, poweroff: bool = True) -> list[str]:
    """At the guest's shell prompt: report, copy, discard, write. Each step ends with a token
    the shell computes (``$((6*7))``), so the echo of the command line never matches it. A
    step that times out is noted and the next one still runs (the checks say what is
    missing); the steps that did not finish are returned."""
    missed: list[str] = []

    def step(command: str, token: str, timeout: float = 300) -> None:
        run.send(command.encode() + b"\r")
        try:
            run.wait_for(token, timeout)
        except AssertionError:
            missed.append(token)

    # sysfs read by the shell itself (read, printf): a program per value cost minutes of
    # emulated kernel code here.
    step("r() { v=; read v <$1; printf '%s ' \"$v\"; } 2>/dev/null; "
         "for d in /sys/block/sd* /sys/block/sr*; do printf 'BLK %s ' ${d##*/}; r $d/size; "
         "r $d/queue/logical_block_size; r $d/queue/physical_block_size; "
         "r $d/device/queue_depth; r $d/queue/discard_max_bytes; echo; done; echo BLK-$((6*7))",
         r"BLK-42\s")
    step("grep -i ahci /proc/interrupts; echo IRQ-$((7*7))", r"IRQ-49\s")
    step(f"D=; E=; for d in /sys/block/sd*; do read s <$d/size; [ $s = {HD_SECTORS} ] && "
         f"D=${{d##*/}}; [ $s = {EXT_SECTORS} ] && E=${{d##*/}}; done; echo DISKS=$D,$E",
         r"DISKS=\w+,\w+")
    step("mkdir -p /mnt/cd /mnt/ext; for s in /dev/sr*; do mount -t iso9660 -o ro $s /mnt/cd "
         "2>/dev/null && echo CDMOUNT=$s && break; done; ls /mnt/cd; echo CDLS-$((8*7))",
         r"CDLS-56\s")
    step(f"dd if=/mnt/cd/payload.bin of=/dev/$D bs=4096 seek={PAYLOAD_AT // 4096} "
         "conv=fsync 2>/dev/null; echo DD-RC=$?", r"DD-RC=\d+")
    step(f"blkdiscard -o {TRIM_AT} -l {TRIM_LEN} /dev/$D; echo DISCARD-RC=$?",
         r"DISCARD-RC=\d+")
    step(f"mount -t ext4 /dev/$E /mnt/ext && cat /mnt/ext/hello.txt && echo "
         f"{GUEST_TEXT.decode().strip()} > /mnt/ext/guest.txt && umount /mnt/ext; "
         "echo EXT4-RC=$?", r"EXT4-RC=\d+")
    step("umount /mnt/cd; sync; echo SYNC-$((9*7))", r"SYNC-63\s")
    if poweroff:
        run.send(POWEROFF)
    return missed


@dataclass
class Boot:
    run: GuestRun
    setup: AhciSetup
    returncode: int
    missed: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def ahci_boot(devices_boot) -> Boot:
    """This module's part of the shared device boot (tests/e2e/conftest.py)."""
    return devices_boot.part("ahci")


def _blk(boot: Boot) -> dict[str, list[str]]:
    return {m.group(1): m.group(2).split() for m in
            re.finditer(r"^BLK (s[dr]\w+) ([^\r\n]*)", boot.run.text, re.M)}


def test_ahci_controllers_and_links_come_up(ahci_boot: Boot) -> None:
    text = ahci_boot.run.text
    assert len(re.findall(r"ahci \S+: AHCI 0001\.0300 32 slots \d ports 6 Gbps", text)) == 3
    assert len(re.findall(r"ata\d+: SATA link up 6\.0 Gbps \(SStatus 133 SControl 300\)",
                          text)) == 4
    assert not re.search(r"\bata\d+(\.\d+)?: .*(failed|error|timeout|exception)", text,
                         re.I), text[-3000:]


def test_disks_are_identified_with_ncq(ahci_boot: Boot) -> None:
    text = ahci_boot.run.text
    assert re.search(r"ata\d+\.00: ATA-8: VMRUN SATA DISK, 0\.1, max UDMA/133", text)
    assert re.search(rf"ata\d+\.00: {HD_SECTORS} sectors, multi 16: LBA48 NCQ \(depth 32\)",
                     text)
    assert re.search(r"sd \S+: \[sd\w\] 131072 512-byte logical blocks: \(67\.1 MB/64\.0 MiB\)",
                     text)
    assert re.search(r"sd \S+: \[sd\w\] 4096-byte physical blocks", text)


def test_cd_drives_are_probed(ahci_boot: Boot) -> None:
    text = ahci_boot.run.text
    assert len(re.findall(r"ata\d+\.00: ATAPI: VMRUN SATA DVD-ROM, 0\.1, max UDMA/133",
                          text)) == 2
    assert re.search(r"sr \S+: \[sr0\] scsi3-mmc drive", text)
    assert re.search(r"sr \S+: \[sr1\] scsi3-mmc drive", text)


def test_sysfs_sizes_and_queue_depth(ahci_boot: Boot) -> None:
    blk = _blk(ahci_boot)
    disks = {name: v for name, v in blk.items() if name.startswith("sd")}
    assert sorted(int(v[0]) for v in disks.values()) == [EXT_SECTORS, HD_SECTORS], blk
    hd = next(v for v in disks.values() if v[0] == str(HD_SECTORS))
    assert hd[1:4] == ["512", "4096", "32"], hd            # logical, physical, NCQ depth
    assert int(hd[4]) > 0                                  # TRIM offered to the block layer
    iso_blocks = ahci_boot.setup.iso.stat().st_size // 2048
    cds = [v for name, v in blk.items() if name.startswith("sr")]
    assert len(cds) == 2 and [str(iso_blocks * 4), "2048", "2048"] in [v[:3] for v in cds], blk


def test_interrupts_are_msi(ahci_boot: Boot) -> None:
    lines = re.findall(r"^\s*\d+:[^\r\n]*\bahci\b[^\r\n]*", ahci_boot.run.text, re.M)
    assert len(lines) == 3 and all("MSI" in line for line in lines), lines


def test_cd_mounts_and_its_file_reaches_the_disk(ahci_boot: Boot) -> None:
    text = ahci_boot.run.text
    assert re.search(r"CDMOUNT=/dev/sr\d", text)
    assert re.search(r"hello\.txt\s+payload\.bin", text) and "DD-RC=0" in text
    payload = ahci_boot.setup.payload
    with open(ahci_boot.setup.hd, "rb") as f:
        f.seek(PAYLOAD_AT)
        assert f.read(len(payload)) == payload             # the host compares the bytes
        f.seek(PAYLOAD_AT - 4096)
        assert f.read(4096) == b"\xaa" * 4096              # and nothing else was touched


def test_trim_reaches_the_image(ahci_boot: Boot) -> None:
    assert "DISCARD-RC=0" in ahci_boot.run.text
    with open(ahci_boot.setup.hd, "rb") as f:
        f.seek(TRIM_AT)
        assert f.read(TRIM_LEN) == bytes(TRIM_LEN)
        assert f.read(4096) == b"\xaa" * 4096


def test_ext4_on_the_multi_port_controller(ahci_boot: Boot) -> None:
    assert EXT_TEXT.decode().strip() in ahci_boot.run.text
    assert "EXT4-RC=0" in ahci_boot.run.text
    ext = ahci_boot.setup.ext
    fsck = subprocess.run(["e2fsck", "-fn", str(ext)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    got = subprocess.run(["debugfs", "-R", "cat /guest.txt", str(ext)], capture_output=True)
    assert got.stdout == GUEST_TEXT


def test_every_shell_step_finished_and_the_guest_powered_off(ahci_boot: Boot) -> None:
    assert ahci_boot.missed == [], ahci_boot.run.tail()
    assert ahci_boot.returncode == 1, ahci_boot.run.log[-2000:]
