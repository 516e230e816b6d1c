"""Every bad vmrun command line is one line on stderr and exit code 4 (issue 10).

The table runs through click's CliRunner with the real entry point's semantics (the top-level
group's own ``main``, standalone mode); a subset, and the cases only argv can produce, run as
real ``python -m vmrun`` processes.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import vmrun.config
from vmrun.cli import main
from vmrun.errors import ConfigError, VmrunError, one_line

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "configs" / "bad"
SIZE_HINT = "is not a number with an optional K, M, G or T suffix"

# (id, argv, expected fragment of the one stderr line). "{data}" is a folder outside the cwd
# holding dir/ (a directory), "new\nline/" (one with a newline) and file.img (1221 bytes).
CASES = [
    # unknown commands and options
    ("unknown-command", ["nope"], "no such command 'nope'"),
    ("unknown-command-typo", ["upp", "m.toml"], "no such command 'upp'"),
    ("unknown-subcommand", ["image", "frobnicate"], "image: no such command 'frobnicate'"),
    ("unknown-option", ["--bogus"], "no such option '--bogus'"),
    ("unknown-option-up", ["up", "--bogus", "m.toml"], "up: no such option '--bogus'"),
    ("unknown-short-option", ["check", "-x", "m.toml"], "check: no such option '-x'"),
    ("unknown-option-create", ["image", "create", "x.img", "--size", "1M", "--qcow2"],
     "image create: no such option '--qcow2'"),
    ("unknown-option-devices", ["devices", "--all"], "devices: no such option '--all'"),
    ("unknown-option-image", ["image", "--x"], "image: no such option '--x'"),
    # missing arguments and option values
    ("up-no-file", ["up"], "up: missing argument 'MACHINE_FILE'"),
    ("check-no-file", ["check"], "check: missing argument 'MACHINE_FILE'"),
    ("create-no-path", ["image", "create"], "image create: missing argument 'PATH'"),
    ("create-no-size", ["image", "create", "x.img"],
     "x.img: give the size of the new image (--size)"),
    ("convert-no-src", ["image", "convert"], "image convert: missing argument 'SRC'"),
    ("convert-no-dst", ["image", "convert", "a.img"], "missing argument 'DST'"),
    ("convert-no-to", ["image", "convert", "a.img", "b.img"], "missing option '--to'"),
    ("size-no-value", ["image", "create", "x.img", "--size"],
     "image create: option '--size' requires an argument"),
    ("to-no-value", ["image", "convert", "a", "b", "--to"], "option '--to' requires an argument"),
    # extra arguments
    ("check-extra", ["check", "a.toml", "b.toml"], "check: got unexpected extra argument (b.toml)"),
    ("up-extra", ["up", "a.toml", "b.toml"], "up: got unexpected extra argument (b.toml)"),
    ("create-extra", ["image", "create", "x.img", "y.img", "--size", "1M"],
     "got unexpected extra argument (y.img)"),
    ("devices-extra", ["devices", "a", "b"], "devices: got unexpected extra argument (b)"),
    ("build-extra", ["image", "build", "tiny", "more"], "got unexpected extra argument (more)"),
    # bad sizes and numbers
    ("size-word", ["image", "create", "x.img", "--size", "abc"],
     f"image create: --size: size 'abc' {SIZE_HINT}"),
    ("size-negative", ["image", "create", "x.img", "--size", "-1M"], f"size '-1M' {SIZE_HINT}"),
    ("size-fraction", ["image", "create", "x.img", "--size", "1.5G"], f"size '1.5G' {SIZE_HINT}"),
    ("size-hex", ["image", "create", "x.img", "--size", "0x100"], f"size '0x100' {SIZE_HINT}"),
    ("size-unit", ["image", "create", "x.img", "--size", "2P"], f"size '2P' {SIZE_HINT}"),
    ("size-empty", ["image", "create", "x.img", "--size="], f"--size: size '' {SIZE_HINT}"),
    ("size-zero", ["image", "create", "x.img", "--size", "0"], "size must be positive, not 0"),
    ("size-not-sector-multiple", ["image", "create", "x.img", "--size", "1000", "--sparse"],
     "multiple of the sector size"),
    ("split-word", ["image", "create", "x.img", "--size", "1M", "--split", "abc"],
     f"--split: size 'abc' {SIZE_HINT}"),
    ("split-not-multiple", ["image", "create", "x.img", "--size", "1M", "--split", "1000"],
     "1000"),
    ("src-split-word", ["image", "convert", "a", "b", "--to", "raw", "--src-split", "zz"],
     "image convert: --src-split: size 'zz'"),
    ("sectorsize-word", ["image", "create", "x.img", "--size", "1M", "--sectorsize", "z"],
     "image create: --sectorsize: 'z' is not a valid integer"),
    ("sectorsize-zero", ["image", "create", "x.img", "--size", "1M", "--sparse",
                         "--sectorsize", "0"], "sector size 0"),
    ("src-sectorsize-float", ["image", "convert", "a", "b", "--to", "raw",
                              "--src-sectorsize", "1.5"], "--src-sectorsize: '1.5' is not a valid"),
    ("to-unknown", ["image", "convert", "a", "b", "--to", "vmdk"],
     "image convert: --to: 'vmdk' is not one of 'raw', 'sparse', 'qcow2'"),
    # bad machine files: slot syntax and friends (the corpus says what each must report)
    ("slot-syntax", ["check", str(BAD / "device-slot-syntax.toml")],
     'devices.rng.slot: must be a slot number or "slot:function" (got "0x3")'),
    ("slot-range-up", ["up", str(BAD / "device-slot-range.toml")],
     "devices.rng.slot: slot must be between 0 and 31 (got 32)"),
    ("slot-function", ["check", str(BAD / "device-function-range.toml")],
     'devices.rng.slot: function must be between 0 and 7 (got "3:8")'),
    ("cpus-too-many", ["check", str(BAD / "cpus-too-many.toml")],
     "cpus: must be between 1 and 16 (got 17)"),
    # files that do not exist, directories where a file belongs, images in the way
    ("check-missing", ["check", "nope.toml"], "nope.toml: machine file does not exist"),
    ("up-missing", ["up", "nope.toml"], "nope.toml: machine file does not exist"),
    ("convert-missing", ["image", "convert", "nope.img", "out.img", "--to", "raw"],
     "nope.img: no such disk image"),
    ("create-no-dir", ["image", "create", "{data}/nodir/x.img", "--size", "1M"],
     "No such file or directory"),
    ("devices-unknown", ["devices", "nope"], "no device emulation named 'nope'"),
    ("check-directory", ["check", "{data}/dir"], "check: MACHINE_FILE: file '{data}/dir' is a "
                                                   "directory"),
    ("up-directory", ["up", "{data}/dir"], "is a directory"),
    ("create-directory", ["image", "create", "{data}/dir", "--size", "1M"], "is a directory"),
    ("convert-directory", ["image", "convert", "{data}/dir", "out.img", "--to", "raw"],
     "image convert: SRC: file '{data}/dir' is a directory"),
    ("create-existing", ["image", "create", "{data}/file.img", "--size", "1M"],
     "file.img: already exists (refusing to overwrite)"),
    ("convert-bad-geometry", ["image", "convert", "{data}/file.img", "out.img", "--to", "sparse"],
     "1221"),
    ("image-check-missing", ["image", "check", "nope.img"], "nope.img"),
    # control characters in paths and values are escaped, never split the line
    ("newline-path", ["check", "a\nb.toml"], "a\\nb.toml: machine file does not exist"),
    ("cr-path", ["check", "a\rb.toml"], "a\\rb.toml"),
    ("escape-path", ["check", "\x1b[31mred.toml"], "\\x1b[31mred.toml"),
    ("newline-directory", ["check", "{data}/new\nline"], "new\\nline' is a directory"),
    ("newline-size", ["image", "create", "x.img", "--size", "1\nG\n2"], "size '1\\nG\\n2'"),
    ("line-separator", ["check", "a\u2028b.toml"], "a\\u2028b.toml"),
    ("nul-path", ["check", "a\0b.toml"], "'a\\x00b.toml' contains a NUL byte"),
    ("nul-image", ["image", "create", "x\0.img", "--size", "1M"], "contains a NUL byte"),
]
IDS = [c[0] for c in CASES]
SUBPROCESS = ["unknown-command", "unknown-option-create", "create-no-size", "check-extra",
              "size-word", "slot-syntax", "check-directory", "newline-path",
              "convert-bad-geometry", "size-zero"]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40 and len(set(IDS)) == len(IDS)
    assert set(SUBPROCESS) <= set(IDS) and len(SUBPROCESS) >= 5


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An empty cwd, and the data folder the table's "{data}" points at."""
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    (data / "dir").mkdir(parents=True)
    (data / "new\nline").mkdir()
    (data / "file.img").write_bytes(b"x" * 1221)
    return cwd, data


