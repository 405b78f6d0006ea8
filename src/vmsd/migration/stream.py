"""QEMU's savevm stream: header, configuration, sections, commands, EOF, trailer.

:func:`read_stream` parses a whole stream into records whose payloads are
decoded (typed objects, generic values driven by the JSON trailer, RAM
records); :func:`write_stream` writes records back so that an unchanged
stream comes out byte for byte.  Neither touches files or sockets: they work
on a :class:`~vmsd.runtime.io.Reader` and a :class:`~vmsd.runtime.io.Writer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from vmsd.migration.limits import MAX_LIVE_TRAILER, MAX_PACKAGE_DEPTH
from vmsd.migration.profile import PeerProfile
from vmsd.migration.ram.mapped import CAP_MAPPED_RAM
from vmsd.migration.ram.records import PLAIN, RAM_SECTION_VERSION, RamContext, RamPayload, read_ram, write_ram
from vmsd.migration.undescribed import NoTrailer, decode_kept, read_to_footer
from vmsd.runtime.errors import (
    MalformedStream,
    RegistryError,
    SaveError,
    TruncatedStream,
    VersionMismatch,
    VMSDError,
)
from vmsd.runtime.generic import decode_body, encode_body
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.markers import QEMU_VM_SECTION_FOOTER, QEMU_VM_SUBSECTION
from vmsd.runtime.vmdesc import JSONFloat, Obj, array_rule, describe, dumps, loads
from vmsd.runtime.vmstate import as_loaded_subclass, fresh, impl, register, reporting_checks

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION_COMPAT = 2
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08

SECTION_NAMES = {1: "START", 2: "PART", 3: "END", 4: "FULL"}

MIG_CMD_NAMES = {
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}
# Fixed payload lengths QEMU enforces (None: variable).
MIG_CMD_LENGTHS: dict[int, int | None] = {1: 0, 2: 4, 3: None, 4: 0, 5: 0, 6: None, 7: 4, 8: 0, 9: 0, 10: None, 11: 0}
MIG_CMD_PACKAGED = 7
# QEMU's MAX_VM_CMD_PACKAGED_SIZE: a package larger than this is refused.
MAX_PACKAGED_SIZE = 1 << 32

IDSTR_RAM = "ram"
MIG_CMD_OPEN_RETURN_PATH = 1
# Return-path messages (destination -> source).
MIG_RP_MSG_SHUT = 1


CAP_IGNORE_SHARED = b"x-ignore-shared"
_CAPABILITIES_SUBSECTION = b"configuration/capabilities"
# QEMU has a few dozen capabilities and refuses a name it does not know, so a longer list is not a stream.
_MAX_CAPABILITIES = 256
_CONFIGURATION_SUBSECTIONS = {  # name -> fixed body length (None: the capability list)
    _CAPABILITIES_SUBSECTION: None,
    b"configuration/target-page-bits": 4,
    b"configuration/uuid": 16,
}


@attrs.define
class MachineConfiguration:
    """QEMU's configuration record (savevm.c's vmstate_configuration), as the engine writes and reads it.

    A stream tool reads the record through the configuration spec of its spec set (so it shows and
    rewrites every field); the engine needs only the machine type and the validated capabilities,
    and must not depend on any QEMU version's spec set for them.
    """

    name: bytes
    capabilities: tuple[bytes, ...] = ()  # validated capabilities that are on (x-ignore-shared, mapped-ram)

    def encode(self) -> bytes:
        """The record's body (after its 0x07 byte), as QEMU saves it at version 1."""
        w = Writer()
        w.u32(len(self.name))
        w.write(self.name)
        if self.capabilities:
            w.u8(QEMU_VM_SUBSECTION)
            w.counted_string(_CAPABILITIES_SUBSECTION)
            w.u32(1)
            w.u32(len(self.capabilities))
            for cap in self.capabilities:
                w.counted_string(cap)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> MachineConfiguration:
        """The record's body; subsections other than the capability list are checked and skipped."""
        n = r.u32()
        if n > 255:  # a machine type name is short; a large count is not a configuration record
            raise MalformedStream(f"machine type name of {n} bytes", offset=r.tell() - 4)
        name = r.read(n)
        caps: list[bytes] = []
        while r.peek(1) == bytes([QEMU_VM_SUBSECTION]):
            at = r.tell()
            r.u8()
            sub = r.counted_string()
            if sub not in _CONFIGURATION_SUBSECTIONS:
                raise MalformedStream(f"unknown subsection {sub.decode(errors='replace')!r} of the configuration",
                                      offset=at)
            if (version := r.u32()) != 1:
                raise VersionMismatch(f"subsection {sub.decode()!r} version {version}, only 1 is known", offset=at)
            size = _CONFIGURATION_SUBSECTIONS[sub]
            if size is not None:
                r.read(size)
                continue
            count = r.u32()
            if count > _MAX_CAPABILITIES:
                raise MalformedStream(f"{count} capabilities in the configuration", offset=at)
            for i in range(count):
                cap = r.counted_string()
                if not cap:  # QEMU looks each name up and refuses one it does not know
                    raise MalformedStream(f"capability {i} of {count} has an empty name", offset=at)
                caps.append(cap)
        return cls(name, tuple(caps))


def capabilities_of(configuration: Any) -> tuple[bytes, ...]:
    """The validated capabilities of a configuration record: ours, or a spec's typed object (whose
    capability list is one opaque field of counted names)."""
    if isinstance(configuration, MachineConfiguration):
        return configuration.capabilities
    raw = bytes(getattr(configuration, "capabilities", b""))
    names: list[bytes] = []
    while raw:
        names.append(raw[1:1 + raw[0]])
        raw = raw[1 + raw[0]:]
    return tuple(names)


@attrs.frozen
class Finding:
    """A warning that a QEMU destination would have refused: a section its typed spec could not load
    (``kind`` "fallback": decoded from the trailer instead) or a failed ``equal``/``le`` check ("check",
    ``field`` set: the check's field as the spec names it)."""
    idstr: str
    kind: str
    message: str
    field: str | None = None


@attrs.define
class Configuration:
    offset: int
    state: Any  # a MachineConfiguration, or the spec set's typed configuration object


@attrs.define
class Section:
    kind: int  # QEMU_VM_SECTION_*
    section_id: int
    offset: int
    idstr: str  # for PART/END: copied from the START with the same id
    instance_id: int = 0
    version_id: int = 0
    # One of: a typed VMStateObject; an Obj of values decoded from the trailer
    # (``generic_body`` says which); a RamPayload; raw bytes of a legacy section.
    payload: Any = None
    generic_body: Obj | None = None
    vmsd_name: str | None = None
    footer: bool = True
    # A legacy (save_state) handler: QEMU's trailer describes it as one buffer.
    legacy: bool = False

    @property
    def has_header(self) -> bool:
        return self.kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL)


@attrs.define
class Command:
    cmd: int
    offset: int
    data: bytes
    packaged: list[Any] | None = None  # records inside a PACKAGED command
    package_eof: bool = False  # the package ends with an EOF byte (QEMU stops there)
    package_tail: bytes = b""  # package bytes after that point (QEMU never reads them)
    # This command ``count`` times back to back (``offset`` is the first): a run of
    # identical commands is one object, so memory follows records, not bytes alone.
    count: int = 1

    @property
    def name(self) -> str:
        return MIG_CMD_NAMES.get(self.cmd, f"MIG_CMD_{self.cmd:#x}")


@attrs.frozen
class Damage:
    """Where :func:`read_partial` stopped inside a FULL section: the section with what was read of it before
    the error (``payload`` an Obj of values by ``generic_body``, the trailer's description or, when
    ``by_spec``, the typed spec's), and the path of the field the error is in (docs/names.md), if known.
    ``whole``: the section was read whole, the error is in its footer.  ``error``: where reading it again
    found the input to end, when the original error is about the same end (a typed spec reads a run of
    fields at once; this names the field)."""
    section: Section
    field: str | None
    by_spec: bool
    whole: bool = False
    error: VMSDError | None = None


