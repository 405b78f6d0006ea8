"""Telling connections apart: the main channel and each multifd channel, accepted in any order."""

from __future__ import annotations

import errno
from collections.abc import Callable

from vmsd.migration.multifd.config import MultifdConfig
from vmsd.migration.multifd.packet import INITIAL_SIZE, MULTIFD_MAGIC, MultifdError, parse_initial
from vmsd.migration.transport import Channel, TransportError


def classify(ch: Channel, config: MultifdConfig, timeout: float) -> int | None:
    """None for the main channel (starts with QEVM); a multifd channel's id after its initial packet."""
    head = ch.peek(4, timeout)
    if head == b"QEVM":
        return None
    if len(head) == 4 and int.from_bytes(head, "big") == MULTIFD_MAGIC:
        return parse_initial(ch.read_exact(INITIAL_SIZE), config.uuid, config.channels, ch.name)
    raise MultifdError(f"{ch.name}: a connection that is neither the main channel nor a multifd channel "
                       f"(starts with {head.hex() or 'nothing'})")


def accept_all(accept: Callable[[], Channel], config: MultifdConfig, timeout: float
               ) -> tuple[Channel, list[Channel]]:
    """Accept the main channel and every multifd channel, in any order.

    Every connection is accepted before any is classified: a TLS source
    (QEMU 10.0 and newer) writes the main channel's first bytes only once
    every multifd channel's handshake is done, and a handshake needs us to
    accept the connection first.
    """
    opened: list[Channel] = []
    try:
        while len(opened) < config.channels + 1:
            try:
                opened.append(accept())
            except TransportError as e:
                if e.errno != errno.ETIMEDOUT:
                    raise
                raise _missing(opened, config, timeout, e.message) from None
        main, multifd = _sort(opened, config, timeout)
        # One more connection than multifd channels, each id at most once: one of them is the main channel.
        assert main is not None
    except BaseException:
        for ch in opened:
            ch.abort()
        raise
    return main, [multifd[i] for i in range(config.channels)]


def _sort(opened: list[Channel], config: MultifdConfig, timeout: float) -> tuple[Channel | None, dict[int, Channel]]:
    """The main channel (None if it is not among them) and the multifd channels by id."""
    main: Channel | None = None
    multifd: dict[int, Channel] = {}
    for ch in opened:
        cid = classify(ch, config, timeout)
        if cid is None:
            if main is not None:
                raise MultifdError(f"{ch.name}: a second main channel")
            main = ch
        elif cid in multifd:
            raise MultifdError(f"{ch.name}: channel id {cid} is already in use")
        else:
            multifd[cid] = ch
    return main, multifd


def _missing(opened: list[Channel], config: MultifdConfig, timeout: float, why: str) -> MultifdError:
    """The error naming the channels that did not connect (those that did are told apart first)."""
    main, multifd = _sort(opened, config, timeout)
    missing = [str(i) for i in range(config.channels) if i not in multifd]
    what = (["the main channel"] if main is None else []) + \
        ([f"multifd channel(s) {', '.join(missing)}"] if missing else [])
    return MultifdError(f"{' and '.join(what)} never connected ({why})")
