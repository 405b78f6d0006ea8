"""A userspace TCP relay between a migration's two ends that tests can stall and reset.

Its sockets live in the network namespace of the thread that builds it (see
``netns.Link.call_in``): the relay's threads start from that one and inherit it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
_HELD = 1 << 20  # bytes read from one end and not yet written to the other, at most


class Relay:
    """Listens on ``listen_at``; each connection is forwarded to ``target`` both ways.

    :meth:`stall` stops forwarding in both directions: the relay reads and
    writes nothing, while its kernel still acknowledges what fits in its
    buffers and answers keepalives, so neither end sees a dead peer -- only
    the bytes stop.  With ``stall_after`` it stalls by itself once that many
    bytes came from the source, in the middle of the stream.  :meth:`reset`
    aborts every open connection on both sides with RST.
    """

    def __init__(self, listen_at: tuple[str, int], target: tuple[str, int], stall_after: int | None = None) -> None:
        self._server = socket.create_server(listen_at)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self.target = target
        self.stall_after = stall_after
        self.from_source = 0  # bytes read from sources
        self.connections = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._stalled = threading.Event()  # set once a connection saw the stall
        self._resets: list[threading.Event] = []  # one per open connection
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def uri(self) -> str:
        return f"tcp:{self.address[0]}:{self.address[1]}"

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._stalled.clear()
        self._flowing.set()

    def wait_stalled(self, timeout: float) -> bool:
        """Whether a connection is held (after :meth:`stall` or ``stall_after``) within ``timeout`` seconds."""
        return self._stalled.wait(timeout)

    def reset(self) -> None:
        """Abort the open connections, both sides, with RST (the relay keeps accepting new ones)."""
        with self._lock:
            resets, self._resets = self._resets, []
        for r in resets:
            r.set()

    def close(self) -> None:
        """Close every connection, stop listening and join the threads."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._server.close()
        for t in list(self._threads):
            t.join(10)
            assert not t.is_alive(), "relay thread did not end"

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- threads
    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name="test relay")  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                src, _ = self._server.accept()
            except OSError:
                return
            try:
                dst = socket.create_connection(self.target, timeout=10)
            except OSError:
                src.close()
                continue
            reset = threading.Event()
            with self._lock:
                self._resets.append(reset)
                self.connections += 1
            self._spawn(self._serve, src, dst, reset)

    def _take(self, n: int) -> int:
        """How many of ``n`` bytes from a source may pass before ``stall_after`` stalls the relay."""
        with self._lock:
            if self.stall_after is None:
                return n
            room = self.stall_after - self.from_source
            if room <= 0:
                self.stall_after = None
                self._flowing.clear()
                return 0
            return min(n, room)

    def _serve(self, src: socket.socket, dst: socket.socket, reset: threading.Event) -> None:
        """One connection, both directions, in one thread (so that this thread alone closes the sockets:
        an RST goes out at once, not when another thread's blocked call lets go of the socket)."""
        peer = {src: dst, dst: src}
        held = {src: bytearray(), dst: bytearray()}  # read from the key, to be written to its peer
        ended: set[socket.socket] = set()  # ends that sent FIN
        shut: set[socket.socket] = set()  # ends we sent FIN to
        for s in peer:
            s.setblocking(False)
        try:
            while not (self._closed.is_set() or reset.is_set()):
                flowing = self._flowing.is_set()
                if not flowing:
                    self._stalled.set()
                readers = [s for s in peer if flowing and s not in ended and len(held[s]) < _HELD]
                writers = [peer[s] for s in peer if flowing and held[s]]
                readable, writable, _ = select.select(readers, writers, [], 0.05)
                for s in readable:
                    want = self._take(65536) if s is src else 65536
                    if not want:
                        continue
                    data = s.recv(want)
                    if not data:
                        ended.add(s)
                        continue
                    held[s] += data
                    if s is src:
                        with self._lock:
                            self.from_source += len(data)
                for t in writable:
                    buf = held[peer[t]]
                    del buf[:t.send(buf)]
                for s in ended:
                    if not held[s] and peer[s] not in shut:
                        peer[s].shutdown(socket.SHUT_WR)
                        shut.add(peer[s])
                if len(shut) == 2:
                    return
        except OSError:
            pass  # an end went away: the migration reports it
        finally:
            for s in peer:
                with contextlib.suppress(OSError):
                    if reset.is_set():
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
                    s.close()
