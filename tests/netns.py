"""Two "hosts" for tests of real network faults: two network namespaces joined by a veth pair.

Needs root (CI runs as root) and iproute2 (``ip``, ``tc``; scripts/setup.sh
installs it).  Each :class:`Link` has its own namespaces and interface names,
so tests may run side by side; :func:`link` deletes them (and with them the
veth pair) however the test ends.

Python code joins a side with :meth:`Link.call_in`: a thread enters the
namespace (setns(2) changes only the calling thread) and runs a function
there; threads that function starts inherit the namespace, so a
``Migration.start()`` or a relay built there has every socket on that side.
Programs (QEMU, the ``vmsd`` CLI) run there with ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="network namespaces and veth pairs need root (CI runs as root)")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count()


def _ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Link:
    """Side 0 (``10.77.0.1``) and side 1 (``10.77.0.2``), each a namespace with one end of the veth pair."""

    ADDRESSES = ("10.77.0.1", "10.77.0.2")

    def __init__(self) -> None:
        n = next(_serial)
        tag = f"{os.getpid() % 100000}x{n}"
        self.ns = (f"vmsd-test-{tag}-a", f"vmsd-test-{tag}-b")
        self.dev = (f"vt{tag}a", f"vt{tag}b")  # IFNAMSIZ: at most 15 characters
        self.procs: list[subprocess.Popen[str]] = []

    def create(self) -> None:
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.dev[1],
            "netns", self.ns[1])
        for side in (0, 1):
            _ip("-n", self.ns[side], "addr", "add", f"{self.ADDRESSES[side]}/24", "dev", self.dev[side])
            _ip("-n", self.ns[side], "link", "set", self.dev[side], "up")
            _ip("-n", self.ns[side], "link", "set", "lo", "up")

    def delete(self) -> None:
        """End the processes started on the link, then delete both namespaces (which deletes the veth pair)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for ns in self.ns:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)

    # ---- faults
    def rate_limit(self, side: int, rate: str, burst: str = "32kb", latency: str = "100ms") -> None:
        """Shape what ``side`` sends with a token bucket (tc tbf)."""
        subprocess.run(["tc", "-n", self.ns[side], "qdisc", "add", "dev", self.dev[side], "root", "tbf", "rate", rate,
                        "burst", burst, "latency", latency], check=True, timeout=30, capture_output=True)

    def shaped_bytes(self, side: int) -> int:
        """Bytes the qdisc of ``side`` has sent (``tc -s``)."""
        out = subprocess.run(["tc", "-n", self.ns[side], "-s", "qdisc", "show", "dev", self.dev[side]],
                             check=True, timeout=30, capture_output=True, text=True).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        assert m is not None, out
        return int(m.group(1))

    def set_link(self, side: int, up: bool) -> None:
        """Cut (``up=False``) or restore ``side``'s end of the link (``ip link set down/up``)."""
        _ip("-n", self.ns[side], "link", "set", self.dev[side], "up" if up else "down")

    # ---- running things on a side
    def call_in(self, side: int, fn: Callable[[], T]) -> T:
        """``fn()`` run by a thread inside ``side``'s namespace; its result, or its exception raised here."""
        box: list[T] = []
        error: list[BaseException] = []

        def enter_and_run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns[side]}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.ns[side]}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box.append(fn())
            except BaseException as e:
                error.append(e)

        t = threading.Thread(target=enter_and_run, name=f"in {self.ns[side]}")
        t.start()
        t.join()
        if error:
            raise error[0]
        return box[0]

    def popen(self, side: int, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """``cmd`` in ``side``'s namespace (``ip netns exec`` execs it: the pid is the program's), stdout and
        stderr piped; ended in :meth:`delete` if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[side], *cmd], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def exists(self) -> bool:
        """Whether either namespace is still there."""
        listed = _ip("netns", "list")
        return any(re.search(rf"^{re.escape(ns)}\b", listed, re.MULTILINE) for ns in self.ns)


@contextlib.contextmanager
def link() -> Iterator[Link]:
    """A fresh :class:`Link`, deleted afterwards even when creating it or the test failed."""
    lk = Link()
    try:
        lk.create()
        yield lk
    finally:
        lk.delete()
        assert not lk.exists(), f"namespaces {lk.ns} left behind"
