"""Device sections of a live stream that no spec describes: kept as received, decoded when the trailer comes.

On a live stream the JSON trailer, which describes every device section,
arrives only after EOF, so a section with no spec (a device the spec set
does not cover, or a newer version than its spec) cannot be decoded when it
arrives.  Its end is still known: QEMU closes each section with a footer
(``0x7e`` and the section id), and what follows a footer is the header of
the next record.  :func:`read_to_footer` keeps the bytes up to that footer;
once the trailer has arrived, :func:`decode_kept` decodes them by the
trailer's description and insists that it covers them exactly, so a footer
pattern that happened to occur inside the payload is an error, never a
wrong value.
"""

from __future__ import annotations

import struct

from vmsd.migration.limits import MAX_UNDESCRIBED_SECTION
from vmsd.runtime.errors import MalformedStream, RegistryError, TruncatedStream, VMSDError
from vmsd.runtime.generic import decode_body
from vmsd.runtime.io import Reader
from vmsd.runtime.markers import QEMU_VM_SECTION_FOOTER
from vmsd.runtime.vmdesc import Obj

_EOF, _START, _PART, _END, _FULL, _VMDESCRIPTION, _COMMAND = 0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x08
_LONGEST_HEADER = 1 + 4 + 1 + 255 + 4 + 4  # kind, section id, idstr length and idstr, instance, version


class NoTrailer(RegistryError):
    """A section waits for the trailer, and the stream ended without one."""


def read_to_footer(r: Reader, section_id: int, iterative: set[int], commands: set[int]) -> bytes:
    """The payload of section ``section_id`` from the reader's position up to its footer (left unread).

    A footer counts only where a record can follow it: EOF and the trailer's
    framing (a section waiting for the trailer implies there is one), the full
    header of a section (an idstr of printable characters), a PART or END of
    one of the ``iterative`` sections that are open, or a command of a known
    number.  A stream that ends after a footer and EOF without a trailer is a
    :class:`NoTrailer`.

    Only what has arrived is searched, and the source is read again only when
    that does not decide: a source waiting for our answer after its last
    record (QEMU's return path) has sent everything this needs.
    """
    footer = struct.pack(">BI", QEMU_VM_SECTION_FOOTER, section_id)
    start = r.tell()
    got = bytearray()
    searched = 0
    while True:
        more = r.take_buffered()
        if not more:
            at = got.find(footer, searched)
            if at >= 0 and got[at + len(footer) :] == bytes([_EOF]):
                raise NoTrailer("the stream ended at EOF without the trailer", offset=start + at + len(footer))
            raise TruncatedStream(f"the stream ended before the footer of section {section_id} "
                                  f"({len(got)} bytes of it arrived)", offset=start + len(got))
        got += more
        if len(got) > MAX_UNDESCRIBED_SECTION + _LONGEST_HEADER:
            raise MalformedStream(f"no footer within {MAX_UNDESCRIBED_SECTION} bytes: a section no spec describes "
                                  "is kept only up to that size", offset=start)
        at = got.find(footer, searched)
        while at >= 0:
            follows = _record_follows(got[at + len(footer) :], iterative, commands)
            if follows is None:
                break  # too few bytes after this footer to tell: wait for more
            if follows:
                r.rebuffer(bytes(got[at:]), start + at)
                return bytes(got[:at])
            at = got.find(footer, at + 1)
        searched = at if at >= 0 else max(0, len(got) - len(footer) + 1)


def _record_follows(after: bytearray, iterative: set[int], commands: set[int]) -> bool | None:
    """Whether ``after`` starts a record that may follow a section; None when more bytes are needed to tell."""
    if not after:
        return None
    kind = after[0]
    if kind == _EOF:  # and the trailer: 0x06, its length, and JSON's opening brace
        return None if len(after) < 7 else after[1] == _VMDESCRIPTION and after[6:7] == b"{"
    if kind == _COMMAND:
        return None if len(after) < 3 else int.from_bytes(after[1:3], "big") in commands
    if kind in (_PART, _END):
        return None if len(after) < 5 else int.from_bytes(after[1:5], "big") in iterative
    if kind in (_START, _FULL):  # kind, section id, idstr length and idstr, instance, version
        if len(after) < 6 or len(after) < 6 + after[5] + 8:
            return None
        idstr = after[6 : 6 + after[5]]
        return len(idstr) > 0 and all(0x20 <= b < 0x7F for b in idstr)
    return False


def decode_kept(raw: bytes, offset: int, device: Obj) -> Obj | bytes:
    """``raw`` (read at stream ``offset``) decoded by the trailer's ``device`` entry: its values, or for a
    legacy (save_state) section, which the trailer describes as one buffer, the bytes themselves."""
    if "vmsd_name" not in [k for k, _ in device]:
        size = device.get("size", 0)
        if size != len(raw):
            raise MalformedStream(f"the trailer describes {size} bytes, {len(raw)} arrived before the section's "
                                  "footer", offset=offset)
        return raw
    r = Reader()
    r.rebuffer(raw, offset)
    try:
        values = decode_body(r, device)
    except TruncatedStream:
        raise MalformedStream(f"the trailer describes more than the {len(raw)} bytes that arrived before the "
                              "section's footer", offset=offset) from None
    except VMSDError:
        raise
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise MalformedStream(f"the trailer's description of this section is malformed ({e})", offset=offset) from None
    if r.tell() != offset + len(raw):
        raise MalformedStream(f"the trailer describes {r.tell() - offset} bytes, {len(raw)} arrived before the "
                              "section's footer", offset=offset)
    return values