# A run of identical commands at most this many wire bytes long is cheaper kept as bytes in a
# CommandRun than as a Command object (about 130 bytes with its offset and data).
_SMALL_RUN_BYTES = 64


@attrs.define
class CommandRun:
    """Commands back to back whose packages (if any) hold only commands, kept as their wire bytes.

    A stream of thousands of different small commands would otherwise cost a Command object (over
    100 bytes) per 5 to 20 bytes of input; kept as bytes, such records cost what they take on the
    wire.  :meth:`commands` decodes them again, one at a time, as the decoder would have built them
    (a run of identical neighbours as one Command with a ``count``), so that tools show the same
    records whichever way they were kept.  ``offset``: of the first command, counted as the
    record's own reader counts (a package's records from the package's first byte).
    """

    offset: int
    raw: bytearray
    count: int  # commands in ``raw`` (those of its packages not included)
    depth: int = 0  # PACKAGED commands around the run

    @property
    def name(self) -> str:
        return "commands"

    def commands(self) -> Iterator[Command]:
        """The commands, identical neighbours folded (offsets from :attr:`offset`)."""
        dec = Decoder(b"", SpecSet(), False, False, reader=Reader(bytes(self.raw)))
        dec.package_depth = self.depth
        r = dec.r
        prev: Command | None = None
        while not r.at_end():
            at = r.tell()
            r.u8()  # QEMU_VM_COMMAND: nothing else is kept in a run
            cmd = dec.command(at)
            cmd.offset += self.offset
            if prev is not None and prev.packaged is None and cmd.packaged is None and (prev.cmd, prev.data) == (
                    cmd.cmd, cmd.data):
                prev.count += 1
                continue
            if prev is not None:
                yield prev
            prev = cmd
        if prev is not None:
            yield prev


def command_bytes(cmd: Command) -> bytes:
    """A command's wire bytes, ``count`` times (its package encoded as read)."""
    w = Writer()
    _write_record(w, cmd)
    return w.getvalue()


def _keeps_only_commands(cmd: Command) -> bool:
    return cmd.packaged is None or all(isinstance(r, CommandRun) or (isinstance(r, Command) and _keeps_only_commands(r))
                                       for r in cmd.packaged)


def append_command(out: list[Section | Command | CommandRun], cmd: Command, depth: int) -> None:
    """Add a command just read to the records read before it: a run of identical plain commands is one
    Command with a ``count``; commands that are not worth an object each go into a CommandRun."""
    prev = out[-1] if out else None
    if isinstance(prev, CommandRun) and _keeps_only_commands(cmd):
        prev.raw += command_bytes(cmd)
        prev.count += 1
        return
    if isinstance(prev, Command) and prev.packaged is None and cmd.packaged is None and prev.cmd == cmd.cmd \
            and prev.data == cmd.data:
        prev.count += 1
        return
    if isinstance(prev, Command) and _keeps_only_commands(prev) and _keeps_only_commands(cmd):
        before = command_bytes(prev)
        if len(before) <= _SMALL_RUN_BYTES or prev.packaged is not None:
            out[-1] = CommandRun(prev.offset, bytearray(before) + command_bytes(cmd), prev.count + 1, depth)
            return
    out.append(cmd)


@attrs.define
class Stream:
    version: int = QEMU_VM_FILE_VERSION
    configuration: Configuration | None = None
    records: list[Section | Command | CommandRun] = attrs.Factory(list)
    eof_offset: int | None = None
    trailer: Obj | None = None  # parsed JSON trailer
    trailer_text: bytes | None = None
    trailer_offset: int | None = None
    warnings: list[str] = attrs.Factory(list)
    # What a QEMU destination with the same specs would have refused, among the warnings.
    findings: list[Finding] = attrs.Factory(list)
    # The QEMU version whose writer rules a regenerated trailer follows (the spec set's); None: 7.2's.
    profile: PeerProfile | None = None
    damage: Damage | None = None  # set by read_partial when it stopped inside a section

    def sections(self) -> list[Section]:
        out: list[Section] = []
        for rec in self.records:
            if isinstance(rec, Section):
                out.append(rec)
            elif isinstance(rec, Command) and rec.packaged:
                out.extend(r for r in rec.packaged if isinstance(r, Section))
        return out

    def full_sections(self) -> list[Section]:
        return [s for s in self.sections() if s.kind == QEMU_VM_SECTION_FULL]

    @property
    def page_size(self) -> int:
        size = self.trailer.get("page_size") if self.trailer is not None else None
        return size if isinstance(size, int) and not isinstance(size, bool) else 4096


def _nests(outer: Any, inner: Any) -> bool:
    return any(f.struct is inner for f in outer.VMSD.fields)


class SpecSet:
    """Typed classes by vmsd name, used to decode sections.

    A spec set built :meth:`from_package` imports a generated module only when
    a stream names one of its vmsds (the package ``__init__`` indexes them),
    so a tool pays for the devices a stream has, not for every spec shipped.
    ``on_import`` runs for each newly imported generated module, before the
    "as loaded" defaults, so that real implementations register first.
    ``profile`` is the QEMU version the specs describe: streams read with
    them regenerate their trailer by that version's rules.
    """

    def __init__(
        self,
        classes: dict[str, type] | None = None,
        packages: list[tuple[str, dict[str, tuple[str, ...]]]] | None = None,
        on_import: Callable[[Any], None] | None = None,
        profile: PeerProfile | None = None,
    ) -> None:
        self.classes: dict[str, type] = {}
        self._packages = list(packages or [])
        # An index names its package's modules (``mod``) and those reused from another (``.v7_2.mod``);
        # a vmsd is this set's as declared by the modules its index names for it, and no other.
        self._declared_by: dict[str, set[str]] = {}
        for package, index in self._packages:
            for name, mods in index.items():
                self._declared_by.setdefault(name, set()).update(
                    importlib.util.resolve_name("." + mod, package) for mod in mods)
        # Modules under these packages get ``on_import`` (their hooks) when imported, reused or not.
        self._hooked = tuple(sorted({m.rsplit(".", 1)[0] + "." for ms in self._declared_by.values() for m in ms}
                                    | {package + "." for package, _ in self._packages}))
        self._on_import = on_import
        self.profile = profile
        self._seen_modules: set[str] = set()
        self._loaded_names: set[str] = set()
        for value in (classes or {}).values():
            self._add_class(value)

    @classmethod
    def from_modules(cls, modules: list[Any], on_import: Callable[[Any], None] | None = None,
                     profile: PeerProfile | None = None) -> SpecSet:
        specs = cls(on_import=on_import, profile=profile)
        specs._add_modules(modules)
        return specs

    @classmethod
    def from_package(cls, package: str, on_import: Callable[[Any], None] | None = None,
                     profile: PeerProfile | None = None) -> SpecSet:
        index = getattr(importlib.import_module(package), "VMSDS", {})
        return cls(packages=[(package, index)], on_import=on_import, profile=profile)

    def merged(self, other: SpecSet) -> SpecSet:
        """``other``'s classes first, then these; the QEMU version stays this set's."""
        out = SpecSet(packages=other._packages + self._packages, on_import=self._on_import, profile=self.profile)
        out.classes = {**self.classes, **other.classes}
        return out

    def _add_modules(self, modules: list[Any]) -> None:
        fresh = [m for m in modules if m.__name__ not in self._seen_modules]
        self._seen_modules.update(m.__name__ for m in fresh)
        if self._on_import is not None:
            for module in fresh:
                self._on_import(module)
        for module in fresh:
            for value in vars(module).values():
                if isinstance(value, type) and value.__dict__.get("_generated") and value.__module__ == module.__name__:
                    # A reused module may declare vmsds this set has its own version of (or none):
                    # those stay out, as do the vmsds of modules imported only as dependencies.
                    name: str = value.__dict__["VMSD_NAME"]
                    if not self._packages or module.__name__ in self._declared_by.get(name, ()):
                        self._add_class(value)

    def _add_class(self, value: Any) -> None:
        name = value.VMSD_NAME
        # QEMU wraps some devices in a vmsd of the same name (isa-serial's
        # "serial" holds the core "serial"): the section is the wrapper.
        if name not in self.classes or _nests(value, self.classes[name]):
            self.classes[name] = value
        # Custom ``needed`` predicates nobody implemented answer "as loaded".
        auto: type | None = as_loaded_subclass(value)
        if auto is not None:
            register(auto)

    def _load(self, name: str) -> None:
        for package, index in self._packages:
            if name in index:
                for mod in index[name]:
                    importlib.import_module("." + mod, package)
                self._adopt()

    def _adopt(self) -> None:
        # Modules imported on the way or earlier (shared nested vmsds) get their hooks too.
        new = sorted(m for m in sys.modules if m.startswith(self._hooked) and m not in self._seen_modules)
        self._add_modules([sys.modules[m] for m in new])

    def adopt_imported(self) -> None:
        """Take in the modules of this set's packages (and of those it reuses) that other code imported
        (specs compiled elsewhere that nest shipped vmsds), so that their hooks and predicate
        implementations are registered."""
        self._adopt()

    def get(self, name: str) -> type | None:
        # Load every module declaring ``name`` once, even when one of them came
        # in earlier as a dependency: a wrapper of the same name may be elsewhere.
        if name not in self._loaded_names:
            self._loaded_names.add(name)
            self._load(name)
        return self.classes.get(name)

    def load_all(self) -> SpecSet:
        """Import every indexed module now (tests, tools listing all specs)."""
        for name in self.names():
            self.get(name)
        return self

    def names(self) -> list[str]:
        return sorted({*self.classes, *(n for _, index in self._packages for n in index)})

    def lookup(self, idstr: str, vmsd_name: str | None) -> type | None:
        if vmsd_name is not None:
            return self.get(vmsd_name)
        # "0000:00:01.1/ide" -> "ide"; names may themselves contain '/'.
        parts = idstr.split("/")
        for i in range(len(parts)):
            found = self.get("/".join(parts[i:]))
            if found is not None:
                return found
        return None


