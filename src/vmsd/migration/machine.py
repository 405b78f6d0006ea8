"""A Python machine: named RAM blocks, typed devices, run state, dirty tracking, throttling.

Device authors build a :class:`Machine`, give it RAM (memfd-backed
:class:`~vmsd.migration.ram.blocks.RamBlock` objects) and devices (instances of
generated classes, each under its section ``idstr`` and instance id), and run
their guest work inside :meth:`Machine.vcpu`:

.. code-block:: python

    m = Machine("my-board")
    ram = m.add_ram("pc.ram", 1 << 30)
    m.add_device("serial", Serial(divider=12))
    with m.vcpu():                       # blocks while paused; throttled by auto-converge
        ram.write(0x1000, b"hello")      # marks the page dirty

**Dirty tracking.**  :meth:`RamBlock.write` and :meth:`RamBlock.mark_dirty`
set bits in the block's dirty log, which a migration takes atomically at each
bitmap sync.  Code that writes the mapping directly (``block.view``,
``block.bytes_``, another process through the memfd) must call
``mark_dirty``/``mark_pages`` itself; nothing else tracks it.

**Run state.**  :meth:`pause` waits until no thread is inside ``vcpu()``, so
a paused machine's RAM and devices hold still (a migration's final pass relies
on it); pause and resume hooks run after the state changed.  Auto-converge
throttles a running machine through :meth:`set_throttle`: each ``vcpu()``
step is followed by a sleep so that the step takes ``100 - pct`` percent of
the wall time, as QEMU's CPU throttle does for vCPUs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from vmsd.migration.ram.blocks import RamBlock, RamBlocks


@attrs.define
class Device:
    """One migratable device: a generated-class instance under QEMU's section identity."""

    idstr: str
    instance_id: int
    state: Any  # a VMStateObject
    version_id: int  # the version its section is saved at

    @property
    def key(self) -> tuple[str, int]:
        return (self.idstr, self.instance_id)


class Machine:
    """RAM blocks and devices with pause/resume and dirty tracking (see the module docstring)."""

    def __init__(self, name: str = "vmsd", ram_factory: Callable[[str, int], RamBlock] = RamBlock.memfd) -> None:
        self.name = name
        self.ram = RamBlocks(ram_factory)
        self.devices: dict[tuple[str, int], Device] = {}
        self._cond = threading.Condition()
        self._paused = False
        self._inside = 0
        self._throttle = 0
        self._on_pause: list[Callable[[], None]] = []
        self._on_resume: list[Callable[[], None]] = []

    # -- composition --------------------------------------------------------------------------------------------------
    def add_ram(self, name: str, size: int, prealloc: bool = False) -> RamBlock:
        """A memfd-backed block; ``prealloc`` maps every page now (QEMU's ``prealloc=on``)."""
        block = self.ram.create(name, size)
        if prealloc:
            block.prealloc()
        return block

    def add_device(self, idstr: str, state: Any, instance_id: int = 0, version_id: int | None = None) -> Device:
        """Register ``state`` (a generated-class instance) as section ``idstr``/``instance_id``."""
        key = (idstr, instance_id)
        if key in self.devices:
            raise ValueError(f"duplicate device section '{idstr}' instance {instance_id}")
        if not hasattr(type(state), "VMSD_NAME"):
            raise TypeError(f"device '{idstr}': {type(state).__name__} is not a generated VMState class")
        version = type(state).VERSION_ID if version_id is None else version_id
        dev = Device(idstr, instance_id, state, version)
        self.devices[key] = dev
        return dev

    def device(self, idstr: str, instance_id: int = 0) -> Any:
        """The state object of a device."""
        return self.devices[(idstr, instance_id)].state

    # -- run state ----------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self._paused

    @property
    def throttle(self) -> int:
        """CPU throttle percentage set by auto-converge (0: none)."""
        return self._throttle

    def set_throttle(self, percentage: int) -> None:
        self._throttle = max(0, min(99, int(percentage)))

    def on_pause(self, hook: Callable[[], None]) -> None:
        self._on_pause.append(hook)

    def on_resume(self, hook: Callable[[], None]) -> None:
        self._on_resume.append(hook)

    @contextmanager
    def vcpu(self) -> Iterator[None]:
        """One step of guest work: waits while paused, counts as running, then pays the throttle."""
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._inside += 1
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                if not self._inside:
                    self._cond.notify_all()
        pct = self._throttle
        if pct:
            time.sleep((time.monotonic() - start) * pct / (100 - pct))

    def pause(self, timeout: float | None = None) -> None:
        """Stop guest work: returns once no thread is inside :meth:`vcpu`."""
        with self._cond:
            if self._paused:
                return
            self._paused = True
            if not self._cond.wait_for(lambda: self._inside == 0, timeout):
                self._paused = False
                self._cond.notify_all()
                raise TimeoutError(f"machine '{self.name}': guest work did not stop within {timeout}s")
        for hook in self._on_pause:
            hook()

    def resume(self) -> None:
        with self._cond:
            if not self._paused:
                return
            self._paused = False
            self._cond.notify_all()
        for hook in self._on_resume:
            hook()

    # -- lifetime -----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.ram.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running"
        return f"Machine({self.name!r}, {len(self.ram)} RAM blocks, {len(self.devices)} devices, {state})"
