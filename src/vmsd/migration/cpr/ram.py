"""Guest RAM across CPR: the descriptors an old side hands over for its blocks, and the blocks built on them.

QEMU names a RAM block's descriptor in the CPR state by the block's idstr
(``pc.bios``, ``0000:00:02.0/vga.vram``, a memory backend's id) with id 0, so
a new side finds each block the stream's block list announces by name.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from vmsd.migration.cpr.state import CprEntry, CprError, CprState
from vmsd.migration.ram.blocks import RamBlock


def ram_entries(blocks: Iterable[RamBlock]) -> list[CprEntry]:
    """The CPR state entries that hand over ``blocks``' memory (the descriptors stay owned by the blocks)."""
    entries = []
    for b in blocks:
        if b.fd < 0:
            raise CprError(f"RAM block '{b.name}' has no descriptor to hand over")
        entries.append(CprEntry(b.name, 0, b.fd))
    return entries


class AdoptedRam:
    """A :class:`~vmsd.migration.ram.blocks.RamBlocks` factory: each announced block maps the memory the
    CPR state handed over under its name, never fresh memory.

    A block the state has no descriptor for, a descriptor that is not a memory
    file (memfd, shm or regular file), or one smaller than the announced
    length is an error naming the block; the descriptor is closed.
    """

    def __init__(self, state: CprState) -> None:
        self.state = state

    def __call__(self, name: str, used_length: int) -> RamBlock:
        fd = self.state.take(name, 0)
        if fd is None:
            raise CprError(f"RAM block '{name}' is in the block list, but the CPR state handed over no memory "
                           f"for it")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CprError(f"the descriptor handed over for RAM block '{name}' is not a memory file "
                               f"(mode {stat.filemode(st.st_mode)})")
            if st.st_size < used_length:
                raise CprError(f"the memory handed over for RAM block '{name}' holds {st.st_size:#x} bytes, "
                               f"the block list announces {used_length:#x}")
        except BaseException:
            os.close(fd)
            raise
        return RamBlock(name, used_length, fd, shared=True)
