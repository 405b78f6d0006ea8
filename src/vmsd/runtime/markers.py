"""Bytes QEMU writes between fields, shared by generated code, the runtime and the stream engine."""

from __future__ import annotations

# Starts a subsection: the marker, a length-prefixed name, a 32-bit version.
QEMU_VM_SUBSECTION = 0x05
# Ends a section, followed by its 32-bit section id (QEMU 2.4 on, or send-section-footer).
QEMU_VM_SECTION_FOOTER = 0x7E
# QEMU writes this byte in place of a NULL slot of an array of pointers.
NULLPTR_MARKER = 0x30