def find_trailer(data: bytes) -> tuple[int, Obj, bytes] | None:
    """Locate the vmdesc trailer from the end: (offset of the 0x06 byte, parsed JSON, text)."""
    for marker in (b'{"page_size"', b'{"configuration"'):
        start = len(data)
        while True:
            i = data.rfind(marker, 0, start)
            if i < 5:
                break
            start = i
            if data[i - 5] != QEMU_VM_VMDESCRIPTION or data[i - 6] != QEMU_VM_EOF:
                continue
            n = struct.unpack_from(">I", data, i - 4)[0]
            if i + n > len(data):
                continue
            text = data[i : i + n]
            try:
                return i - 5, loads(text), text
            except ValueError:
                continue
    return None


def framed_trailer(data: bytes, start: int = 0) -> int | None:
    """Offset of the 0x06 byte of an EOF, 0x06, be32 length whose length ends exactly at the end of ``data``.

    Finds a trailer by its framing alone, whatever its text: :func:`find_trailer`
    knows only QEMU's first bytes, so it misses a mangled or reformatted one.
    """
    end = len(data)
    i = data.rfind(b"\x00\x06", start, end)
    while i >= 0:
        if i + 6 <= end and i + 6 + int.from_bytes(data[i + 2 : i + 6], "big") == end:
            return i + 1
        i = data.rfind(b"\x00\x06", start, i + 1)
    return None


