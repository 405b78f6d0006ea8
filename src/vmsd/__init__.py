"""vmsd: typed QEMU VMState descriptions, their compiler, and a migration runtime."""

__version__ = "0.1.0"
