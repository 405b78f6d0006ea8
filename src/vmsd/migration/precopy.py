"""Live migration of a :class:`~vmsd.migration.machine.Machine`: the source side of QEMU-style precopy.

The stream is QEMU's (framed by :class:`~vmsd.migration.stream.SavevmWriter`,
wire choices from the peer's :mod:`~vmsd.migration.profile`): header,
configuration, the ``ram`` section (START with the block list, PART per
iteration, END with the last dirty pages while the machine is paused), one
FULL section per device, EOF and the JSON trailer.  With ``x-ignore-shared``
the shared blocks' pages stay where they are.  The source follows QEMU's
``migration_iteration_run``:

* every 100 ms the bandwidth of the last window gives the threshold
  ``bandwidth x downtime-limit``; when the pending dirty bytes fit under it
  the machine pauses and the rest goes out (the downtime);
* an iteration sends dirty pages of the current pass for at most 50 ms or
  until the window's share of ``max-bandwidth`` is used (0: unlimited);
* a pass ends when its pages are sent; the next bitmap sync takes the dirty
  log of every block (``dirty-sync-count``);
* XBZRLE (capability ``xbzrle``) starts after the first complete pass;
* auto-converge (capability ``auto-converge``) throttles the machine when the
  bytes dirtied in a sync period exceed ``throttle-trigger-threshold`` percent
  of the bytes sent, at every second such period: ``cpu-throttle-initial``
  then ``+cpu-throttle-increment`` up to ``max-cpu-throttle``.

Those rules are :mod:`vmsd.migration.policy`, functions of the numbers this
module measures; the counters and the ``query-migrate`` answer are
:mod:`vmsd.migration.stats`; the status changes go through the table of
:mod:`vmsd.migration.status`.

Failure or cancel at any point leaves the source machine running with its RAM
and devices as they were (the source only reads them); a ``file:`` target is
removed, never left looking complete.  :meth:`Migration.query` answers with
QEMU's ``query-migrate`` names.

The destination is :mod:`vmsd.migration.incoming`.

With the ``return-path`` capability (QEMU's name) the source opens QEMU's
return path and only reports ``completed`` once the destination answers
``SHUT`` with status 0 -- otherwise a destination that fails on the last
bytes would go unnoticed, as in QEMU without a return path.
"""

from __future__ import annotations

import errno
import queue
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np

from vmsd.migration import policy
from vmsd.migration.cpr import KEEPS_RAM, MODES
from vmsd.migration.cpr.exec import exec_program, persist_state, unpersist_state
from vmsd.migration.cpr.ram import ram_entries
from vmsd.migration.cpr.state import CprError
from vmsd.migration.cpr.transfer import await_hangup, send_state
from vmsd.migration.machine import Machine
from vmsd.migration.multifd import (
    MultifdConfig,
    MultifdSender,
    initial_packet,
)
from vmsd.migration.profile import NEWEST, PeerProfile
from vmsd.migration.ram.blocks import PAGE_SIZE, Pages, RamBlock
from vmsd.migration.ram.mapped import CAP_MAPPED_RAM, MappedRamFile
from vmsd.migration.ram.records import RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SECTION_VERSION, RamContext
from vmsd.migration.ram.wire import RamEncoder, zero_mask
from vmsd.migration.ram.xbzrle import XbzrleCache
from vmsd.migration.stats import MigrationStats
from vmsd.migration.status import MigrationStatus, check_transition
from vmsd.migration.stream import (
    CAP_IGNORE_SHARED,
    IDSTR_RAM,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_RP_MSG_SHUT,
    QEMU_VM_SECTION_FULL,
    MachineConfiguration,
    SavevmWriter,
    Section,
)
from vmsd.migration.transport import (
    Channel,
    FileURI,
    TcpURI,
    TlsConfig,
    TransportError,
    UnixURI,
    open_outgoing,
    parse_uri,
)
from vmsd.runtime.errors import VMSDError

# Not 0: QEMU 7.2 finds the handler of a PART/END section by the id its START
# set, and every handler not loaded yet still has id 0 -- the first of them
# (``timer``) would take RAM's records.
RAM_SECTION_ID = 1
_CHUNK_PAGES = 2048  # pages encoded and written at a time (8 MiB of normal pages)
_HAND_OVER_BYTES = 1 << 20  # smaller batches are written by the migration thread itself (see _WriteBehind)