def _json_problem(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at byte {e.pos} of the JSON"
    return str(e)


def parse_trailer(text: bytes, offset: int) -> Any:
    """The trailer's JSON, or a MalformedStream at ``offset`` (its 0x06 byte) saying why not."""
    try:
        return loads(text)
    except ValueError as e:
        raise MalformedStream(f"trailer is not valid JSON ({_json_problem(e)})", offset=offset) from None


class Decoder:
    """Decodes a stream's records; :func:`read_stream` runs it over a whole stream in memory.

    A live receiver passes a streaming ``reader``, sets ``ram_handler`` to
    apply RAM sections in place, and calls :meth:`read_header`,
    :meth:`records` (up to EOF, where QEMU's destination stops) and
    :meth:`finish_live`.  No trailer is known before EOF, so sections decode
    from their specs; one that no spec describes (without ``section_classes``)
    is kept as received and decoded by the trailer in :meth:`finish_live`.
    """

    def __init__(self, data: bytes, specs: SpecSet, strict_typed: bool, enforce_checks: bool,
                 reader: Reader | None = None) -> None:
        self.data = data
        self.enforce_checks = enforce_checks
        self.r = Reader(data) if reader is None else reader
        self.top = self.r  # the stream's own reader; a PACKAGED command's records get another
        self.in_memory = reader is None
        self.specs = specs
        self.strict_typed = strict_typed
        self.stream = Stream(profile=specs.profile)
        # Set by a live receiver: reads one RAM section's records from ``self.r`` into its RAM.
        self.ram_handler: Callable[[Section, RamContext], None] | None = None
        # Set by a machine's receiver: the class of each (idstr, instance id) it has; others are unknown.
        self.section_classes: dict[tuple[str, int], type] | None = None
        self.return_path = False  # the source opened QEMU's return path
        found = find_trailer(data) if reader is None else None
        self.trailer_devices: list[Obj] = []
        if found is not None:
            at, self.stream.trailer, self.stream.trailer_text = found
            self.trailer_devices = validate_trailer(self.stream.trailer, at)
        self.next_device = 0
        # Set once a section needed the trailer that find_trailer did not find: the framing was searched.
        self.framing_searched = False
        self.broken_trailer: tuple[int, str] | None = None  # (offset, why) of a framed trailer that is not JSON
        self.open_sections: dict[int, Section] = {}
        self.footers: bool | None = None
        self.ram_context = PLAIN  # set from the configuration's capabilities
        self.ram_block_named = False
        self.package_eof = False  # set when a PACKAGED command's records end at an EOF byte
        self.package_depth = 0  # PACKAGED commands around the records being read
        # Live: sections no spec describes, with where their payload starts, until the trailer comes.
        self.kept: list[tuple[Section, int]] = []
        self.keep_damage = False  # read_partial: keep what a failed section held (Stream.damage)
        self.typed_attempt: Any = None  # the typed object the current section is being loaded into

    def warn(self, msg: str) -> None:
        self.stream.warnings.append(msg)

    def run(self) -> Stream:
        self.read_header()
        return self.run_body()

    def read_header(self) -> None:
        """Magic, version and the configuration record."""
        r = self.r
        magic = r.u32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise MalformedStream(f"not a migration stream (magic {magic:#010x})", offset=0)
        version = r.u32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise MalformedStream("SaveVM v2 format is obsolete", offset=4)
        if version != QEMU_VM_FILE_VERSION:
            raise MalformedStream(f"unsupported migration stream version {version}", offset=4)
        self.stream.version = version
        if r.peek(1) == bytes([QEMU_VM_CONFIGURATION]):
            at = r.tell()
            r.u8()
            self.stream.configuration = Configuration(at, self.load_configuration())

    def run_body(self) -> Stream:
        """Records up to EOF, then the trailer."""
        r = self.r
        self.stream.records = self.records(top=True)
        self.stream.eof_offset = r.tell() - 1
        if r.at_end():
            if self.stream.trailer is not None:
                self.warn("trailer found by signature but the stream ended at EOF")
            self.stream.trailer = self.stream.trailer_text = None
            return self.stream
        at = r.tell()
        kind = r.u8()
        if kind != QEMU_VM_VMDESCRIPTION:
            # QEMU only warns ("Expected vmdescription section") and ignores the rest;
            # we refuse: whatever follows EOF was not written by a migration.
            raise MalformedStream(f"expected the vmdescription trailer (0x06) after EOF, found byte {kind:#x}", offset=at)
        n = r.u32()
        text = r.read(n)
        if self.stream.trailer_text != text:
            self.stream.trailer = parse_trailer(text, at)
            validate_trailer(self.stream.trailer, at)
            self.stream.trailer_text = text
        self.stream.trailer_offset = at
        if not r.at_end():
            # QEMU never reads past the trailer, so it accepts anything there; we refuse.
            raise MalformedStream(f"{len(self.data) - r.tell()} bytes after the trailer", offset=r.tell())
        return self.stream

    def load_configuration(self) -> Any:
        """The configuration record, typed by the spec set's spec when it has one."""
        cls = self.specs.lookup("configuration", "configuration")
        try:
            if cls is None:
                obj: Any = MachineConfiguration.decode(self.r)
            else:
                obj = impl(cls)()
                obj.load_into(self.r, 0)  # QEMU loads the configuration at version 0
        except VMSDError as e:
            raise e.in_section("configuration") from None
        caps = capabilities_of(obj)
        self.ram_context = RamContext(ignore_shared=CAP_IGNORE_SHARED in caps, mapped_ram=CAP_MAPPED_RAM in caps)
        return obj

    def records(self, top: bool) -> list[Section | Command | CommandRun]:
        r = self.r
        out: list[Section | Command | CommandRun] = []
        if top:  # the records so far, for read_partial when a later one fails
            self.stream.records = out
        while True:
            at = r.tell()
            kind = r.u8()
            if kind == QEMU_VM_EOF:
                if not top:  # QEMU's nested load loop stops at EOF too
                    self.package_eof = True
                return out
            if kind in SECTION_NAMES:
                out.append(self.section(kind, at))
            elif kind == QEMU_VM_COMMAND:
                cmd = self.command(at)
                append_command(out, cmd, self.package_depth)
                if cmd.cmd == 5 and not top:  # POSTCOPY_RUN ends a package
                    self.package_eof = False  # (a package inside this one may have set it)
                    return out
            else:
                raise MalformedStream(f"unknown savevm section type {kind}", offset=at)
            if not top and r.at_end():
                self.package_eof = False
                return out

    def command(self, at: int) -> Command:
        r = self.r
        cmd, length = r.u16(), r.u16()
        if cmd == 0 or cmd not in MIG_CMD_NAMES:
            raise MalformedStream(f"MIG_CMD {cmd:#x} unknown (len {length:#x})", offset=at)
        fixed = MIG_CMD_LENGTHS.get(cmd)
        if fixed is not None and length != fixed:
            raise MalformedStream(f"{MIG_CMD_NAMES[cmd]} received with bad length - expecting {fixed}, got {length}", offset=at)
        data = r.read(length)
        command = Command(cmd, at, data)
        self.return_path = self.return_path or cmd == 1  # MIG_CMD_OPEN_RETURN_PATH
        if cmd == MIG_CMD_PACKAGED:
            size = int.from_bytes(data, "big")
            rem = r.remaining()
            if rem is not None and size > rem:
                raise TruncatedStream(f"PACKAGED announces {size} bytes, {rem} remain", offset=at)
            if self.package_depth >= MAX_PACKAGE_DEPTH:
                raise MalformedStream(f"PACKAGED commands nest more than {MAX_PACKAGE_DEPTH} deep", offset=at)
            # The package is a nested record sequence: decode it with this decoder
            # over its own bytes, so section ids, footers and trailer order carry on.
            outer = self.r
            self.r = Reader(outer.read(size))
            self.package_eof = False
            base = outer.tell() - size
            self.package_depth += 1
            try:
                command.packaged = self.records(top=False)
                command.package_eof = self.package_eof
                command.package_tail = self.r.read(self.r.remaining() or 0)
            except VMSDError as e:
                if e.offset is not None:
                    e.offset += base
                raise
            finally:
                self.r = outer
                self.package_depth -= 1
        return command

    def section(self, kind: int, at: int) -> Section:
        r = self.r
        section_id = r.u32()
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            idstr_raw = r.counted_string()
            if not idstr_raw:
                raise MalformedStream("unable to read section idstr", offset=at)
            # Interned: a stream of many sections of one device holds its name once, not once per section.
            idstr = sys.intern(idstr_raw.decode("utf-8", "surrogateescape"))
            try:
                instance_id, version_id = r.u32(), r.u32()
            except VMSDError as e:
                raise e.in_section(idstr) from None
            sec = Section(kind, section_id, at, idstr, instance_id, version_id)
            self.open_sections[section_id] = sec
        else:
            start = self.open_sections.get(section_id)
            if start is None:
                raise MalformedStream(f"unknown savevm section {section_id}", offset=at)
            sec = Section(kind, section_id, at, start.idstr, start.instance_id, start.version_id)
        self.typed_attempt = None
        try:
            self.payload(sec)
            self.footer(sec)
        except VMSDError as e:
            if self.keep_damage and self.r is self.top and sec.kind == QEMU_VM_SECTION_FULL:
                self.stream.damage = self.damage(sec, e)
            raise e.in_section(sec.idstr) from None
        return sec

    def damage(self, sec: Section, error: VMSDError) -> Damage | None:
        """What ``sec`` held before ``error``: its values read again by its description (the trailer's, or
        the typed spec's of the object as far as it was loaded), up to the error's offset."""
        whole = sec.payload is not None  # the section was read whole; its footer is damaged
        by_spec = sec.generic_body is None
        body = sec.generic_body
        start = sec.offset + 1 + 4 + 1 + len(idstr_bytes(sec.idstr)) + 8
        if error.offset is None or error.offset < start or (body is None and self.typed_attempt is None and not whole):
            return None
        # Read again up to where the error is, or to the end of an input cut short.
        end = len(self.data) if isinstance(error, TruncatedStream) else error.offset
        r = Reader(self.data[:end])
        if body is None:
            # The typed object as far as the bytes before the error load it (its other fields at their
            # defaults), described with every subsection: the stream says which it carries.
            obj = sec.payload  # read whole, but its values may not save (a failed check): read again below
            if not whole:
                obj = impl(type(self.typed_attempt))()
                r.pos = start
                try:
                    with reporting_checks():
                        obj.load_into(r, sec.version_id)
                except VMSDError:
                    pass
            try:
                body = describe(obj, sec.version_id, *description_rule(self.stream), every_subsection=True)[0]
            except Exception:  # a predicate that fails on a half-loaded object: no fields to show
                return None
        r.pos = start
        field = None
        again: VMSDError | None = None
        try:
            values = decode_body(r, body, optional_subsections=by_spec)
        except VMSDError as e:
            values = e.partial if e.partial is not None else Obj()
            # The field the error's offset falls in, by its scheme name (the typed spec's error names
            # its own attributes, under the vmsd's name).
            if e.offset is not None and start <= e.offset <= end:
                field = e.path
                again = e if isinstance(e, TruncatedStream) and end == len(self.data) else None
        return Damage(attrs.evolve(sec, payload=values, generic_body=body, vmsd_name=body.get("vmsd_name")), field,
                      by_spec, whole, again)

    def footer(self, sec: Section) -> None:
        r = self.r
        if self.footers is None:
            self.footers = self.footers_follow(sec)
        sec.footer = self.footers
        if not self.footers:
            return
        at = r.tell()
        if r.u8() != QEMU_VM_SECTION_FOOTER:
            raise MalformedStream(f"missing section footer for {sec.idstr}", offset=at)
        got = r.u32()
        if got != sec.section_id:
            raise MalformedStream(
                f"mismatched section id in footer for {sec.idstr} - read {got:#x} expected {sec.section_id:#x}", offset=at
            )

    def footers_follow(self, first: Section) -> bool:
        """Whether sections end with footers, judged at the end of the ``first`` one.

        The stream does not say: QEMU's destination follows its own machine
        (footers since 2.4, or ``send-section-footer``), and neither the
        configuration record nor its absence tells, since either property can
        be set alone.  QEMU's default is footers, so the byte here has to show
        that there are none: it must start a record that can follow a section.
        Otherwise it is a damaged footer; taking it for a record instead would
        read the rest of the stream as something else.
        """
        r = self.r
        nxt = r.peek(1)
        if nxt == bytes([QEMU_VM_SECTION_FOOTER]):
            return True
        if not nxt:
            return False  # the input ends here: reported as such by whoever reads on
        kind = nxt[0]
        if kind in SECTION_NAMES or kind == QEMU_VM_COMMAND:
            return False
        if kind != QEMU_VM_EOF:
            return True
        # QEMU closes every iterative section with END before EOF.
        if first.kind == QEMU_VM_SECTION_START:
            return True
        # Only the trailer or nothing follows EOF (not checked inside a package, whose
        # tail QEMU never reads, or on a live stream, where peeking past EOF could wait).
        if self.r is self.top and self.in_memory:
            return r.peek(2)[1:] not in (b"", bytes([QEMU_VM_VMDESCRIPTION]))
        return False

    def payload(self, sec: Section) -> None:
        if sec.idstr == IDSTR_RAM:
            if sec.version_id != RAM_SECTION_VERSION:
                raise VersionMismatch(f"RAM section version {sec.version_id}, only {RAM_SECTION_VERSION} is known",
                                      offset=sec.offset)
            if self.ram_handler is not None:
                self.ram_handler(sec, self.ram_context)
                return
            sec.payload = read_ram(self.r, self.ram_context, block_named=self.ram_block_named)
            self.ram_block_named = self.ram_block_named or sec.payload.names_block()
            return
        if sec.kind != QEMU_VM_SECTION_FULL:
            raise RegistryError(f"no reader for iterative section '{sec.idstr}'", offset=sec.offset)
        device = self.trailer_device(sec)
        vmsd_name = device.get("vmsd_name") if device is not None else None
        sec.vmsd_name = vmsd_name
        sec.legacy = device is not None and vmsd_name is None
        if self.section_classes is not None:
            cls: Any = self.section_classes.get((sec.idstr, sec.instance_id))
            if cls is None:
                raise RegistryError(f"Unknown savevm section or instance '{sec.idstr}' {sec.instance_id}",
                                    offset=sec.offset)
        else:
            cls = self.specs.lookup(sec.idstr, vmsd_name)
        if cls is not None:
            start = self.r.tell()
            problem = self.typed_problem(cls, sec)
            if problem is None:
                obj = self.typed_attempt = fresh(cls)
                try:
                    failed: list[str] = []
                    if self.enforce_checks:
                        obj.load_into(self.r, sec.version_id)
                    else:
                        with reporting_checks() as failed:
                            obj.load_into(self.r, sec.version_id)
                    used = self.r.tell() - start
                    expected = _described_size_or_none(device)
                    if sec.legacy and device is not None:
                        expected = int(device.get("size", 0))
                    if expected is not None and used != expected:
                        where = ""
                        if device is not None and not sec.legacy:
                            where = layout_difference(describe(obj, sec.version_id)[0], device)
                        raise MalformedStream(f"spec read {used} bytes, the trailer describes {expected}"
                                              + (f": {where}" if where else ""), offset=start)
                    for msg in failed:
                        self.warn(f"section '{sec.idstr}': {msg}")
                        field = msg.split("'")[1] if msg.startswith("check on '") else None
                        self.stream.findings.append(Finding(sec.idstr, "check", msg, field))
                    sec.payload = obj
                    sec.vmsd_name = cls.VMSD_NAME
                    return
                except VMSDError as e:
                    if device is None or self.strict_typed:
                        raise
                    problem = str(e)
                    self.r.pos -= self.r.tell() - start
            if device is None:
                if self.keeps_raw():
                    self.keep_raw(sec, problem)
                    return
                raise VersionMismatch(problem, offset=sec.offset)
            self.warn(f"section '{sec.idstr}': {problem}; decoded from the trailer instead")
            self.stream.findings.append(Finding(sec.idstr, "fallback", problem))
        if device is None:
            if self.stream.trailer is None:
                if self.trailer_by_framing():
                    self.payload(sec)  # again, with the trailer: nothing of the section was read yet
                    return
                if self.keeps_raw():
                    self.keep_raw(sec, None)
                    return
                no_spec = _no_spec(sec)
                broken = self.broken_trailer
                if broken is not None:
                    at, problem = broken
                    raise MalformedStream(
                        f"{no_spec}, and the trailer at offset {at:#x} that would describe it is not valid JSON "
                        f"({problem})",
                        offset=sec.offset,
                    )
                raise RegistryError(f"{no_spec} and the stream has no trailer to describe it", offset=sec.offset)
            raise RegistryError(f"section '{sec.idstr}' is not described by the trailer", offset=sec.offset)
        sec.generic_body = device
        start = self.r.tell()
        try:
            if "vmsd_name" in [k for k, _ in device]:
                sec.payload = decode_body(self.r, device)
            else:  # legacy save_state section: one opaque buffer
                sec.payload = self.r.read(int(device.get("size", 0)))
        except (TypeError, AttributeError, KeyError, ValueError) as e:
            if isinstance(e, VMSDError):
                raise
            raise MalformedStream(f"the trailer's description of this section is malformed ({e})", offset=start) from None

    def keeps_raw(self) -> bool:
        """Whether a section no spec describes waits for the trailer: on a live stream whose receiver has no
        fixed set of devices (a machine's receiver refuses it, as QEMU does)."""
        return not self.in_memory and self.section_classes is None

    def keep_raw(self, sec: Section, problem: str | None) -> None:
        """Keep ``sec``'s payload as received, up to its footer, for :meth:`finish_live`."""
        if not self.footers:
            raise RegistryError(f"{_no_spec(sec)}: without section footers its end cannot be found before the "
                                "trailer that describes it arrives", offset=sec.offset)
        iterative = {i for i, s in self.open_sections.items() if s.kind == QEMU_VM_SECTION_START}
        start = self.r.tell()
        try:
            sec.payload = read_to_footer(self.r, sec.section_id, iterative, set(MIG_CMD_NAMES))
        except NoTrailer:
            raise RegistryError(f"{_no_spec(sec)} and the stream has no trailer to describe it",
                                offset=sec.offset) from None
        self.kept.append((sec, start))
        if problem is not None:
            self.warn(f"section '{sec.idstr}': {problem}; decoded from the trailer instead")
            self.stream.findings.append(Finding(sec.idstr, "fallback", problem))

    def finish_live(self) -> None:
        """After EOF on a live stream: read the trailer (kept in ``stream.trailer`` when it is valid), as
        QEMU's destination does, and decode by it the sections kept as received.

        The trailer is read even when nothing needs it: closing with it unread would make the kernel
        answer the source's last writes with a reset, and the source would report a failed migration.
        """
        r = self.r
        nxt = r.peek(1)
        if nxt != bytes([QEMU_VM_VMDESCRIPTION]):
            if self.kept and nxt:
                raise MalformedStream(f"expected the vmdescription trailer (0x06) after EOF, found byte {nxt[0]:#x}; "
                                      f"it would describe section '{self.kept[0][0].idstr}', which has no spec",
                                      offset=r.tell())
            if self.kept:
                sec = self.kept[0][0]
                raise RegistryError(f"{_no_spec(sec)} and the stream has no trailer to describe it",
                                    offset=sec.offset, section=sec.idstr)
            return  # end of input, or a source that sends no trailer
        at = r.tell()
        r.u8()
        left = r.u32()
        if left > MAX_LIVE_TRAILER:
            if self.kept:
                raise MalformedStream(f"the trailer announces {left} bytes, above the limit of {MAX_LIVE_TRAILER}",
                                      offset=at)
            while left:
                left -= len(r.read(min(left, 1 << 20)))
            return
        text = r.read(left)
        try:
            trailer = parse_trailer(text, at)
            self.trailer_devices = validate_trailer(trailer, at)
        except MalformedStream:
            if self.kept:
                raise
            return  # QEMU's destination never looks at it; it only tells the tools who wrote the stream
        self.stream.trailer, self.stream.trailer_text, self.stream.trailer_offset = trailer, text, at
        if not self.kept:
            return
        self.next_device = 0
        for sec, start in self.kept:
            try:
                device = self.trailer_device(sec)
                if device is None:
                    raise RegistryError(f"{_no_spec(sec)} and the trailer does not describe it", offset=sec.offset)
                sec.payload = decode_kept(sec.payload, start, device)
            except VMSDError as e:
                raise e.in_section(sec.idstr) from None
            sec.generic_body = device
            sec.vmsd_name = device.get("vmsd_name")
            sec.legacy = sec.vmsd_name is None

    def trailer_by_framing(self) -> bool:
        """Look for the trailer by its framing; True when one was found and taken.

        Only on demand: a stream without a trailer is common (``suppress-vmdesc``)
        and scanning all of it costs time.  A trailer found this way that is not
        JSON is remembered in :attr:`broken_trailer`, for the error to name it.
        """
        if self.framing_searched or not self.in_memory:
            return False
        self.framing_searched = True
        # The trailer follows EOF, which follows what was read so far (in a package: at least the header).
        at = framed_trailer(self.data, self.r.tell() if self.r is self.top else 8)
        if at is None:
            return False
        text = self.data[at + 5 :]
        try:
            trailer = loads(text)
        except ValueError as e:
            self.broken_trailer = (at, _json_problem(e))
            return False
        self.trailer_devices = validate_trailer(trailer, at)
        self.stream.trailer, self.stream.trailer_text = trailer, text
        return True

    def typed_problem(self, cls: Any, sec: Section) -> str | None:
        missing = unimplemented_predicates(cls)
        if missing:
            return f"spec '{cls.VMSD_NAME}' needs custom predicates implemented ({', '.join(missing)})"
        if sec.version_id > cls.VERSION_ID:
            return f"version {sec.version_id} is newer than the spec's {cls.VERSION_ID}"
        if sec.version_id < cls.MINIMUM_VERSION_ID:
            return f"version {sec.version_id} is older than the spec's minimum {cls.MINIMUM_VERSION_ID}"
        return None

    def trailer_device(self, sec: Section) -> Obj | None:
        """The trailer entry of this FULL section (the trailer lists them in stream order)."""
        devices = self.trailer_devices
        name = json_name(sec.idstr)
        for i in range(self.next_device, len(devices)):
            d = devices[i]
            if d.get("name") == name and d.get("instance_id") == sec.instance_id:
                self.next_device = i + 1
                return d
        return None


def _no_spec(sec: Section) -> str:
    return f"no spec for section '{sec.idstr}' (instance {sec.instance_id}, version {sec.version_id})"


def idstr_bytes(idstr: str) -> bytes:
    """The bytes of an idstr: read with ``surrogateescape``, any byte string comes back as it was."""
    try:
        return idstr.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise SaveError(f"idstr {idstr!r} cannot be encoded ({e.reason})") from None


def json_name(idstr: str) -> str:
    """An idstr as QEMU's trailer names it: JSON holds text, and QEMU writes U+FFFD for bytes that are not UTF-8."""
    return idstr_bytes(idstr).decode("utf-8", "replace")


def described_size(body: Obj) -> int | None:
    """Wire bytes of a trailer body (fields and subsections); None for legacy entries."""
    fields = body.get("fields")
    if fields is None or "vmsd_name" not in [k for k, _ in body]:
        return None
    total = sum(int(e.get("size", 0)) * int(e.get("array_len", 1)) for e in fields)
    for sub in body.get("subsections", []) or []:
        inner = described_size(sub)
        total += 2 + len(str(sub.get("vmsd_name")).encode()) + 4 + (inner or 0)
    return total


def _entry_runs(body: Obj) -> list[tuple[str, int]]:
    """(name, wire bytes) of a body's fields; consecutive entries of one name (QEMU 10.0's runs) as one."""
    out: list[tuple[str, int]] = []
    for e in body.get("fields", []) or []:
        name, size = str(e.get("name")), int(e.get("size", 0)) * int(e.get("array_len", 1))
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + size)
        else:
            out.append((name, size))
    return out


