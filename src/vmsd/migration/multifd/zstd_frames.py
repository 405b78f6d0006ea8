"""Reading zstd frames without inflating them: what a payload can inflate to, and where its stored blocks are.

A zstd frame is a header (magic number, a descriptor byte, optional window,
dictionary id and content size) and blocks, each after a 3-byte header
(last-block bit, kind, size); a checksum may end it.  Raw ("stored") blocks
are their bytes as they are: where a payload is whole frames of stored
blocks, its pages can be written (or spliced) without the decoder.  Pure:
bytes in, numbers out (RFC 8878).
"""

from __future__ import annotations

from vmsd.runtime.errors import MalformedStream

MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK_MAX = 128 << 10
# An empty stored block: inflates to nothing, and is valid wherever a block may start.
EMPTY_BLOCK = b"\x00\x00\x00"
# An empty frame (single segment, content size 0, one empty last block): valid wherever a frame may start.
EMPTY_FRAME = MAGIC + b"\x20\x00\x01\x00\x00"


def frame_header_size(fhd: int) -> int:
    """The bytes of a zstd frame header, magic number included, from its descriptor byte."""
    single = (fhd >> 5) & 1
    return 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]


def frame_content(header: memoryview) -> int | None:
    """The content size a whole frame header states; None where it states none."""
    fhd = header[4]
    size = ((fhd >> 5) & 1, 2, 4, 8)[fhd >> 6]
    if not size:
        return None
    value = int.from_bytes(header[len(header) - size:], "little")
    return value + 256 if size == 2 else value


def block_header(data: memoryview, i: int) -> tuple[int, int, int]:
    """(last, kind, size) of the 3-byte zstd block header at ``i``."""
    head = data[i] | data[i + 1] << 8 | data[i + 2] << 16
    return head & 1, (head >> 1) & 3, head >> 3


class ZstdBound:
    """Walks a channel's zstd frames across packets: how much a payload can inflate to, before inflating it.

    A few bytes of zstd can claim 128 KiB each.  Block headers say it all: raw
    and RLE blocks give exactly their size, a compressed block at most 128 KiB.
    A frame that states its content size (ours: one per run of pages) gives at
    most that, which the decoder enforces.  QEMU (and we) flush each packet on
    a block boundary, so a payload is whole blocks, the first one after a
    frame header where no frame is open.
    """

    def __init__(self) -> None:
        self.in_frame = False
        self.checksum = False
        self.content: int | None = None  # the open frame's stated content size
        self.counted = 0  # what the open frame's blocks so far can inflate to
        # After bound(): where the payload is whole frames of stored blocks only, without checksums, whose
        # sizes agree with their frames' content sizes, the (offset, size) of each block's bytes.
        self.stored: list[tuple[int, int]] | None = None

    def bound(self, data: memoryview) -> tuple[int, bool]:
        """(most bytes ``data`` inflates to, whether that is exact: no compressed block)."""
        out = 0
        exact = True
        i, n = 0, len(data)
        self.counted = 0  # a frame left open by the last packet: its earlier blocks were counted there
        stored: list[tuple[int, int]] | None = None if self.in_frame else []
        while i < n:
            if not self.in_frame:
                if bytes(data[i:i + 4]) != MAGIC or i + 5 > n:
                    raise MalformedStream("zstd payload does not start a frame or a block")
                end = i + frame_header_size(data[i + 4])
                if end > n:
                    raise MalformedStream("zstd frame header cut short")
                self.content = frame_content(data[i:end])
                self.checksum = bool((data[i + 4] >> 2) & 1)
                if self.checksum:
                    stored = None
                self.in_frame = True
                i = end
                continue
            if i + 3 > n:
                raise MalformedStream("zstd block header cut short")
            last, kind, size = block_header(data, i)
            i += 3
            if kind == 0:  # raw
                if stored is not None:
                    stored.append((i, size))
                self.counted += size
                i += size
            elif kind == 1:  # RLE: one byte repeated
                stored = None
                self.counted += size
                i += 1
            elif kind == 2:
                stored = None
                self.counted += BLOCK_MAX
                exact = False
                i += size
            else:
                raise MalformedStream("zstd block of the reserved type")
            if last:
                if self.content is not None and self.content != self.counted:
                    stored = None  # the decoder will say what is wrong
                out += self.counted if self.content is None else min(self.counted, self.content)
                self.counted = 0
                self.in_frame = False
                i += 4 if self.checksum else 0
        if i != n:
            raise MalformedStream("zstd block runs past the payload")
        self.stored = stored if not self.in_frame else None
        return out + self.counted, exact