PARAMETER_DEFAULTS: dict[str, int] = {
    "max-bandwidth": NEWEST.max_bandwidth,  # bytes/s (the peer's profile has the default); 0 = unlimited
    "downtime-limit": 300,  # ms
    "xbzrle-cache-size": 64 << 20,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "max-cpu-throttle": 99,
    "throttle-trigger-threshold": 50,
}
CAPABILITIES = ("xbzrle", "auto-converge", "return-path", "events", "multifd", "x-ignore-shared", "mapped-ram")
# QEMU's TLS parameters name a credentials object and a host: here they are a TlsConfig (``tls=``).
TLS_PARAMETERS = ("tls-creds", "tls-hostname", "tls-authz")


class MigrationError(VMSDError):
    """A migration failed; ``message`` is the reason ``query-migrate`` reports."""


class Cancelled(MigrationError):
    pass


def parse_settings(capabilities: dict[str, bool] | None, parameters: dict[str, int] | None,
                   peer: PeerProfile = NEWEST) -> tuple[dict[str, bool], dict[str, int]]:
    """Validate QEMU-named capabilities and parameters; unknown names are an error, as in QEMU.

    Parameters not given take ``peer``'s defaults."""
    caps = dict.fromkeys(CAPABILITIES, False)
    for name, on in (capabilities or {}).items():
        if name not in caps:
            raise ValueError(f"capability '{name}' is not supported (supported: {', '.join(CAPABILITIES)})")
        caps[name] = bool(on)
    params = {**PARAMETER_DEFAULTS, "max-bandwidth": peer.max_bandwidth}
    for name, value in (parameters or {}).items():
        if name in TLS_PARAMETERS:
            raise ValueError(f"parameter '{name}' is given as tls=TlsConfig(creds, hostname) "
                             "(vmsd outgoing/incoming: --tls-creds DIR, --tls-hostname NAME)")
        if name not in params:
            raise ValueError(f"parameter '{name}' is not supported (supported: {', '.join(PARAMETER_DEFAULTS)})")
        if value < 0:
            raise ValueError(f"parameter '{name}' must not be negative")
        params[name] = int(value)
    for name in ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle"):
        if not 1 <= params[name] <= 99:
            raise ValueError(f"parameter '{name}' expects a value between 1 and 99")
    if not 1 <= params["throttle-trigger-threshold"] <= 100:
        raise ValueError("parameter 'throttle-trigger-threshold' expects a value between 1 and 100")
    if caps["xbzrle"]:
        XbzrleCache(params["xbzrle-cache-size"])  # QEMU's size checks
    return caps, params


@attrs.define
class _Pass:
    """The dirty pages of the current pass, per block, and how far sending got."""

    pages: list[tuple[RamBlock, Pages]] = attrs.Factory(list)
    block: int = 0
    cursor: int = 0

    def remaining(self) -> int:
        total = 0
        for i in range(self.block, len(self.pages)):
            total += int(self.pages[i][1].size) - (self.cursor if i == self.block else 0)
        return total

    def take(self, limit: int) -> tuple[RamBlock, Pages] | None:
        while self.block < len(self.pages):
            block, pages = self.pages[self.block]
            if self.cursor < pages.size:
                chunk = pages[self.cursor:self.cursor + limit]
                self.cursor += int(chunk.size)
                return block, chunk
            self.block += 1
            self.cursor = 0
        return None

    def unsent(self) -> dict[str, Pages]:
        out: dict[str, Pages] = {}
        for i in range(self.block, len(self.pages)):
            block, pages = self.pages[i]
            out[block.name] = pages[self.cursor if i == self.block else 0:]
        return out