def layout_difference(spec: Obj, trailer: Obj, prefix: str = "") -> str:
    """The first field whose name or size differs between a spec's description and the trailer's, or a
    subsection only one of them has, in words ("" when they agree)."""
    mine, theirs = _entry_runs(spec), _entry_runs(trailer)
    for i in range(max(len(mine), len(theirs))):
        if i >= len(mine):
            return f"the trailer has field '{prefix}{theirs[i][0]}' ({theirs[i][1]} bytes) after the spec's last"
        if i >= len(theirs):
            return f"the spec has field '{prefix}{mine[i][0]}' ({mine[i][1]} bytes) after the trailer's last"
        (a, na), (b, nb) = mine[i], theirs[i]
        if a != b:
            return f"field {i} is '{prefix}{a}' ({na} bytes) in the spec, '{prefix}{b}' ({nb} bytes) in the trailer"
        if na != nb:
            return f"field '{prefix}{a}' is {na} bytes in the spec, {nb} in the trailer"
    subs_mine = {str(s.get("vmsd_name")): s for s in spec.get("subsections", []) or []}
    subs_theirs = {str(s.get("vmsd_name")): s for s in trailer.get("subsections", []) or []}
    for name in subs_theirs:
        if name not in subs_mine:
            return f"subsection '{name}' is in the stream but the spec did not read it"
    for name in subs_mine:
        if name not in subs_theirs:
            return f"the spec read subsection '{name}', which the trailer does not list"
        inner = layout_difference(subs_mine[name], subs_theirs[name], prefix=f"{name}: ")
        if inner:
            return inner
    return ""


