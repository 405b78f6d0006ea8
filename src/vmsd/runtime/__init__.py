"""What generated code and migration tools import at run time (no compiler dependencies)."""

from vmsd.runtime.errors import (
    CheckFailed,
    MalformedStream,
    RegistryError,
    SaveError,
    TruncatedStream,
    VersionMismatch,
    VMSDError,
)
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.vmstate import API_VERSION, VMStateObject, register

__all__ = [
    "API_VERSION",
    "CheckFailed",
    "MalformedStream",
    "Reader",
    "RegistryError",
    "SaveError",
    "TruncatedStream",
    "VMSDError",
    "VMStateObject",
    "VersionMismatch",
    "Writer",
    "register",
]