class _WriteBehind:
    """Writes the main channel's buffers from a thread, so that the migration thread encodes the next
    chunk (zero scan and record headers, numpy, GIL released) while the kernel copies this one's pages
    from RAM into the socket.

    At most ``depth`` batches wait.  The first write error is kept, later batches are dropped, and the
    error is raised to the migration thread at its next :meth:`write` or :meth:`flush`.

    A small batch (zero-page records, section framing) is written by the caller when nothing is queued
    or being written: handing it over would cost two thread switches for a copy shorter than either.
    """

    def __init__(self, ch: Channel, depth: int = 2) -> None:
        self.ch = ch
        self.error: BaseException | None = None
        self._queue: queue.Queue[list[Any] | threading.Event | None] = queue.Queue(maxsize=depth)
        self._busy = 0  # batches handed over and not yet written
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="migration writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self.error is None:
                try:
                    self.ch.writev(item)
                except BaseException as e:  # raised in the migration thread
                    self.error = e
            with self._busy_lock:
                self._busy -= 1

    def write(self, buffers: list[Any], nbytes: int) -> None:
        if nbytes < _HAND_OVER_BYTES and not self._busy:
            # Nothing is in flight (the count only drops once a batch is written): order is kept.
            self._check()
            self.ch.writev(buffers)
            return
        with self._busy_lock:
            self._busy += 1
        self._put(buffers)

    def flush(self) -> None:
        """Return once everything handed over so far is written."""
        done = threading.Event()
        self._put(done)
        while not done.wait(0.1):
            self._check()
        self._check()

    def stop(self) -> None:
        """End the thread (after the queued batches, or at once if the channel was aborted)."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(10)

    def _put(self, item: list[Any] | threading.Event) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _check(self) -> None:
        if self.error is not None:
            raise self.error


class Migration:
    """Precopy of ``machine`` to ``uri``: :meth:`start` in a thread or :meth:`run` in this one."""

    def __init__(self, machine: Machine, uri: str, capabilities: dict[str, bool] | None = None,
                 parameters: dict[str, int] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None, timeout: float = 30.0,
                 multifd: MultifdConfig | None = None, peer: PeerProfile | None = None, mode: str = "normal",
                 cpr_channel: str | None = None, cpr_exec_command: list[str] | None = None,
                 tls: TlsConfig | None = None) -> None:
        """``tls``: QEMU's ``tls-creds`` and ``tls-hostname``; the main channel and every multifd channel
        then carry TLS (see :mod:`vmsd.migration.transport.tls`).

        ``mode`` is QEMU's migration mode: ``normal`` (precopy), or a CPR mode, where the machine stops
        when the main channel connects: ``cpr-reboot`` (RAM copied, or left in shared files with
        x-ignore-shared), ``cpr-transfer`` (RAM memfds handed to the new side over ``cpr_channel``, a
        ``unix:`` URI, before the main stream) and ``cpr-exec`` (this process execs ``cpr_exec_command``
        once the stream is complete; the RAM descriptors survive the exec).

        ``timeout`` (seconds) bounds connecting, pausing the machine, and every wait on the peer: a socket
        channel on which nothing moves for that long fails the migration with ``ETIMEDOUT`` (its idle limit,
        :mod:`vmsd.migration.transport.idle`), so a dead link or a stalled destination never hangs the source;
        a link back within it loses nothing."""
        if not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.machine = machine
        self.uri = uri
        if peer is None:
            peer = multifd.peer if multifd is not None else NEWEST
        elif multifd is not None and multifd.peer != peer:
            raise ValueError(f"the multifd configuration is for {multifd.peer}, the migration for {peer}")
        self.peer = peer
        self.capabilities, self.parameters = parse_settings(capabilities, parameters, peer)
        _check_mode(mode, peer, uri, cpr_channel, cpr_exec_command, multifd is not None or self.capabilities["multifd"])
        self.mode = mode
        self.cpr_channel = cpr_channel
        self.cpr_exec_command = list(cpr_exec_command or [])
        self._cpr_state_fd: int | None = None  # cpr-exec: the persisted state, until the exec
        if multifd is None and self.capabilities["multifd"]:
            multifd = MultifdConfig(peer=peer)
        to_file = isinstance(parse_uri(uri), FileURI)
        mapped_ram = self.capabilities["mapped-ram"]
        if multifd is not None:
            if self.capabilities["xbzrle"]:
                raise ValueError("capability 'xbzrle' is not compatible with capability 'multifd'")
            if to_file and not mapped_ram:
                raise ValueError("multifd needs a socket transport (tcp: or unix:), or mapped-ram to a file:")
        # mapped-ram: pages go to their places in the file, written by as many threads as multifd has
        # channels (QEMU's channels are the file opened again); no multifd packet exists.
        self._mapped_workers = 0
        self._mapped: MappedRamFile | None = None
        if mapped_ram:
            if not to_file:
                raise ValueError("mapped-ram writes to a file: URI")
            if self.capabilities["xbzrle"]:
                raise ValueError("capability 'xbzrle' is not compatible with capability 'mapped-ram'")
            if multifd is not None and multifd.compression != "none":
                raise ValueError("mapped-ram does not take multifd compression")
            self._mapped_workers = multifd.channels if multifd is not None else 1
            multifd = None
        self.multifd = multifd
        self.tls = tls
        # Built now, so that a credentials folder that cannot serve fails here, before anything connects.
        self._tls_context = _tls_client(tls, uri, mode) if tls is not None else None
        self._sender: MultifdSender | None = None
        self._multifd_channels: list[Channel] = []
        self._multifd_seen = 0
        self.on_progress = on_progress
        self.timeout = timeout
        self.status = MigrationStatus.NONE  # changed only by _set_status
        self._status_lock = threading.Lock()
        self.error: str | None = None
        self.stats = MigrationStats()
        # Its count of high periods lasts the whole migration, as QEMU's RAMState's does.
        self._auto_converge = policy.AutoConverge.from_parameters(self.parameters) \
            if self.capabilities["auto-converge"] else None
        cache = XbzrleCache(self.parameters["xbzrle-cache-size"]) if self.capabilities["xbzrle"] else None
        self.encoder = RamEncoder(cache)  # zero-copy or not: decided by the main channel (see _migrate)
        self._framing = SavevmWriter(profile=self.peer)  # the trailer by the peer's rules
        # The blocks whose pages go on the wire: with x-ignore-shared, shared blocks stay where they are;
        # in cpr-transfer and cpr-exec every block does.
        self._sent = [] if mode in KEEPS_RAM else \
            [b for b in machine.ram if not (self.capabilities["x-ignore-shared"] and b.shared)]
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: Channel | None = None
        self._writer: _WriteBehind | None = None
        self._paused_here = False

    # -- control ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run in a background thread; follow it with :meth:`query` and :meth:`wait`."""
        self._thread = threading.Thread(target=self.run, name=f"migration to {self.uri}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.query()

    def cancel(self) -> None:
        """Stop the migration; the machine keeps running (``migrate_cancel``)."""
        self._cancel.set()
        ch = self._channel
        if ch is not None:
            ch.shutdown()  # wake a write blocked on a peer that stopped reading

    def run(self) -> dict[str, Any]:
        """Migrate; returns the final :meth:`query`.  Never raises for migration failures: see ``status``."""
        self._set_status(MigrationStatus.SETUP)
        try:
            self._migrate()
        except BaseException as e:  # every failure must leave the source running
            self._fail(e)
            if not isinstance(e, Exception):
                raise
        self._progress()
        return self.query()

    # -- the precopy loop ---------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        m = self.machine
        blocks = list(m.ram)
        if not blocks:
            raise MigrationError("the machine has no RAM blocks")
        cfg = self.multifd
        if self.mode != "normal":
            # CPR: the machine stops before the main channel connects; there is no live phase.
            m.pause(timeout=self.timeout)
            self._paused_here = True
            self._hand_over()
        # Newer QEMU tells channels apart by their first bytes, and its source connects multifd channels first.
        # A destination cannot look at the first bytes of a TLS channel before its handshake, so with TLS, as
        # with 7.2, the first connection is the main one.
        main_first = cfg is None or not cfg.peer.multifd_classifies_channels or self.tls is not None
        if cfg is not None and not main_first:
            self._open_multifd(cfg)
        self._channel = self._connect()
        # Pages leave from RAM by writev(2) where the channel has a descriptor; else (TLS) records are built
        # in one buffer, which the channel encrypts anyway.
        self.encoder.zero_copy = self._channel.fileno() >= 0
        self._writer = _WriteBehind(self._channel)
        if cfg is not None and main_first:
            self._open_multifd(cfg)
        self._check_cancel()
        f = self._framing
        ignore_shared = self.capabilities["x-ignore-shared"]
        # QEMU lists the capabilities it validates in the order of its enum: x-ignore-shared, mapped-ram.
        caps = tuple(name for name, on in ((CAP_IGNORE_SHARED, ignore_shared), (CAP_MAPPED_RAM, self._mapped_workers))
                     if on)
        head = [f.head(MachineConfiguration(m.name.encode(), caps))]
        if self.capabilities["return-path"]:
            head.append(f.command(MIG_CMD_OPEN_RETURN_PATH))
        head.append(f.start(RAM_SECTION_ID, IDSTR_RAM, RAM_SECTION_VERSION))
        context = RamContext(ignore_shared=ignore_shared, mapped_ram=bool(self._mapped_workers))
        if self._mapped_workers:
            self._send(head)
            self._writer.flush()  # the block list is written at the file's position, past every block's place
            self._mapped = MappedRamFile(self._channel.fileno(), self.uri, self._mapped_workers)
            before = self.encoder.counters.transferred
            self.encoder.mapped_block_list(m.ram, context, self._mapped)
            self.stats.window_bytes += self.encoder.counters.transferred - before
        else:
            head.append(self.encoder.block_list(m.ram, context))
            self._send(head)
        self._start_multifd()
        self._multifd_sync(True)
        self._send([self.encoder.eos(), f.footer(RAM_SECTION_ID)])
        # QEMU's first bitmap sync: every page is dirty; the dirty log starts empty.
        for b in self._sent:
            b.take_dirty()
        todo = _Pass([(b, np.arange(b.npages, dtype=np.int64)) for b in self._sent])
        st = self.stats
        st.dirty_sync_count = 1
        self._set_status(MigrationStatus.ACTIVE)
        if self.mode != "normal":
            self._complete(todo)  # stopped already: one pass of what is not kept in place
            if self.mode == "cpr-exec":
                self._exec()
            return
        while True:
            self._check_cancel()
            pending = todo.remaining() * PAGE_SIZE
            if policy.should_sync(pending, st.threshold):
                todo = self._sync(todo)
                pending = todo.remaining() * PAGE_SIZE
            st.remaining = pending
            if policy.should_complete(pending, st.threshold):
                self._complete(todo)
                return
            self._iterate(todo)

    def _iterate(self, todo: _Pass) -> None:
        """One PART section: dirty pages for at most policy.MAX_WAIT or the window's bandwidth share."""
        started = time.monotonic()
        buffers: list[Any] = [self._framing.part(RAM_SECTION_ID)]
        st = self.stats
        max_bandwidth = self.parameters["max-bandwidth"]
        while True:
            got = todo.take(policy.chunk_pages(max_bandwidth, st.window_bytes, _CHUNK_PAGES))
            if got is None:  # the pass is complete: XBZRLE starts with the next one
                self.encoder.xbzrle_enabled = self.capabilities["xbzrle"]
                break
            block, pages = got
            st.window_pages += int(pages.size)
            self._send_pages(buffers, block, pages)
            buffers = []
            self._check_cancel()
            if policy.iteration_over(time.monotonic() - started, max_bandwidth, st.window_bytes):
                break
        if buffers:
            self._send(buffers)
        # Older peers sync at every section end; newer ones once per pass (a MULTIFD_FLUSH).
        self._multifd_sync(self.multifd is not None and (self.multifd.legacy_sync or got is None))
        self._send([self.encoder.eos(), self._framing.footer(RAM_SECTION_ID)], 8)
        self._update_counters(todo)

    def _send_pages(self, buffers: list[Any], block: RamBlock, pages: Pages, last_stage: bool = False) -> None:
        """Pages on the main channel, or normal pages on the multifd channels (zero pages as the layout says)."""
        enc = self.encoder
        before = enc.counters.transferred
        if self._mapped is not None:
            if buffers:
                self._send(buffers)
            zero = zero_mask(block, pages)
            self._mapped.submit(block.name, block.bytes_.ctypes.data, pages, zero, block)
            written = int(pages.size - np.count_nonzero(zero))
            enc.counters.normal += written
            enc.counters.duplicate += int(pages.size) - written
            enc.counters.transferred += written * PAGE_SIZE
            self.stats.window_bytes += written * PAGE_SIZE
            return
        sender = self._sender
        if sender is None:
            buffers += enc.encode(block, pages, age=self.stats.dirty_sync_count, last_stage=last_stage)
            self._send(buffers, enc.counters.transferred - before)
            return
        cfg = self.multifd
        assert cfg is not None
        zero = zero_mask(block, pages) if cfg.zero_page_detection != "none" else np.zeros(pages.size, np.bool_)
        normal, zeros = pages[~zero], pages[zero]
        if cfg.zero_pages_in_packets:
            sender.send(block, normal, zeros)
            enc.counters.duplicate += int(zeros.size)
        else:
            # The zero pages' records go out first: the destination's main thread applies them while the
            # channels carry the normal pages, instead of after them.
            buffers += enc.encode(block, zeros, zero=zero[zero])  # scanned above: not read twice
            if buffers:
                self._send(buffers, enc.counters.transferred - before)
                buffers = []
            sender.send(block, normal, zeros[:0])
        enc.counters.normal += int(normal.size)
        if buffers:
            self._send(buffers, enc.counters.transferred - before)
        self._account_multifd()

    def _bytes_sent(self) -> int:
        return self.encoder.counters.transferred + (self._sender.total_bytes if self._sender is not None else 0)

    def _account_multifd(self) -> None:
        """Bytes the channel threads wrote since the last look count in the bandwidth window."""
        if self._sender is not None:
            total = self._sender.total_bytes
            self.stats.window_bytes += total - self._multifd_seen
            self._multifd_seen = total

    def _open_multifd(self, cfg: MultifdConfig) -> None:
        for i in range(cfg.channels):
            ch = self._connect()
            self._multifd_channels.append(ch)
            # At once, as QEMU's source does: QEMU's destination reads a channel's initial packet as soon as it
            # has the channel, in the thread that would do the next channel's TLS handshake.
            ch.write(initial_packet(cfg.uuid, i))

    def _connect(self) -> Channel:
        """A connection to the destination (the timeout is also its idle limit), through a TLS handshake when
        configured."""
        tls = self.tls
        return open_outgoing(self.uri, timeout=self.timeout, idle_timeout=self.timeout, tls=self._tls_context,
                             tls_hostname=tls.hostname if tls is not None else None)

    def _start_multifd(self) -> None:
        if self.multifd is not None and self._sender is None:
            self._sender = MultifdSender(self.multifd, self._multifd_channels, introduced=True)

    def _multifd_sync(self, now: bool) -> None:
        """A SYNC packet on every channel, then (newest layout) the MULTIFD_FLUSH record."""
        sender = self._sender
        if sender is None or not now:
            return
        sender.sync()
        cfg = self.multifd
        assert cfg is not None
        if not cfg.legacy_sync:
            self._send([struct.pack(">Q", RAM_SAVE_FLAG_MULTIFD_FLUSH)], 8)
            self.encoder.counters.transferred += 8

    def _send(self, buffers: list[Any], nbytes: int | None = None) -> None:
        writer = self._writer
        assert writer is not None
        nbytes = sum(len(b) for b in buffers) if nbytes is None else nbytes
        writer.write(buffers, nbytes)
        self.stats.window_bytes += nbytes

    def _update_counters(self, todo: _Pass) -> None:
        """QEMU's migration_update_counters + migration_rate_limit, after each iteration."""
        self._account_multifd()
        st = self.stats
        now = time.monotonic()
        delay = policy.rate_limit_delay(self.parameters["max-bandwidth"], st.window_bytes, now - st.window_start)
        if delay:
            self._cancel.wait(delay)  # a cancel ends the wait
            now = time.monotonic()
        spent = now - st.window_start
        if not policy.window_closed(spent):
            return
        st.remaining = todo.remaining() * PAGE_SIZE
        st.close_window(now, policy.window_rates(st.window_bytes, st.window_pages, spent, st.remaining,
                                                 self.parameters["downtime-limit"]))
        self._progress()

    def _sync(self, todo: _Pass) -> _Pass:
        """QEMU's migration_bitmap_sync: the unsent pages plus every block's dirty log."""
        if self._mapped is not None:
            self._mapped.drain()  # a page of this pass may be written again in the next: one after the other
        unsent = todo.unsent()
        pages: list[tuple[RamBlock, Pages]] = []
        dirtied = 0
        for b in self._sent:
            new = b.take_dirty()
            dirtied += int(new.size)
            old = unsent.get(b.name)
            if old is None or not old.size:
                merged = new
            elif not new.size:
                merged = old
            else:
                # A page map, not np.union1d: numpy 2's union1d hashes and sorts, 0.2 s for a 2 GiB
                # guest's pages, and this runs while the guest is paused for the last pass.
                both = np.zeros(b.npages, dtype=np.bool_)
                both[old] = True
                both[new] = True
                merged = np.flatnonzero(both)
            if merged.size:
                pages.append((b, merged))
        st = self.stats
        st.dirty_sync_count += 1
        st.period_dirty += dirtied
        now = time.monotonic()
        elapsed = now - st.period_start
        if policy.period_over(elapsed):
            if self._auto_converge is not None:  # QEMU's migration_trigger_throttle
                pct = self._auto_converge.period_end(st.period_dirty, st.period_sent(), self.machine.throttle)
                if pct is not None:
                    self.machine.set_throttle(pct)
            st.close_period(now, policy.dirty_pages_rate(st.period_dirty, elapsed))
        return _Pass(pages)

    def _complete(self, todo: _Pass) -> None:
        """Pause, send the last dirty pages, the devices, EOF and the trailer."""
        m = self.machine
        m.pause(timeout=self.timeout)
        self._paused_here = True
        self._set_status(MigrationStatus.DEVICE)  # the downtime starts
        todo = self._sync(todo)
        before = self._bytes_sent()
        self._send([self._framing.end(RAM_SECTION_ID)])
        while (got := todo.take(_CHUNK_PAGES)) is not None:
            self._check_cancel()
            block, pages = got
            self._send_pages([], block, pages, last_stage=True)
        if self._mapped is not None:
            self.encoder.counters.transferred += self._mapped.finish()  # every page is in place: the bitmaps
        self._multifd_sync(True)
        self._send([self.encoder.eos(), self._framing.footer(RAM_SECTION_ID)])
        self.stats.downtime_bytes = self._bytes_sent() - before
        self.stats.remaining = 0
        self._send([self._framing.tail([
            Section(QEMU_VM_SECTION_FULL, RAM_SECTION_ID + 1 + i, 0, dev.idstr, dev.instance_id, dev.version_id,
                    payload=dev.state)
            for i, dev in enumerate(m.devices.values())
        ])])
        ch, writer = self._channel, self._writer
        assert ch is not None and writer is not None
        writer.flush()
        writer.stop()
        self._writer = None
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        if self._sender is not None:
            self._sender.close()
            for mch in self._multifd_channels:
                mch.close()
        if self.capabilities["return-path"]:
            self._await_shut(ch)
        ch.close()
        self._channel = None
        self._set_status(MigrationStatus.COMPLETED)  # the machine stays paused, as QEMU's source in postmigrate

    def _hand_over(self) -> None:
        """The CPR state: over the cpr channel (cpr-transfer), or into the environment (cpr-exec)."""
        entries = ram_entries(self.machine.ram) if self.mode in KEEPS_RAM else []
        if self.mode == "cpr-transfer":
            assert self.cpr_channel is not None
            with open_outgoing(self.cpr_channel, timeout=self.timeout) as cch:
                send_state(cch, entries, self.peer)
                await_hangup(cch, self.timeout)
        elif self.mode == "cpr-exec":
            self._cpr_state_fd = persist_state(entries, self.peer)

    def _exec(self) -> None:
        """Become the new program; if the exec fails, the migration has failed and the machine runs on."""
        keep = self._cpr_state_fd
        assert keep is not None
        try:
            exec_program(self.cpr_exec_command, [keep, *(b.fd for b in self.machine.ram)])
        except CprError as e:
            self._cpr_state_fd = None
            unpersist_state(keep)
            self.error = e.message
            self._set_status(MigrationStatus.FAILED)
            self.machine.resume()
            self._paused_here = False

    def _await_shut(self, ch: Channel) -> None:
        """Wait for the destination's MIG_RP_MSG_SHUT on the return path."""
        try:
            head = ch.read_exact(4)
            kind, length = struct.unpack(">HH", head)
            body = ch.read_exact(length)
        except TransportError as e:
            if e.errno == errno.ETIMEDOUT:
                raise MigrationError(f"the destination did not confirm the load ({e.message})") from None
            raise MigrationError(f"destination closed the return path before confirming the load ({e.message})") \
                from None
        if kind != MIG_RP_MSG_SHUT or length != 4:
            raise MigrationError(f"unexpected return-path message {kind} of {length} bytes")
        status = struct.unpack(">I", body)[0]
        if status:
            raise MigrationError(f"destination failed to load the stream (status {status})")

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def _fail(self, e: BaseException) -> None:
        mapped, self._mapped = self._mapped, None
        if mapped is not None:
            mapped.close()  # no thread may write to the file's descriptor once it is closed (and reused)
        ch, self._channel = self._channel, None
        if ch is not None:
            ch.shutdown()  # wake the writer thread if it is blocked on a peer that stopped reading
            ch.abort()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        if self._sender is not None:
            self._sender.abort()
        for mch in self._multifd_channels:
            mch.abort()
        if self._cpr_state_fd is not None:
            unpersist_state(self._cpr_state_fd)
            self._cpr_state_fd = None
        if self._paused_here:
            self.machine.resume()
            self._paused_here = False
        if self._cancel.is_set():
            self.error = "migration cancelled"
            self._set_status(MigrationStatus.CANCELLED)
            return
        if isinstance(e, TransportError):
            reason = e.message if e.errno not in (errno.EPIPE, errno.ECONNRESET) else \
                f"{e.message}: the destination closed the connection"
        elif isinstance(e, VMSDError):
            reason = e.message
        else:
            reason = f"{type(e).__name__}: {e}"
        self.error = reason
        self._set_status(MigrationStatus.FAILED)

    def _set_status(self, new: MigrationStatus) -> None:
        """Every status change: checked against :data:`~vmsd.migration.status.TRANSITIONS` (an illegal one
        raises :class:`~vmsd.migration.status.IllegalTransition`), its time recorded in the statistics
        before the new status is visible to :meth:`query`."""
        now = time.monotonic()
        # Check and change at once: two run() calls on one Migration must not both leave "none".
        with self._status_lock:
            check_transition(self.status, new)
            self.stats.entered(new, now)
            self.status = new

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.query())

    # -- statistics ---------------------------------------------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        """The answer QEMU's ``query-migrate`` would give, with its names."""
        status = self.status
        if status is MigrationStatus.NONE:
            return {"status": status.value}
        sender = self._sender
        out = self.stats.query(status, time.monotonic(), self.encoder.counters,
                               sender.total_bytes if sender is not None else 0, self.machine.ram.total(),
                               self.parameters["xbzrle-cache-size"] if self.encoder.cache is not None else None)
        if sender is not None:  # not in QEMU's answer: per-channel counters
            out["multifd-channels"] = [attrs.asdict(st) for st in sender.stats]
        if self.machine.throttle:
            out["cpu-throttle-percentage"] = self.machine.throttle
        if self.error is not None:
            out["error-desc"] = self.error
        return out


