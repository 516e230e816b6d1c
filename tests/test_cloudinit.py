"""The ``[cloud-init]`` table and the NoCloud seed, read back by tools nobody here wrote:
``isoinfo`` (genisoimage), pycdlib, and Debian's cloud-init (its schema check and its own
NoCloud seed reader)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun import cloudinit
from vmrun.config import ConfigError, load_machine
from vmrun.testing import kernels

REPO = Path(__file__).resolve().parents[1]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBq5Nh0Ym9ndXNrZXlmb3J0ZXN0aW5nb25seQ test@host"
SYSTEM_PYTHON = "/usr/bin/python3"       # Debian's cloud-init lives in its dist-packages


@pytest.fixture(autouse=True)
def _homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".ssh").mkdir(parents=True)


def machine(tmp_path: Path, table: str, devices: str = "") -> Path:
    (tmp_path / "vmlinux").write_bytes(kernels.pvh_elf("poweroff"))
    f = tmp_path / "m.toml"
    f.write_text(f'name = "web1"\nmemory = "64M"\n[boot]\nkernel = "vmlinux"\n{devices}'
                 f'[cloud-init]\n{table}')
    return f


def error_of(f: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_machine(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f))
    return msg


def test_defaults(tmp_path: Path) -> None:
    cfg = load_machine(machine(tmp_path, "")).cloud_init
    assert cfg is not None
    assert cfg.user == cloudinit.default_user() and cfg.hostname == "web1"
    assert cfg.ssh_authorized_keys is None            # the host user's keys, at up


def test_every_key(tmp_path: Path) -> None:
    cfg = load_machine(machine(tmp_path, f'''user = "dev"
hostname = "box"
ssh_authorized_keys = ["{KEY}"]
packages = ["nginx", "python3-pip"]
runcmd = ["echo hi > /tmp/hi", ["touch", "/tmp/x"]]
write_files = [{{path = "/etc/motd", content = "hello\\n", permissions = "0644"}}]
network_config = {{version = 2, ethernets = {{eth0 = {{dhcp4 = true}}}}}}
''')).cloud_init
    assert (cfg.user, cfg.hostname, cfg.ssh_authorized_keys) == ("dev", "box", (KEY,))
    assert cfg.packages == ("nginx", "python3-pip")
    assert cfg.network_config == {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}


BAD = [
    ('user = "root"', 'cloud-init.user: must be a user name (a-z, 0-9, _ and -, at most 32, '
                      'not root) (got "root")'),
    ('user = "Bad User"', "cloud-init.user: must be a user name"),
    ('hostname = "-x"', 'cloud-init.hostname: must be a host name'),
    ('ssh_authorized_keys = "ssh-ed25519 AAAA"', "cloud-init.ssh_authorized_keys: must be an "
                                                 "array of strings"),
    ('ssh_authorized_keys = ["not a key"]', "cloud-init.ssh_authorized_keys[0]: is not an ssh "
                                            "public key"),
    ('packages = ["ok", "rm -rf /"]', "cloud-init.packages[1]: is not a package name"),
    ("runcmd = [1]", "cloud-init.runcmd[0]: must be a string (run by sh) or an array of "
                     "strings (argv)"),
    ('write_files = [{content = "x"}]', "cloud-init.write_files[0].path: is required"),
    ('write_files = [{path = "etc/motd"}]', "cloud-init.write_files[0].path: must be an "
                                            "absolute path in the guest"),
    ('write_files = [{path = "/x", permissions = "rw"}]', "cloud-init.write_files[0]."
                                                          "permissions: must be octal"),
    ('write_files = [{path = "/x", mode = "0644"}]', "cloud-init.write_files[0].mode: unknown "
                                                     "key"),
    ('user_data = "nope.yaml"', "cloud-init.user_data: user-data file"),
    ('user_data = "u.yaml"\npackages = ["x"]', "cloud-init.packages: cannot be combined with "
                                              "user_data"),
    ("network_config = 3", "cloud-init.network_config: must be a table"),
    ('usr = "dev"', 'cloud-init.usr: unknown key (did you mean "user"?)'),
]


@pytest.mark.parametrize("table, expected", BAD)
def test_bad_tables_are_one_line(tmp_path: Path, table: str, expected: str) -> None:
    (tmp_path / "u.yaml").write_text("#cloud-config\npackages: [x]\n")
    assert expected in error_of(machine(tmp_path, table))


@pytest.mark.parametrize("text, expected", [
    ("#cloud-config\npackages: [a\n", "is not valid YAML (line 3, column 1:"),
    ("packages: [a]\n", "must begin with #cloud-config (or #! for a script)"),
    ("#cloud-config\n- a\n- b\n", "must be a YAML mapping"),
    (b"#cloud-config\n\xff\n", "invalid start byte"),
])
def test_a_bad_user_data_file_is_one_line(tmp_path: Path, text, expected: str) -> None:
    p = tmp_path / "u.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in error_of(machine(tmp_path, 'user_data = "u.yaml"'))


def test_a_bad_user_data_file_is_refused_by_check_with_exit_4(tmp_path: Path) -> None:
    (tmp_path / "u.yaml").write_text("#cloud-config\nusers: [\n")
    f = machine(tmp_path, 'user_data = "u.yaml"')
    out = subprocess.run([sys.executable, "-m", "vmrun", "check", str(f)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 4
    assert out.stderr.strip().count("\n") == 0 and "is not valid YAML" in out.stderr


def _seed(tmp_path: Path, table: str) -> tuple[Path, dict[str, bytes]]:
    cfg = load_machine(machine(tmp_path, table))
    files = cloudinit.seed_files(cfg.cloud_init, f"vmrun-{cfg.uuid}")
    iso = cloudinit.write_seed_iso(files, tmp_path / "seed.iso")
    return iso, files


def test_seed_is_a_cidata_volume_isoinfo_reads(tmp_path: Path) -> None:
    if shutil.which("isoinfo") is None:
        pytest.fail("isoinfo is missing: install genisoimage (make deps does)")
    iso, files = _seed(tmp_path, f'ssh_authorized_keys = ["{KEY}"]\n'
                                 'network_config = {version = 2}\n')
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True)
    assert "Volume id: cidata" in info.stdout
    assert "Rock Ridge signatures version 1 found" in info.stdout
    assert "Joliet with UCS level 3 found" in info.stdout
    listing = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True,
                             text=True).stdout.split()
    assert sorted(listing) == ["/meta-data", "/network-config", "/user-data"]
    for name, data in files.items():
        got = subprocess.run(["isoinfo", "-R", "-x", f"/{name}", "-i", str(iso)],
                             capture_output=True).stdout
        assert got == data, name
    assert b"local-hostname: web1" in files["meta-data"]
    assert f"instance-id: vmrun-{load_machine(tmp_path / 'm.toml').uuid}".encode() in \
        files["meta-data"]


def test_user_data_passes_cloud_inits_schema_and_its_nocloud_reader(tmp_path: Path) -> None:
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("cloud-init") is None:
        pytest.fail("cloud-init is missing: install the Debian package cloud-init "
                    "(make deps does)")
    _, files = _seed(tmp_path, f'''user = "dev"
ssh_authorized_keys = ["{KEY}"]
packages = ["nginx"]
runcmd = ["echo hi > /tmp/hi", ["touch", "/tmp/x"]]
write_files = [{{path = "/etc/motd", content = "hello", permissions = "0644"}}]
''')
    seed = tmp_path / "seed"
    seed.mkdir()
    for name, data in files.items():
        (seed / name).write_bytes(data)
    schema = subprocess.run(["cloud-init", "schema", "-c", str(seed / "user-data")],
                            capture_output=True, text=True, timeout=120)
    assert schema.returncode == 0 and "Valid cloud-config" in schema.stdout, \
        schema.stdout + schema.stderr
    reader = ("import json, sys\nfrom cloudinit import util\n"
              "md, ud, vd = util.read_seeded(base=sys.argv[1] + '/', file_retries=0)\n"
              "print(json.dumps({'md': md, 'ud': util.load_yaml(ud)}))\n")
    out = subprocess.run([SYSTEM_PYTHON, "-c", reader, str(seed)], capture_output=True,
                         text=True, timeout=120, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["md"]["local-hostname"] == "web1"
    user = got["ud"]["users"][0]
    assert user["name"] == "dev" and KEY in user["ssh_authorized_keys"]
    assert any(k.startswith("ssh-ed25519 ") and k.endswith(" vmrun")
               for k in user["ssh_authorized_keys"])       # vmrun's own key, for vmrun ssh
    assert got["ud"]["packages"] == ["nginx"]


def test_host_keys_are_the_default(tmp_path: Path) -> None:
    (tmp_path / "home" / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    _, files = _seed(tmp_path, "")
    assert KEY.encode() in files["user-data"]


def test_a_user_data_file_is_passed_verbatim(tmp_path: Path) -> None:
    text = "#cloud-config\nruncmd: [[echo, mine]]\n"
    (tmp_path / "u.yaml").write_text(text)
    _, files = _seed(tmp_path, 'user_data = "u.yaml"')
    assert files["user-data"] == text.encode()


def test_the_machine_gets_the_seed_as_a_read_only_disk(tmp_path: Path) -> None:
    from vmrun.plugins.placement import place_devices

    cfg = load_machine(machine(tmp_path, ""))
    dev = cloudinit.seed_device(cfg)
    assert dev.type.name == "virtio-blk" and dev.options["ro"] is True
    assert dev.options["path"] == tmp_path / "data" / "vmrun" / "machines" / "web1" / "seed.iso"
    placed = place_devices(cfg, [dev])
    assert placed[-1].id == cloudinit.SEED_DEVICE_ID and placed[-1].slot is not None


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")
def test_up_writes_the_seed_and_attaches_it(tmp_path: Path) -> None:
    from vmrun.core.exits import ExitCode
    from vmrun.runner import Runner

    lines: list[str] = []
    f = machine(tmp_path, 'hostname = "seeded"', '[serial.com1]\nbackend = "null"\n')
    info = Runner(load_machine(f), log=lines.append).run()
    assert info.code == ExitCode.POWER_OFF, info.reason
    seed = tmp_path / "data" / "vmrun" / "machines" / "web1" / "seed.iso"
    out = subprocess.run(["isoinfo", "-R", "-x", "/meta-data", "-i", str(seed)],
                         capture_output=True)
    assert b"local-hostname: seeded" in out.stdout


def test_the_seed_is_found_by_busybox_findfs(tmp_path: Path) -> None:
    """What the default guest (busybox) runs to find the seed: findfs LABEL=cidata on a loop
    device of it (a seed of a few sectors was missed before it was padded to 1 MiB)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("busybox") is None:
        pytest.skip("needs root, losetup and busybox")
    iso, _ = _seed(tmp_path, "")
    assert iso.stat().st_size % (1 << 20) == 0
    dev = subprocess.run(["losetup", "-f", "--show", "-r", str(iso)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        found = subprocess.run(["busybox", "findfs", "LABEL=cidata"], capture_output=True,
                               text=True)
    finally:
        subprocess.run(["losetup", "-d", dev])
    assert found.returncode == 0 and found.stdout.strip() == dev, found
