"""Downloads that resume, verify and never leave a partial file under the final name.

What ``vmrun image pull`` uses for distribution images of hundreds of MiB: the bytes go to
``NAME.part`` beside the destination; an interrupted transfer (a dropped connection, Ctrl-C, a
killed process) continues from where that file ends with an HTTP ``Range`` request the next
time; the finished file is hashed and only then renamed into place. A server that ignores
``Range`` (200 instead of 206) restarts the file from zero. ``file://`` URLs (a local mirror)
are copied the same way. Every failure is one :class:`~vmrun.errors.VmrunError` line naming
the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from vmrun.errors import VmrunError

CHUNK = 1 << 20
TIMEOUT = 30.0            # seconds without a byte before a transfer counts as dropped
RETRIES = 5               # resumed attempts after a dropped connection
RETRY_DELAY = 1.0         # seconds, times the attempt number
USER_AGENT = "vmrun (image pull)"

#: ``progress(done, total)`` after every chunk; total is None when the server does not say.
Progress = Callable[[int, int | None], None]


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def fetch_bytes(url: str, limit: int = 1 << 20) -> bytes:
    """A small file (a checksum list) in memory; more than ``limit`` bytes is refused."""
    try:
        with _open(url, 0) as resp:
            data = resp.read(limit + 1)
    except _NET_ERRORS as e:
        raise VmrunError(f"{url}: {_reason(e)}") from None
    if len(data) > limit:
        raise VmrunError(f"{url}: larger than {limit} bytes, not a checksum list")
    return data


def download(url: str, dest: Path, *, algorithm: str, digest: str,
             progress: Progress | None = None) -> None:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), check its ``algorithm`` digest,
    then rename it into place. A mismatch removes the partial file: the next pull starts
    afresh instead of resuming corrupt bytes."""
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempts = 0
    while True:
        try:
            _transfer(url, part, progress)
            break
        except _NET_ERRORS as e:
            attempts += 1
            if attempts > RETRIES:
                raise VmrunError(f"{url}: {_reason(e)} (gave up after {RETRIES} resumed "
                                 f"attempts; run the pull again to resume)") from None
            time.sleep(min(attempts, 5) * RETRY_DELAY)
    got = file_digest(part, algorithm)
    if got != digest.lower():
        part.unlink(missing_ok=True)
        raise VmrunError(f"{url}: {algorithm} checksum mismatch (expected {digest.lower()}, "
                         f"got {got}); the download was removed")
    os.replace(part, dest)


def _transfer(url: str, part: Path, progress: Progress | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    with _open(url, have) as resp:
        status = getattr(resp, "status", None) or 200
        total: int | None = None
        if status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise VmrunError(f"{url}: the server resumed at the wrong offset "
                                 f"({resp.headers.get('Content-Range')!r}, wanted {have})")
            total = int(m.group(2)) if m.group(2) != "*" else None
            mode = "ab"
        else:
            have = 0                                 # no Range support: start over
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        with open(part, mode) as out:
            done = have
            if progress:
                progress(done, total)
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and done < total:
            raise ConnectionError(f"connection closed at {done} of {total} bytes")


def _open(url: str, offset: int):
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise VmrunError(f"{url}: only http, https and file URLs can be pulled")
    if scheme == "file":
        return _FileResponse(Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)),
                             offset, url)
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:                 # we already have all of it
            return _Done(offset)
        raise VmrunError(f"{url}: HTTP {e.code} {e.reason}") from None


class _Done:
    """The answer to a resume of a file that is already complete (HTTP 416)."""

    status = 206

    def __init__(self, size: int) -> None:
        self.headers = {"Content-Range": f"bytes {size}-{size}/{size}"}

    def read(self, n: int = -1) -> bytes:
        return b""

    def __enter__(self) -> _Done:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _FileResponse:
    """A local mirror's file, answering like an HTTP response that honours Range."""

    def __init__(self, path: Path, offset: int, url: str) -> None:
        try:
            self.f = open(path, "rb")
        except OSError as e:
            raise VmrunError(f"{url}: {e.strerror}") from None
        size = os.fstat(self.f.fileno()).st_size
        self.f.seek(min(offset, size))
        self.status = 206 if offset else 200
        self.headers = ({"Content-Range": f"bytes {offset}-{size - 1}/{size}"} if offset
                        else {"Content-Length": str(size)})

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self) -> _FileResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


#: What a dropped or refused transfer raises (retried with a resume, then one line).
_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
               socket.timeout, OSError)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return f"cannot connect ({getattr(e.reason, 'strerror', None) or e.reason})"
    return str(e) or type(e).__name__


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_sums(text: str, name: str) -> str | None:
    """The digest listed for ``name`` in a ``SHA256SUMS``/``SHA512SUMS`` file (GNU lines
    ``HEX  name`` or ``HEX *name``, or BSD lines ``SHA256 (name) = HEX``), else None."""
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([0-9a-fA-F]{32,128})\s+\*?(.+?)\s*", line)
        if m and m.group(2).lstrip("./") == name:
            return m.group(1).lower()
        m = re.fullmatch(r"\s*SHA\d+ \((.+)\) = ([0-9a-fA-F]{32,128})\s*", line)
        if m and m.group(1).lstrip("./") == name:
            return m.group(2).lower()
    return None
