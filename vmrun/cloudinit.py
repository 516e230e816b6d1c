"""cloud-init's NoCloud seed: what a cloud image needs to come up with the user's account.

A machine file's ``[cloud-init]`` table becomes three files — ``meta-data`` (the instance id,
derived from the machine's UUID so cloud-init runs its first-boot modules once per machine, and
the hostname), ``user-data`` (``#cloud-config``: the user with sudo and ssh keys, packages,
runcmd, write_files; or the user's own file, checked to be YAML) and, when given,
``network-config`` — on an ISO 9660 volume labelled ``cidata`` (Rock Ridge and Joliet names,
as ``genisoimage -volid cidata -joliet -rock`` writes it), which the machine gets as a
read-only virtio-blk disk. cloud-init's NoCloud datasource finds it by that label.

The ssh key: every machine gets vmrun's own key (``~/.local/share/vmrun/ssh/id_ed25519``,
made on first use) besides the host user's public keys, so ``vmrun ssh`` can log in.
"""

from __future__ import annotations

import getpass
import io
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun.errors import VmrunError

SEED_LABEL = "cidata"
MAX_USER_DATA = 1 << 20        # NoCloud seeds are read into memory by cloud-init


@dataclass(frozen=True)
class CloudInitConfig:
    """A validated ``[cloud-init]`` table (see :func:`vmrun.config` for the checks)."""

    user: str
    hostname: str
    ssh_authorized_keys: tuple[str, ...] | None = None   # None: the host user's keys
    packages: tuple[str, ...] = ()
    runcmd: tuple[Any, ...] = ()
    write_files: tuple[dict[str, Any], ...] = ()
    user_data: Path | None = None
    network_config: Any = None                            # a mapping, or a Path to YAML
    extra: dict[str, Any] = field(default_factory=dict)


def default_user() -> str:
    """The host user's name, as Lima does; root gets an unprivileged account instead."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = ""
    return name if name and name != "root" else "vmrun"


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vmrun"


def vmrun_key() -> Path:
    """vmrun's own ssh key pair (private key path), made with ssh-keygen on first use."""
    key = data_dir() / "ssh" / "id_ed25519"
    if key.exists() and key.with_suffix(".pub").exists():
        return key
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmrun",
                        "-f", str(key)], check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise VmrunError("ssh-keygen is missing: install the Debian package openssh-client "
                         "(make deps does)") from None
    except subprocess.CalledProcessError as e:
        raise VmrunError(f"ssh-keygen failed: {e.stderr.decode(errors='replace').strip()}"
                         ) from None
    return key


def host_public_keys() -> list[str]:
    """The host user's ssh public keys (``~/.ssh/*.pub``), one line each."""
    keys = []
    for p in sorted((Path.home() / ".ssh").glob("*.pub")):
        try:
            line = p.read_text().strip()
        except OSError:
            continue
        if line and "\n" not in line:
            keys.append(line)
    return keys


def meta_data(instance_id: str, hostname: str) -> str:
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def user_data(cfg: CloudInitConfig, keys: list[str]) -> str:
    """The ``#cloud-config`` document (or the user's own file, verbatim)."""
    import yaml

    if cfg.user_data is not None:
        return cfg.user_data.read_text()
    doc: dict[str, Any] = {
        "hostname": cfg.hostname,
        "users": [{"name": cfg.user, "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
                   "groups": ["sudo"], "lock_passwd": True, "ssh_authorized_keys": keys}],
        "ssh_pwauth": False,
    }
    if cfg.packages:
        doc["packages"] = list(cfg.packages)
    if cfg.runcmd:
        doc["runcmd"] = list(cfg.runcmd)
    if cfg.write_files:
        doc["write_files"] = [dict(f) for f in cfg.write_files]
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def network_config(cfg: CloudInitConfig) -> str | None:
    import yaml

    if cfg.network_config is None:
        return None
    if isinstance(cfg.network_config, Path):
        return cfg.network_config.read_text()
    return yaml.safe_dump(cfg.network_config, sort_keys=False)