def _argv(argv: list[str], data: Path) -> list[str]:
    return [a.replace("{data}", str(data)) for a in argv]


def _check(code: int, stderr: str, expected: str, cwd: Path, data: Path) -> None:
    lines = stderr.splitlines()
    assert code == 4, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmrun: ")
    assert one_line(expected.replace("{data}", str(data))) in lines[0] or \
        expected.replace("{data}", str(data)) in lines[0], lines[0]
    assert "Traceback" not in stderr and "\x1b" not in stderr
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in data.iterdir()) == ["dir", "file.img", "new\nline"]


def _cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("name, argv, expected", CASES, ids=IDS)
def test_bad_command_line(name: str, argv: list[str], expected: str, dirs,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, data = dirs
    out = _cli(_argv(argv, data), cwd, monkeypatch)
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    _check(out.exit_code, out.stderr, expected, cwd, data)


def _vmrun(args: list[str | bytes], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "vmrun", *args], cwd=cwd, capture_output=True,
                          timeout=20, env=env, **kw)


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_command_line_in_a_real_process(name: str, dirs) -> None:
    cwd, data = dirs
    _, argv, expected = CASES[IDS.index(name)]
    out = _vmrun(_argv(argv, data), cwd, text=True)
    _check(out.returncode, out.stderr, expected, cwd, data)
    assert out.stdout == ""


