"""The AHCI emulations as a machine file sees them: options, per-port errors, factories."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmrun_ahci.ata import AtaDisk
from vmrun_ahci.atapi import AtapiCd
from vmrun_ahci.hba import AhciHba

from vmrun.config import ConfigError, parse_machine
from vmrun.core.host import HostContext
from vmrun.plugins.placement import validate_device
from vmrun.plugins.registry import DeviceContext


def load(tmp_path: Path, devices: str):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    text = f'name = "t"\n[boot]\nkernel = "{kernel}"\n{devices}'
    return parse_machine(text, tmp_path / "m.toml", validate_device)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    (tmp_path / "b.img").write_bytes(bytes(1 << 20))
    (tmp_path / "x.iso").write_bytes(bytes(2048 * 16))
    return tmp_path


@pytest.mark.parametrize("devices, expected", [
    ('model = "ahci-hd"\n', "devices.s.path: required option of ahci-hd is missing"),
    ('model = "ahci-hd"\npath = "none.img"\n', "devices.s.path: "),
    ('model = "ahci-cd"\npath = "x.iso"\nsectorsize = "4096"\n', "devices.s.sectorsize: unknown"),
    ('model = "ahci"\n', "devices.s.ports: required option of ahci is missing"),
    ('model = "ahci"\nports = []\n', "devices.s.ports: must have between 1 and 32 entries"),
    ('model = "ahci"\nports = "a.img"\n', "devices.s.ports: must be an array of inline tables"),
    ('model = "ahci"\nports = [{type = "hd"}]\n', "devices.s.ports[0].path: a hd port needs"),
    ('model = "ahci"\nports = [{type = "hd", path = "a.img"}, {type = "tape"}]\n',
     "devices.s.ports[1].type: must be one of hd, cd"),
    ('model = "ahci"\nports = [{type = "hd", path = "a.img", colour = 1}]\n',
     "devices.s.ports[0].colour: unknown key in ports"),
    ('model = "ahci"\nports = [{type = "cd", path = "x.iso", size = "1M"}]\n',
     "devices.s.ports[0].size: size does not apply to a CD"),
    ('model = "ahci"\nports = [{type = "hd", path = "a.img", sectorsize = "3"}]\n',
     "devices.s.ports[0].sectorsize: logical sector size 3 must be a power of two"),
    ('model = "ahci"\nports = [{type = "hd", path = "a.img"}, {type = "hd", path = "a.img"}]\n',
     "devices.s.ports[1].path: this file is already used by devices.s.ports[0].path"),
    ('model = "ahci"\nports = [' + ", ".join(['{type = "cd"}'] * 33) + "]\n",
     "devices.s.ports: must have between 1 and 32 entries"),
])
def test_bad_ahci_tables(images: Path, devices: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(images, "[devices.s]\n" + devices)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg


def test_an_image_shared_between_a_port_and_another_device(images: Path) -> None:
    with pytest.raises(ConfigError, match=r"devices\.b\.ports\[0\]\.path: this file is already "
                                          r"used by devices\.a"):
        load(images, '[devices.a]\nmodel = "ahci-hd"\npath = "a.img"\n[devices.b]\n'
                     'model = "ahci"\nports = [{type = "hd", path = "a.img"}]\n')


def _ctx(tmp_path: Path) -> DeviceContext:
    return DeviceContext("s", "t", "00000000-0000-0000-0000-000000000001", HostContext(),
                         base_dir=tmp_path)


def test_factories_build_the_controllers(images: Path) -> None:
    cfg = load(images, '[devices.hd]\nmodel = "ahci-hd"\npath = "a.img"\nserial = "S1"\n'
                       'ro = true\n[devices.cd]\nmodel = "ahci-cd"\n[devices.m]\n'
                       'model = "ahci"\nports = [{type = "hd", path = "b.img", sectorsize = '
                       '"512/4096"}, {type = "cd", path = "x.iso"}, {type = "cd"}]\n')
    built = {}
    for dev_id, placed in cfg.devices.items():
        built[dev_id] = placed.type.factory(_ctx(images), placed.options)
    try:
        hd, cd, m = built["hd"], built["cd"], built["m"]
        assert all(isinstance(d, AhciHba) for d in built.values())
        disk = hd.ports[0].drive
        assert isinstance(disk, AtaDisk) and disk.serial == "S1" and disk.read_only
        assert isinstance(cd.ports[0].drive, AtapiCd) and cd.ports[0].drive.image is None
        drives = [p.drive for p in m.ports]
        assert [type(d) for d in drives] == [AtaDisk, AtapiCd, AtapiCd]
        assert drives[0].pss == 4096 and drives[0].serial.startswith("VMRUN-")
        assert drives[1].blocks == 16 and drives[1].image.read_only
        assert m.cap & 0x1F == 2 and m.pi == 0b111
    finally:
        for d in built.values():
            d.close()