def validate_trailer(trailer: Any, offset: int) -> list[Obj]:
    """The trailer's device list, after checking it has the shape QEMU writes (it is input too)."""
    def fail(where: str, what: str) -> MalformedStream:
        return MalformedStream(f"trailer: {where}: {what}", offset=offset)

    def body(b: Any, where: str) -> None:
        if not isinstance(b, Obj):
            raise fail(where, "expected an object")
        fields = b.get("fields")
        if not isinstance(fields, list):
            raise fail(where, "'fields' must be a list")
        for e in fields:
            if not isinstance(e, Obj) or not isinstance(e.get("name"), str) or not isinstance(e.get("type"), str):
                raise fail(where, "a field needs a string 'name' and 'type'")
            here = f"{where}.{e.get('name')}"
            for key in ("size", "array_len", "index"):
                v = e.get(key)
                # Nothing decodes by "index" (it only labels an element), so its integer
                # may be spelled as JSON allows (1e8); sizes and counts are read by the decoder.
                if key == "index" and isinstance(v, JSONFloat) and v.is_integer():
                    v = int(v)
                if (key == "size" or v is not None) and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                    raise fail(here, f"'{key}' must be a non-negative integer")
            if e.get("type") == "struct" and e.get("struct"):
                body(e.get("struct"), here)
            elif e.get("type") in ("vstruct", "tmp"):
                body(e, here)
        for sub in b.get("subsections", []) or []:
            if not isinstance(sub, Obj) or not isinstance(sub.get("vmsd_name"), str):
                raise fail(where, "a subsection needs a string 'vmsd_name'")
            body(sub, f"{where}/{sub.get('vmsd_name')}")

    if not isinstance(trailer, Obj) or not isinstance(trailer.get("devices"), list):
        raise fail("top level", "expected an object with a 'devices' list")
    devices: list[Obj] = trailer.get("devices")
    for d in devices:
        if not isinstance(d, Obj) or not isinstance(d.get("name"), str) or not isinstance(d.get("instance_id"), int):
            raise fail("devices", "each device needs a string 'name' and an integer 'instance_id'")
        if "vmsd_name" in [k for k, _ in d]:
            body(d, str(d.get("name")))
        elif not isinstance(d.get("size"), int):
            raise fail(str(d.get("name")), "a legacy section needs an integer 'size'")
    return devices