def _tls_client(tls: TlsConfig, uri: str, mode: str) -> ssl.SSLContext:
    """The source's TLS context, after QEMU's checks: a socket transport, a name to check the peer against."""
    target = parse_uri(uri)
    if mode != "normal":
        raise ValueError(f"TLS with migration mode '{mode}' is not supported")
    if isinstance(target, FileURI):
        raise ValueError("TLS needs a socket transport (tcp:, unix:, or fd: naming a socket), not file:")
    if tls.verify_peer and tls.hostname is None and not (isinstance(target, TcpURI) and target.host):
        raise ValueError(f"no hostname available for TLS on {uri}: give tls-hostname (the name the destination's "
                         "certificate is checked against)")
    return tls.client_context()


def _check_mode(mode: str, peer: PeerProfile, uri: str, cpr_channel: str | None,
                cpr_exec_command: list[str] | None, multifd: bool) -> None:
    """QEMU's rules for a migration mode, checked before anything starts."""
    if mode not in MODES:
        raise ValueError(f"migration mode '{mode}' is not one of {', '.join(MODES)}")
    if mode != "normal" and mode not in peer.cpr_modes:
        raise ValueError(f"{peer} does not know migration mode '{mode}'")
    if mode != "normal" and multifd:
        raise ValueError(f"migration mode '{mode}' does not use multifd channels")
    if mode == "cpr-transfer":
        if cpr_channel is None or not isinstance(parse_uri(cpr_channel), UnixURI):
            raise ValueError("cpr-transfer needs a cpr channel that is a unix: socket")
        if isinstance(parse_uri(uri), FileURI):
            raise ValueError("cpr-transfer sends the main stream over a socket, not to a file:")
    elif cpr_channel is not None:
        raise ValueError(f"a cpr channel is only for cpr-transfer, not for mode '{mode}'")
    if mode == "cpr-exec" and not cpr_exec_command:
        raise ValueError("cpr-exec needs cpr-exec-command (the program to exec and its arguments)")
    if mode != "cpr-exec" and cpr_exec_command:
        raise ValueError(f"cpr-exec-command is only for cpr-exec, not for mode '{mode}'")