def test_a_non_utf8_file_name_is_escaped(dirs) -> None:
    cwd, data = dirs
    out = _vmrun([b"check", b"caf\xe9.toml"], cwd)
    stderr = out.stderr.decode()
    _check(out.returncode, stderr, "caf\\udce9.toml: machine file does not exist", cwd, data)


def test_the_line_is_red_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env.update(PYTHONPATH=str(REPO), TERM="xterm-256color")
    try:
        proc = subprocess.run([sys.executable, "-m", "vmrun", "nope"], cwd=tmp_path,
                              stderr=slave, stdout=subprocess.PIPE, timeout=20, env=env)
        os.close(slave)
        slave = -1
        got = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = got.decode()
    assert proc.returncode == 4
    assert "\x1b[1;31mvmrun: no such command 'nope'" in text
    assert len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["image", "create", "--help"],
                                  ["check", "-h"], []])
def test_help_still_works(argv: list[str], tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = _cli(argv, tmp_path, monkeypatch)
    assert out.exit_code == 0 and "Usage: vmrun" in out.stdout and out.stderr == ""


def test_help_in_a_real_process(tmp_path: Path) -> None:
    out = _vmrun(["image", "convert", "--help"], tmp_path, text=True)
    assert out.returncode == 0 and "Usage: vmrun image convert" in out.stdout


# -- errors that are not the user's ---------------------------------------------------------
def _boom(exc: BaseException):
    def load_machine(path):
        raise exc
    return load_machine


def test_an_unexpected_exception_is_one_line(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun.config, "load_machine", _boom(RuntimeError("boom\nsecond line")))
    out = _cli(["check", "m.toml"], tmp_path, monkeypatch)
    assert out.exit_code == 4
    assert out.stderr.splitlines() == [
        "vmrun: internal error: RuntimeError: boom\\nsecond line "
        "(run with -v for the traceback)"]


def test_with_v_the_traceback_follows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun.config, "load_machine", _boom(ZeroDivisionError("zero")))
    out = _cli(["-v", "check", "m.toml"], tmp_path, monkeypatch)
    assert out.exit_code == 4
    lines = out.stderr.splitlines()
    assert lines[0] == "vmrun: internal error: ZeroDivisionError: zero"
    assert "Traceback (most recent call last):" in out.stderr and "_boom" not in lines[0]
    # ... and a later run without -v is terse again
    out = _cli(["check", "m.toml"], tmp_path, monkeypatch)
    assert len(out.stderr.splitlines()) == 1


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun.config, "load_machine", _boom(KeyboardInterrupt()))
    out = _cli(["check", "m.toml"], tmp_path, monkeypatch)
    assert out.exit_code == 130 and out.stderr.splitlines() == ["vmrun: interrupted"]


def test_an_os_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun.config, "load_machine",
                        _boom(PermissionError(13, "Permission denied", "/x/m\n.toml")))
    out = _cli(["check", "m.toml"], tmp_path, monkeypatch)
    assert out.exit_code == 4
    assert out.stderr.splitlines() == ["vmrun: /x/m\\n.toml: Permission denied"]


def test_a_vmrun_error_detail_only_with_v(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun.config, "load_machine",
                        _boom(VmrunError("build failed (log: x)", detail="line 1\nline 2")))
    out = _cli(["check", "m.toml"], tmp_path, monkeypatch)
    assert out.stderr.splitlines() == ["vmrun: build failed (log: x)"]
    out = _cli(["-v", "check", "m.toml"], tmp_path, monkeypatch)
    assert out.stderr.splitlines() == ["vmrun: build failed (log: x)", "line 1", "line 2"]


def test_image_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmrun.block import create_image
    from vmrun.block.image_tools import check_image  # noqa: F401  (must exist)

    create_image(tmp_path / "x.img", 1 << 20)
    out = _cli(["image", "check", "x.img"], tmp_path, monkeypatch)
    assert out.exit_code == 0 and out.stdout.strip() == "ok", out.stderr


# -- one_line -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("plain text, 'quotes' and \\ backslash", "plain text, 'quotes' and \\ backslash"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("nul\0 esc\x1b bell\x07 del\x7f", "nul\\x00 esc\\x1b bell\\x07 del\\x7f"),
    ("ff\x0c vt\x0b fs\x1c nel\x85", "ff\\x0c vt\\x0b fs\\x1c nel\\x85"),
    ("ls\u2028 ps\u2029 rlo\u202e", "ls\\u2028 ps\\u2029 rlo\\u202e"),
    ("surrogate \udcff", "surrogate \\udcff"),
    ("unicode ok: é ü 日本", "unicode ok: é ü 日本"),
])
def test_one_line(text: str, expected: str) -> None:
    got = one_line(text)
    assert got == expected and len(got.splitlines()) == 1 and got.isprintable()


def test_config_error_uses_one_line() -> None:
    assert str(ConfigError("a\nb\x1bc")) == "a\\nb\\x1bc"
    assert VmrunError("x").detail == "" and VmrunError("x").exit_code == 4