def _described_size_or_none(device: Obj | None) -> int | None:
    if device is None:
        return None
    try:
        return described_size(device)
    except (TypeError, AttributeError, ValueError):
        return None  # a malformed description: the typed decode stands on its own


def unimplemented_predicates(cls: Any, seen: set[Any] | None = None) -> list[str]:
    """Custom predicates of ``cls`` and the structs it nests that no registered class implements."""
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    out = [f"{cls.VMSD_NAME}.{m}" for m in sorted(getattr(impl(cls), "__abstractmethods__", ()))]
    for f in cls.VMSD.all_fields():
        for nested in (f.struct, f.key):
            if nested is not None:
                out += unimplemented_predicates(nested, seen)
    return out


def read_stream(data: bytes, specs: SpecSet, strict_typed: bool = False, enforce_checks: bool = False) -> Stream:
    """Parse a complete stream.  Raises a :class:`VMSDError` naming offset, section and field.

    ``strict_typed``: a section whose typed spec fails is an error instead of
    being decoded from the trailer.  ``enforce_checks``: ``equal``/``le``
    checks against our defaults fail the load, as on a destination; by
    default a reading tool records them as warnings (the defaults are not
    the machine the stream came from).
    """
    return Decoder(bytes(data), specs, strict_typed, enforce_checks).run()


def read_partial(data: bytes, specs: SpecSet) -> tuple[Stream, VMSDError | None]:
    """:func:`read_stream` that keeps what it read: on a damaged stream, the records before the error
    (``eof_offset`` stays None), what was read of the section it is in (``damage``), and the error, naming
    the field by its scheme name when it is in a section's fields, for a tool to show all three."""
    decoder = Decoder(bytes(data), specs, False, False)
    decoder.keep_damage = True
    try:
        return decoder.run(), None
    except VMSDError as e:
        damage = decoder.stream.damage
        if damage is not None and damage.error is not None:
            return decoder.stream, damage.error.in_section(damage.section.idstr)
        if damage is not None and damage.field is not None:
            e.path = damage.field  # the name inspect, --set and diff use (docs/names.md)
        return decoder.stream, e


def stream_head(configuration: Any, version: int = QEMU_VM_FILE_VERSION) -> bytes:
    """Magic, version and (when given) the typed configuration record."""
    w = Writer()
    w.u32(QEMU_VM_FILE_MAGIC)
    w.u32(version)
    if isinstance(configuration, MachineConfiguration):
        w.u8(QEMU_VM_CONFIGURATION)
        w.write(configuration.encode())
    elif configuration is not None:
        w.u8(QEMU_VM_CONFIGURATION)
        configuration._save_nested(w, configuration.VERSION_ID)
    return w.getvalue()


def section_head(kind: int, section_id: int, idstr: str = "", instance_id: int = 0, version_id: int = 0) -> bytes:
    """A section's header; START and FULL carry idstr, instance and version."""
    head = struct.pack(">BI", kind, section_id)
    if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        raw = idstr_bytes(idstr)
        if not 0 < len(raw) <= 255:
            raise SaveError(f"section idstr of {len(raw)} bytes (1 to 255 fit its length byte)", section=idstr)
        head += bytes([len(raw)]) + raw + struct.pack(">II", instance_id, version_id)
    return head


def section_footer(section_id: int) -> bytes:
    return struct.pack(">BI", QEMU_VM_SECTION_FOOTER, section_id)


class SavevmWriter:
    """QEMU's savevm framing in stream order, as byte strings for the caller to send (no I/O).

    Live migration and snapshots frame their streams with it: the header with the configuration record,
    commands, START/PART/END/FULL section headers with their footers (QEMU's ``send-section-footer``, on
    for every machine type since 2.4), EOF and the trailer.  Section payloads come from their codecs (RAM
    records, device state).  It refuses what QEMU's loader would: a PART or END of a section that was
    never started or has ended, a second START, a header after EOF.  (:func:`write_stream` writes records
    back as they were read, oddities included, so it uses the framing functions directly.)
    """

    def __init__(self, footers: bool = True, profile: PeerProfile | None = None) -> None:
        self.footers = footers
        self.profile = profile  # whose rules the trailer follows (None: QEMU 7.2's)
        self._open: set[int] = set()
        self._done = False

    def head(self, configuration: Any, version: int = QEMU_VM_FILE_VERSION) -> bytes:
        """Magic, version and the configuration record (a :class:`MachineConfiguration` or a typed one)."""
        return stream_head(configuration, version)

    def command(self, cmd: int, data: bytes = b"") -> bytes:
        self._check_open_stream()
        return struct.pack(">BHH", QEMU_VM_COMMAND, cmd, len(data)) + data

    def start(self, section_id: int, idstr: str, version_id: int, instance_id: int = 0) -> bytes:
        """The header of an iterative section's first part (RAM's block list follows)."""
        self._check_open_stream()
        if section_id in self._open:
            raise SaveError(f"section {section_id} ('{idstr}') is started twice")
        self._open.add(section_id)
        return section_head(QEMU_VM_SECTION_START, section_id, idstr, instance_id, version_id)

    def part(self, section_id: int) -> bytes:
        self._check_started(section_id)
        return section_head(QEMU_VM_SECTION_PART, section_id)

    def end(self, section_id: int) -> bytes:
        """The header of an iterative section's last part; the section is closed after it."""
        self._check_started(section_id)
        self._open.discard(section_id)
        return section_head(QEMU_VM_SECTION_END, section_id)

    def footer(self, section_id: int) -> bytes:
        return section_footer(section_id) if self.footers else b""

    def tail(self, sections: list[Section]) -> bytes:
        """The device (FULL) sections, EOF and the trailer regenerated from their specs; the stream ends."""
        out = bytearray()
        self.write_tail(out.extend, sections)
        return bytes(out)

    def write_tail(self, write: Callable[[bytes], object], sections: list[Section]) -> None:
        """:meth:`tail` handed to ``write`` a piece at a time (a section, the EOF, a device's description):
        a snapshot of millions of tiny sections is never built whole in memory."""
        self._check_open_stream()
        if self._open:
            raise SaveError(f"EOF while section(s) {sorted(self._open)} have not ended")
        for sec in sections:
            sec.footer = self.footers
        self._done = True
        write_stream_tail(write, sections, self.profile)

    def _check_open_stream(self) -> None:
        if self._done:
            raise SaveError("the stream has ended (EOF written)")

    def _check_started(self, section_id: int) -> None:
        self._check_open_stream()
        if section_id not in self._open:
            raise SaveError(f"section {section_id} was not started or has ended")


# What encoding a value of the wrong type or range raises before it reaches a
# VMSDError (struct.pack, int.to_bytes, a missing attribute or list item).
_ENCODE_ERRORS = (ValueError, TypeError, OverflowError, struct.error, KeyError, IndexError, AttributeError,
                  StopIteration)


def _save_error(e: Exception, section: str | None, offset: int | None) -> VMSDError:
    """``e``, raised while encoding ``section`` (read at ``offset``), as a VMSDError naming them."""
    if isinstance(e, VMSDError):
        if e.offset is None:
            e.offset = offset
        return e.in_section(section) if section is not None else e
    return SaveError(f"cannot encode: {e}", offset=offset, section=section)


def _json_text(value: Any) -> str:
    try:
        return dumps(value)
    except _ENCODE_ERRORS as e:
        raise SaveError(f"cannot write the trailer: {e}") from e


def _trailer_record(desc: Obj) -> bytes:
    text = _json_text(desc).encode()
    return bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", len(text)) + text


# Bytes of sections gathered before :func:`write_stream_tail` hands them on.
_TAIL_CHUNK = 1 << 16


