"""The devices' event loop: fds, timers and cross-thread calls served on one I/O thread.

Every device's host-side events go through one :class:`EventLoop` per VM: queue doorbells
(ioeventfds), block I/O completions (an AIO eventfd, worker results handed over with
:meth:`EventLoop.call_soon`), network backends, timers (timerfd). A vCPU thread that rang a
doorbell goes straight back into the guest; the loop thread does the device's work.

One loop for all devices, not one per device, by measurement (``python bench/eventloop.py``:
"vCPU" threads ring doorbells and wait for the device's interrupt eventfd; the device does a
little Python work per ring). On this 2-core machine, idle, one shared loop served 1.06x the
round trips of a loop per device with 2 devices and 1.98x with 4 (29 K vs 27 K/s, 54 K vs
27 K/s; with one device both set-ups are the same code: 0.99). Busy, the gap was smaller but
the same way round (1.12x and 1.31x).
The device work is Python, so the GIL serialises it whatever the thread count, and more
threads only add GIL hand-offs and wake-ups. One loop also keeps every device's callbacks
ordered with respect to each other. Devices must therefore never block in a callback: block
I/O goes to native AIO or the worker pool.

The guard: a callback that raises marks *its owner* broken — :meth:`Owner.fault` (virtio:
DEVICE_NEEDS_RESET and a config interrupt; other devices stop serving, one log line) — and the
loop goes on serving every other device. A source can be switched off and on (a network
backend is read only while the guest has posted receive buffers).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import cffi

log = logging.getLogger("vmrun.eventloop")

_ffi = cffi.FFI()
_ffi.cdef("""
struct timespec { long tv_sec; long tv_nsec; };
struct itimerspec { struct timespec it_interval; struct timespec it_value; };
int timerfd_create(int clockid, int flags);
int timerfd_settime(int fd, int flags, const struct itimerspec *new_value,
                    struct itimerspec *old_value);