def seed_files(cfg: CloudInitConfig, instance_id: str) -> dict[str, bytes]:
    """The seed's files by name: meta-data, user-data and (if given) network-config."""
    keys = list(cfg.ssh_authorized_keys) if cfg.ssh_authorized_keys is not None \
        else host_public_keys()
    own = vmrun_key().with_suffix(".pub").read_text().strip()
    if own not in keys:
        keys.append(own)
    files = {"meta-data": meta_data(instance_id, cfg.hostname).encode(),
             "user-data": user_data(cfg, keys).encode()}
    net = network_config(cfg)
    if net is not None:
        files["network-config"] = net.encode()
    return files


def write_seed_iso(files: dict[str, bytes], dest: Path) -> Path:
    """An ISO 9660 volume labelled ``cidata`` holding ``files``; written under a temporary
    name and renamed, so a machine never sees half a seed."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL,
            sys_ident="LINUX")
    for name, data in files.items():
        short = name.replace("-", "").upper()[:8]
        iso.add_fp(io.BytesIO(data), len(data), f"/{short}.;1", rr_name=name,
                   joliet_path=f"/{name}")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        iso.write(str(tmp))
        iso.close()
        # Padded to whole MiB (at least one): a volume of a few sectors is missed by probes
        # that read past its end, busybox's findfs/volume_id among them (measured: a 66 KiB
        # seed was not found by LABEL=cidata, the same padded to 300 KiB was).
        size = tmp.stat().st_size
        os.truncate(tmp, max(1 << 20, -(-size // (1 << 20)) << 20))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def check_user_data_file(path: Path) -> None:
    """A user-data file is at most MAX_USER_DATA bytes of YAML (a ``#cloud-config`` mapping),
    or a script (``#!``) that cloud-init runs as is. Raises ValueError with the reason."""
    import yaml

    size = path.stat().st_size
    if size > MAX_USER_DATA:
        raise ValueError(f"is {size} bytes (at most {MAX_USER_DATA})")
    text = path.read_bytes().decode("utf-8", errors="strict")
    if text.startswith("#!"):
        return
    if not text.startswith("#cloud-config"):
        raise ValueError("must begin with #cloud-config (or #! for a script)")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"is not valid YAML ({where}{problem})") from None
    if doc is not None and not isinstance(doc, dict):
        raise ValueError("must be a YAML mapping (#cloud-config keys)")


def check_network_config_file(path: Path) -> None:
    """A network-config file is a YAML mapping of at most MAX_USER_DATA bytes."""
    import yaml

    size = path.stat().st_size
    if size > MAX_USER_DATA:
        raise ValueError(f"is {size} bytes (at most {MAX_USER_DATA})")
    try:
        doc = yaml.safe_load(path.read_bytes().decode("utf-8", errors="strict"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"is not valid YAML ({where}{getattr(e, 'problem', None) or e})"
                         ) from None
    if not isinstance(doc, dict):
        raise ValueError("must be a YAML mapping (network config version 1 or 2)")


SEED_DEVICE_ID = "cloud-init-seed"


def machine_dir(name: str) -> Path:
    """Where a machine's own state lives (its seed, its disk overlays): kept across runs."""
    return data_dir() / "machines" / name


def seed_device(cfg: Any) -> Any:
    """Write the machine's seed ISO and return the read-only virtio-blk device that carries
    it (a PlacedDevice, placed after the file's devices)."""
    from vmrun.plugins import get_registry
    from vmrun.plugins.registry import PlacedDevice, validate_options

    dtype = get_registry().get("virtio-blk")
    if dtype is None:
        raise VmrunError(f"{cfg.path}: cloud-init: the seed needs the virtio-blk plugin "
                         "(pip install -e plugins/virtio_blk)")
    seed = write_seed_iso(seed_files(cfg.cloud_init, f"vmrun-{cfg.uuid}"),
                          machine_dir(cfg.name) / "seed.iso")
    options = validate_options(dtype, {"path": str(seed), "ro": True, "serial": "cidata"},
                               seed.parent)
    return PlacedDevice(SEED_DEVICE_ID, dtype, None, 0, options)