def write_stream_tail(write: Callable[[bytes], object], sections: list[Section],
                      profile: PeerProfile | None = None) -> None:
    """Device sections, EOF and the trailer regenerated from their specs (by ``profile``'s rules): the end
    of a live migration, handed to ``write`` in pieces of at most about 64 KiB or one device's description.

    The trailer's length comes before its text: the descriptions are made twice, once to count their
    bytes and once to write them, so that only one is ever held."""
    w = Writer()
    for sec in sections:
        write_records(w, [sec])
        if len(w.buf) >= _TAIL_CHUNK:
            write(bytes(w.buf))
            w.buf.clear()
    w.u8(QEMU_VM_EOF)
    write(bytes(w.buf))
    stream = Stream(records=list(sections), profile=profile)
    size = sum(map(len, _regenerated_pieces(stream)))
    write(bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", size))
    written = 0
    for piece in _regenerated_pieces(stream):
        written += len(piece)
        write(piece)
    if written != size:  # a description that changed between the passes: the length written is wrong
        raise SaveError(f"the regenerated trailer changed while written ({size} bytes counted, {written} made)")


def write_stream(stream: Stream, trailer: bool | Obj = True) -> bytes:
    """Encode ``stream``.  ``trailer``: True = regenerate from the payloads, an Obj = use it, False = none.

    Anything that cannot be encoded raises a :class:`VMSDError` (a :class:`SaveError`
    unless a more specific one applies) naming the section and where it was read.
    """
    w = Writer()
    conf = stream.configuration
    try:
        w.write(stream_head(conf.state if conf is not None else None, stream.version))
    except (VMSDError, *_ENCODE_ERRORS) as e:
        raise _save_error(e, "configuration", conf.offset if conf is not None else 0) from e
    write_records(w, stream.records)
    w.u8(QEMU_VM_EOF)
    if trailer is not False and (stream.trailer is not None or isinstance(trailer, Obj)):
        w.write(_trailer_record(trailer) if isinstance(trailer, Obj) else _regenerated_record(stream))
    return w.getvalue()


def write_records(w: Writer, records: list[Section | Command | CommandRun]) -> None:
    """Sections and commands, each with its header and (when set) footer."""
    for rec in records:
        try:
            _write_record(w, rec)
        except (VMSDError, *_ENCODE_ERRORS) as e:
            name = rec.idstr if isinstance(rec, Section) else rec.name
            raise _save_error(e, name, rec.offset) from e


def _write_record(w: Writer, rec: Section | Command | CommandRun) -> None:
    if isinstance(rec, CommandRun):
        w.write(rec.raw)
        return
    if isinstance(rec, Command):
        w.u8(QEMU_VM_COMMAND)
        w.u16(rec.cmd)
        if rec.packaged is not None:
            inner = Writer()
            write_records(inner, rec.packaged)
            if rec.package_eof:
                inner.u8(QEMU_VM_EOF)
            inner.write(rec.package_tail)
            body = inner.getvalue()
            w.u16(4)
            w.u32(len(body))
            w.write(body)
        else:
            w.u16(len(rec.data))
            w.write(rec.data)
            for _ in range(rec.count - 1):
                w.u8(QEMU_VM_COMMAND)
                w.u16(rec.cmd)
                w.u16(len(rec.data))
                w.write(rec.data)
        return
    w.write(section_head(rec.kind, rec.section_id, rec.idstr, rec.instance_id, rec.version_id))
    p = rec.payload
    if isinstance(p, RamPayload):
        write_ram(w, p)
    elif rec.generic_body is not None and isinstance(p, Obj):
        encode_body(w, rec.generic_body, p)
    elif isinstance(p, bytes):
        w.write(p)
    elif p is None:
        raise SaveError("cannot encode: the section has no payload")
    else:
        p._save_nested(w, rec.version_id)
    if rec.footer:
        w.write(section_footer(rec.section_id))


def _pairs(obj: Obj) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in obj if k not in ("name", "instance_id")]


def description_rule(stream: Stream) -> tuple[bool, bool]:
    """How typed sections of ``stream`` describe arrays element by element (:func:`describe`'s ``runs`` and
    ``indexes``): as the stream's own trailer does (its writer's rule, whatever set decodes it), so that an
    unchanged stream rewrites byte for byte; else by the profile's rules."""
    rule = array_rule(stream.trailer) if stream.trailer is not None else None
    if rule is not None:
        return rule
    return (stream.profile is not None and stream.profile.vmdesc_array_runs,
            stream.profile is None or stream.profile.vmdesc_element_index)


def regenerate_trailer(stream: Stream) -> Obj:
    """The trailer QEMU would write: typed sections described from their specs (see :func:`_trailer_parts`)."""
    out = Obj()
    devices: list[Obj] = []
    for key, value in _trailer_parts(stream):
        out.append((key, value))
        if key == "devices":
            devices.extend(value)
            out[-1] = (key, devices)
    return out


def _regenerated_record(stream: Stream) -> bytes:
    """The trailer record of :func:`regenerate_trailer`, its text made a device at a time: the devices'
    descriptions (several times the size of the sections they describe) are never all built at once."""
    text = b"".join(_regenerated_pieces(stream))
    return bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", len(text)) + text


def _regenerated_pieces(stream: Stream) -> Iterator[bytes]:
    """The text of :func:`regenerate_trailer` in pieces: the top-level pairs, one device at a time."""
    for i, (key, value) in enumerate(_trailer_parts(stream)):
        head = ("{" if i == 0 else ", ") + _json_text(key) + ": "
        if key != "devices":
            yield (head + _json_text(value)).encode()
            continue
        yield (head + "[").encode()
        for j, device in enumerate(value):
            yield ((", " if j else "") + _json_text(device)).encode()
        yield b"]"
    yield b"}"


def _trailer_parts(stream: Stream) -> Iterator[tuple[str, Any]]:
    """The trailer's top-level pairs in order; the value of "devices" is an iterator that describes each
    FULL section when it is reached.

    A JSON name cannot hold an idstr's bytes that are not UTF-8 (QEMU writes
    U+FFFD for them).  Such a section keeps the name the stream's own trailer
    gave the entry in its place, when that entry describes it exactly as
    regenerated, so that an unchanged stream rewrites byte for byte.
    """
    # RAM is iterative in QEMU, never described; a stream may still carry it in a FULL section.
    fulls = [s for s in stream.full_sections() if not isinstance(s.payload, RamPayload)]
    runs, indexes = description_rule(stream)
    old: Any = stream.trailer.get("devices") if stream.trailer is not None else None
    # The trailer lists the FULL sections in stream order; with another count, places do not correspond.
    old_devices: list[Any] = old if isinstance(old, list) and len(old) == len(fulls) else []
    if stream.trailer is not None and stream.trailer.get("configuration") is not None:
        yield "configuration", stream.trailer.get("configuration")
    # As read, when it was read: written again, a value that is not QEMU's integer would change.
    page_size = stream.trailer.get("page_size") if stream.trailer is not None else None
    yield "page_size", page_size if page_size is not None else stream.page_size
    yield "devices", _devices(fulls, old_devices, runs, indexes)


def _devices(fulls: list[Section], old_devices: list[Any], runs: bool, indexes: bool) -> Iterator[Obj]:
    for i, sec in enumerate(fulls):
        try:
            name = json_name(sec.idstr)
            head = Obj([("name", name), ("instance_id", sec.instance_id)])
            p = sec.payload
            if sec.legacy and sec.generic_body is None:
                size = len(p._save_nested_bytes(sec.version_id)) if not isinstance(p, bytes) else len(p)
                data = Obj([("name", "data"), ("size", size), ("type", "buffer")])
                head.extend([("size", size), ("fields", [data])])
            elif sec.generic_body is not None:
                head.extend(_pairs(sec.generic_body))
            else:
                body, _ = describe(p, sec.version_id, runs, indexes)
                head.extend(body)
        except (VMSDError, *_ENCODE_ERRORS) as e:
            raise _save_error(e, sec.idstr, sec.offset) from e
        if old_devices and name != sec.idstr:  # the idstr is not UTF-8
            was = old_devices[i]
            if (isinstance(was, Obj) and isinstance(was.get("name"), str)
                    and was.get("instance_id") == sec.instance_id and _pairs(was) == _pairs(head)):
                head[0] = ("name", was.get("name"))
        yield head