""")
_libc = _ffi.dlopen(None)
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT


class Owner(Protocol):
    """Whoever a source belongs to (a device); told when one of its callbacks raised."""

    name: str

    def fault(self, reason: str) -> None: ...


class Source:
    """One fd watched by the loop, with the callback that serves it."""

    __slots__ = ("loop", "fd", "callback", "owner", "events", "enabled", "registered")

    def __init__(self, loop: EventLoop, fd: int, callback: Callable[[int], Any],
                 owner: Owner | None, events: int) -> None:
        self.loop = loop
        self.fd = fd
        self.callback = callback
        self.owner = owner
        self.events = events
        self.enabled = True
        self.registered = False

    def enable(self) -> None:
        """Watch the fd again (idempotent, any thread)."""
        self.loop._set_enabled(self, True)

    def disable(self) -> None:
        """Stop watching the fd until :meth:`enable` (idempotent, any thread)."""
        self.loop._set_enabled(self, False)

    def modify(self, events: int) -> None:
        self.loop._modify(self, events)

    def remove(self) -> None:
        self.loop.remove(self)


class ReadySource:
    """Stands in for a :class:`Source` when epoll refuses the fd (a regular file, /dev/null:
    a read never blocks, so it is always ready): while enabled, the callback runs again
    through ``call_soon`` until the source is switched off or removed."""

    def __init__(self, loop: EventLoop, fd: int, callback: Callable[[int], Any],
                 owner: Owner | None) -> None:
        self.loop = loop
        self.fd = fd
        self.callback = callback
        self.owner = owner
        self.enabled = False
        self._queued = False
        self._removed = False

    def enable(self) -> None:
        self.enabled = True
        if not self._queued and not self._removed:
            self._queued = True
            self.loop.call_soon(self._run, owner=self.owner)

    def disable(self) -> None:
        self.enabled = False

    def remove(self) -> None:
        self._removed = True
        self.enabled = False

    def _run(self) -> None:
        self._queued = False
        if self.enabled and not self._removed:
            self.callback(self.fd)
            if self.enabled:
                self.enable()


def pollable(fd: int) -> bool:
    """Whether epoll takes ``fd`` (it refuses regular files and /dev/null: always ready)."""
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        return True
    except PermissionError:
        return False
    finally:
        ep.close()


class Timer:
    """A timerfd on the loop: :meth:`arm` (one-shot or periodic), :meth:`cancel`."""

    def __init__(self, loop: EventLoop, callback: Callable[[], Any],
                 owner: Owner | None) -> None:
        self.fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(_ffi.errno, "timerfd_create failed")
        self.callback = callback
        self._spec = _ffi.new("struct itimerspec *")
        self.source = loop.add(self.fd, self._fired, owner)
        self.loop = loop

    def arm(self, delay: float, interval: float = 0.0) -> None:
        """Fire after ``delay`` seconds (then every ``interval`` seconds if non-zero)."""
        delay = max(delay, 1e-6)     # 0 would disarm
        s = self._spec
        s.it_value.tv_sec, s.it_value.tv_nsec = int(delay), int((delay % 1) * 1e9)
        s.it_interval.tv_sec = int(interval)
        s.it_interval.tv_nsec = int((interval % 1) * 1e9)
        _libc.timerfd_settime(self.fd, 0, s, _ffi.NULL)

    def cancel(self) -> None:
        s = self._spec
        s.it_value.tv_sec = s.it_value.tv_nsec = 0
        s.it_interval.tv_sec = s.it_interval.tv_nsec = 0
        if self.fd >= 0:
            _libc.timerfd_settime(self.fd, 0, s, _ffi.NULL)

    def _fired(self, fd: int) -> None:
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return
        self.callback()

    def close(self) -> None:
        if self.fd >= 0:
            self.source.remove()
            os.close(self.fd)
            self.fd = -1


class EventLoop:
    """epoll on one thread. ``start()`` runs it; without a thread, tests call
    :meth:`run_once` themselves."""

    def __init__(self, name: str = "vmrun-io") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._sources: dict[int, Source] = {}
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Owner | None]] = deque()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._holder: threading.Thread | None = None   # see held()
        self.faults: list[tuple[str, str]] = []    # (owner name, reason), for tests and stats

    # -- sources ---------------------------------------------------------------------
    def add(self, fd: int, callback: Callable[[int], Any], owner: Owner | None = None,
            events: int = READABLE, enabled: bool = True) -> Source:
        """Watch ``fd``; ``callback(fd)`` runs on the loop thread when it is ready. An fd that
        epoll refuses (a regular file, /dev/null) gets a :class:`ReadySource`: it is always
        ready, so its callback runs again and again while the source is on."""
        if not pollable(fd):
            ready = ReadySource(self, fd, callback, owner)
            if enabled:
                ready.enable()
            return ready    # type: ignore[return-value]
        src = Source(self, fd, callback, owner, events)
        src.enabled = enabled
        with self._lock:
            if fd in self._sources:
                raise ValueError(f"fd {fd} is already on the event loop")
            if enabled:
                self._epoll.register(fd, events)     # raises first (EPERM for a file)
                src.registered = True
            self._sources[fd] = src
        return src

    def remove(self, src: Source) -> None:
        with self._lock:
            if self._sources.get(src.fd) is src:
                del self._sources[src.fd]
                if src.registered:
                    try:
                        self._epoll.unregister(src.fd)
                    except (OSError, ValueError):
                        pass
                    src.registered = False

    def _set_enabled(self, src: Source, on: bool) -> None:
        with self._lock:
            src.enabled = on
            if self._sources.get(src.fd) is not src or src.registered == on:
                return
            if on:
                self._epoll.register(src.fd, src.events)
            else:
                self._epoll.unregister(src.fd)
            src.registered = on

    def _modify(self, src: Source, events: int) -> None:
        with self._lock:
            src.events = events
            if src.registered:
                self._epoll.modify(src.fd, events)

    def timer(self, callback: Callable[[], Any], owner: Owner | None = None) -> Timer:
        return Timer(self, callback, owner)

    # -- calls from other threads -------------------------------------------------------
    def call_soon(self, fn: Callable[..., Any], *args: Any, owner: Owner | None = None) -> None:
        """Run ``fn(*args)`` on the loop thread (thread-safe; FIFO)."""
        self._calls.append((fn, args, owner))
        os.eventfd_write(self._wake, 1)

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued before this call has run (tests, drains)."""
        if self._thread is None or threading.current_thread() is self._thread:
            self.run_once(0)
            return True
        if threading.current_thread() is self._holder:
            self._run_calls()
            return True
        done = threading.Event()
        self.call_soon(done.set)
        return done.wait(timeout)

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @contextmanager
    def held(self, timeout: float = 10.0) -> Iterator[None]:
        """Park the loop thread for the ``with`` block: no device callback runs (no frame
        received, no timer, no doorbell) while a snapshot reads every device's state and
        guest RAM, so that the two agree. The holder's :meth:`sync` runs the calls queued
        meanwhile itself (the completions of I/O a disk drains), never the fd sources:
        those are served once the loop is let go. Without a thread, or from the loop thread,
        there is nothing to park."""
        if self._thread is None or self.on_loop_thread or self._holder is not None:
            yield
            return
        parked, release = threading.Event(), threading.Event()

        def park() -> None:
            parked.set()
            release.wait()

        self.call_soon(park)
        if not parked.wait(timeout):
            release.set()
            raise TimeoutError("the devices' event loop did not come to a stop")
        self._holder = threading.current_thread()
        try:
            yield
        finally:
            self._holder = None
            release.set()

    # -- running ------------------------------------------------------------------------
    def _guarded(self, owner: Owner | None, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:   # the guard: only the owner breaks
            reason = f"{type(e).__name__}: {e}"
            name = getattr(owner, "name", "?")
            self.faults.append((name, reason))
            if owner is None:
                log.error("event loop: callback %r raised %s", fn, reason)
                return
            try:
                owner.fault(f"internal error in its event handler: {reason}")
            except Exception as e2:
                log.error("%s: fault handler raised %r", name, e2)

    def run_once(self, timeout: float | None = None) -> int:
        """Serve what is ready (waiting up to ``timeout`` s); returns the events served."""
        try:
            ready = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return 0
        served = 0
        for fd, _ev in ready:
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                continue
            src = self._sources.get(fd)
            if src is None or not src.enabled:
                continue
            served += 1
            self._guarded(src.owner, src.callback, fd)
        return served + self._run_calls()

    def _run_calls(self) -> int:
        calls = self._calls
        served = 0
        while calls:
            try:
                fn, args, owner = calls.popleft()
            except IndexError:     # the holder of a parked loop took the last one
                break
            served += 1
            self._guarded(owner, fn, *args)
        return served

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self.run_once(None)

    def close(self) -> None:
        """Stop the thread (after what is queued) and close the loop's own fds."""
        self._stopping = True
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)
            if threading.current_thread() is not self._thread:
                self._thread.join(5)
            self._thread = None
        with self._lock:
            self._sources.clear()
        self._epoll.close()
        os.close(self._wake)
