"""Base class, registry and helpers used by generated vmsd classes.

Generated classes subclass :class:`VMStateObject` and implement
``_load_fields``/``_save_fields`` as straight-line code.  The helpers below
cover the rarer field kinds (bitmaps, lists, trees, arrays of pointers) and
the subsection loop, which follows QEMU's loader exactly: peek the marker,
check the name prefix, look the name up, keep only the low 8 bits of the
version.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import itertools
import struct
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

from vmsd.runtime.blame import blame as blame  # generated savers call it as _rt.blame
from vmsd.runtime.errors import CheckFailed, MalformedStream, RegistryError, SaveError, VersionMismatch, VMSDError
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.markers import NULLPTR_MARKER, QEMU_VM_SUBSECTION

__all__ = [
    "API_VERSION",
    "CheckFailed",
    "MalformedStream",
    "SaveError",
    "VMSDError",
    "VMStateObject",
    "check_failed",
    "current_reader",
    "loading",
    "register",
    "register_extent",
    "reporting_checks",
]

if TYPE_CHECKING:
    from typing import Self

    from vmsd.runtime.schema import VmsdSpec

API_VERSION = 2

SubLoader = Callable[[Any, "Reader", int], None]

T = TypeVar("T", bound="VMStateObject")
V = TypeVar("V")


def require_api(version: int) -> None:
    """Called by every generated module at import."""
    if version != API_VERSION:
        raise ImportError(
            f"generated code needs vmsd runtime API {version}, this runtime is {API_VERSION}: regenerate it with 'vmsd compile'"
        )


_IMPLS: dict[Any, Any] = {}


def register(cls: type[T]) -> type[T]:
    """Make ``cls`` the class the loaders build for its generated base vmsd class."""
    base = next((c for c in cls.__mro__ if "VMSD_NAME" in c.__dict__ and c.__dict__.get("_generated")), None)
    if base is None:
        raise RegistryError(f"{cls.__name__} does not derive from a generated vmsd class")
    _IMPLS[base] = cls
    return cls


# Generated classes with custom predicates are abstract; they are passed as
# plain callables so that mypy accepts them (the registered class is concrete).
def impl(cls: Callable[[], V]) -> Callable[[], V]:
    """The class registered for a generated class (itself by default)."""
    found: Callable[[], V] = _IMPLS.get(cls, cls)
    return found


class VMStateObject(abc.ABC):
    """A migratable state object described by a vmsd."""

    __slots__ = ()
    VMSD: ClassVar[VmsdSpec]
    VMSD_NAME: ClassVar[str]
    VERSION_ID: ClassVar[int]
    MINIMUM_VERSION_ID: ClassVar[int]
    # subsection loaders by parent name: {name: (version, minimum, loader)}
    _SUBSECTIONS: ClassVar[dict[str, dict[bytes, tuple[int, int, SubLoader]]]] = {}
    # Whether loading may run a custom predicate (here or in a nested
    # struct): only then does the load publish its reader (current_reader).
    _PEEKS: ClassVar[bool] = False
    # Whether instances have a __dict__ (registered subclasses usually do),
    # where the subsection loop records which subsections a load read.
    _TRACKED: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._TRACKED = cls.__dictoffset__ != 0

    @classmethod
    def _fresh(cls) -> Self:
        """An instance for a load to fill.  Generated classes skip the
        defaults their loader always overwrites (see :func:`fresh`)."""
        return cls()

    def _fill(self) -> None:  # noqa: B027 - generated classes override it when they have something to build
        """After the fields, before post_load: build the defaults of what the load did not reach."""

    # Hooks QEMU calls pre_save/post_save/pre_load/post_load; override in a
    # registered subclass.  Raise a VMSDError to fail the operation.
    def pre_save(self) -> None:  # noqa: B027 - optional hook
        """Before the fields are written."""

    def post_save(self) -> None:  # noqa: B027 - optional hook
        """After fields and subsections were written."""

    def pre_load(self) -> None:  # noqa: B027 - optional hook
        """Before the fields are read (the object holds its defaults)."""

    def post_load(self, version_id: int) -> None:  # noqa: B027 - optional hook
        """After fields and subsections were read."""

    @abc.abstractmethod
    def _load_fields(self, r: Reader, version_id: int) -> None: ...

    @abc.abstractmethod
    def _save_fields(self, w: Writer, version_id: int) -> None: ...

    @classmethod
    def load(cls, data: Reader | bytes | bytearray | memoryview, version_id: int | None = None) -> Self:
        """Build the registered class for this vmsd from its wire encoding."""
        ctor: Any = _IMPLS.get(cls, cls)
        direct = _DIRECT.get(ctor)
        if direct is None:
            direct = _direct(ctor)
        if type(data) is bytes and direct:
            # The common case, a generated class from bytes: no hooks to call
            # (generated classes have none), no reader to publish.
            new: Self = ctor._fresh()
            r = Reader(data)
            v = ctor.VERSION_ID if version_id is None else version_id
            if not ctor.MINIMUM_VERSION_ID <= v <= ctor.VERSION_ID:
                check_version(ctor.VMSD_NAME, v, ctor.VERSION_ID, ctor.MINIMUM_VERSION_ID, 0)
            try:
                new._load_fields(r, v)
                if direct == _FILLS:
                    new._fill()
            except VMSDError as e:
                raise e.within(ctor.VMSD_NAME) from None
            if r.pos != len(data):
                _leftovers(r, ctor.VMSD_NAME)
            return new
        obj = fresh(cls)
        obj.load_into(data, version_id)
        return obj

    def load_into(self, data: Reader | bytes | bytearray | memoryview, version_id: int | None = None) -> None:
        """Load into this object, as QEMU loads into an existing device."""
        r = data if isinstance(data, Reader) else Reader(data)
        v = self.VERSION_ID if version_id is None else version_id
        # Publishing the reader costs a context-variable round trip per load:
        # only custom predicates and user hooks (registered subclasses) use it.
        token = _CURRENT_READER.set(r) if self._PEEKS or "_generated" not in type(self).__dict__ else None
        try:
            self._read(r, v, r is not data)
        finally:
            if token is not None:
                _CURRENT_READER.reset(token)

    def _read(self, r: Reader, v: int, whole: bool) -> None:
        """The load proper; ``whole``: ``r`` holds exactly this object's bytes."""
        if not self.MINIMUM_VERSION_ID <= v <= self.VERSION_ID:
            check_version(self.VMSD_NAME, v, self.VERSION_ID, self.MINIMUM_VERSION_ID, r.tell())
        try:
            self.pre_load()
            self._load_fields(r, v)
            self._fill()
            self.post_load(v)
        except VMSDError as e:
            raise e.within(self.VMSD_NAME) from None
        if whole and r.pos != len(r.buf):
            _leftovers(r, self.VMSD_NAME)

    def save(self, w: Writer | None = None, version_id: int | None = None) -> bytes:
        """Encode at ``version_id`` (default: the newest); returns the bytes written."""
        direct = _DIRECT.get(type(self))
        if direct is None:
            direct = _direct(type(self))
        if w is None and version_id is None and direct:
            # A generated class on its own: no hooks to call, a fresh buffer.
            w = Writer()
            try:
                self._save_fields(w, self.VERSION_ID)
            except VMSDError as e:
                raise e.within(self.VMSD_NAME) from None
            return bytes(w.buf)
        w = Writer() if w is None else w
        start = len(w.buf)
        v = self.VERSION_ID if version_id is None else version_id
        if version_id is not None:
            check_version(self.VMSD_NAME, v, self.VERSION_ID, self.MINIMUM_VERSION_ID, None)
        try:
            self._save_nested(w, v)
        except VMSDError as e:
            raise e.within(self.VMSD_NAME) from None
        return bytes(w.buf[start:] if start else w.buf)

    def _save_nested_bytes(self, version_id: int) -> bytes:
        w = Writer()
        self._save_nested(w, version_id)
        return w.getvalue()

    def _load_nested(self, r: Reader, version_id: int) -> None:
        self.pre_load()
        self._load_fields(r, version_id)
        self._fill()
        self.post_load(version_id)

    def _save_nested(self, w: Writer, version_id: int) -> None:
        self.pre_save()
        try:
            self._save_fields(w, version_id)
        finally:
            self.post_save()


def _leftovers(r: Reader, name: str) -> NoReturn:
    # Given the bytes of one object, leftovers mean the spec and the data disagree.
    raise MalformedStream(f"{len(r.buf) - r.pos} bytes left after the last field", offset=r.tell(), path=name)


# Classes loaded and saved without hooks or a published reader: generated
# classes themselves (not registered subclasses) whose loads run no custom
# predicate.  Values: 0 (not direct), _PLAIN, or _FILLS (has a _fill step).
_DIRECT: dict[Any, int] = {}
_PLAIN, _FILLS = 1, 2


def _direct(ctor: Any) -> int:
    kind = 0
    if "_generated" in ctor.__dict__ and not ctor._PEEKS:  # generated classes all define _fresh
        kind = _FILLS if "_fill" in ctor.__dict__ else _PLAIN
    _DIRECT[ctor] = kind
    return kind


# The reader of the load in progress: custom predicates whose answer is in the
# bytes ahead (not in the state loaded so far) may peek at it.
_CURRENT_READER: contextvars.ContextVar[Reader] = contextvars.ContextVar("vmsd_current_reader")


def current_reader() -> Reader:
    """The reader of the load in progress (for custom predicates that must peek)."""
    try:
        return _CURRENT_READER.get()
    except LookupError:
        raise RegistryError("no load in progress: this predicate decides presence only while loading") from None


# Where failed equal/le/validate checks go: None = raise (a destination
# refusing the stream); a list = record and go on (tools that only read).
_CHECK_REPORTS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("vmsd_check_reports", default=None)


def check_failed(field: str, message: str, offset: int) -> None:
    """An ``equal``/``le``/``validate`` check did not hold at ``offset``."""
    reports = _CHECK_REPORTS.get()
    if reports is None:
        raise CheckFailed(message, offset=offset)
    reports.append(f"check on '{field}' failed: {message} (at offset {offset:#x})")


@contextlib.contextmanager
def reporting_checks() -> Iterator[list[str]]:
    """Within this block failed checks are collected instead of raised."""
    reports: list[str] = []
    token = _CHECK_REPORTS.set(reports)
    try:
        yield reports
    finally:
        _CHECK_REPORTS.reset(token)


def loading() -> bool:
    """True while a load is in progress in this context."""
    return _CURRENT_READER.get(None) is not None


# What the destination's machine knows and the stream does not carry: counts that QEMU takes from
# device configuration (possible CPUs, memory slots), by (vmsd name, property name).
_CONFIGURATION: contextvars.ContextVar[dict[tuple[str, str], int] | None] = contextvars.ContextVar(
    "vmsd_device_configuration", default=None)


@contextlib.contextmanager
def device_configuration(values: dict[tuple[str, str], int]) -> Iterator[None]:
    """Within this block, :func:`configured` answers from ``values``: a load then uses the counts a
    machine would have instead of working them out from the bytes (which cannot always tell)."""
    token = _CONFIGURATION.set(dict(values))
    try:
        yield
    finally:
        _CONFIGURATION.reset(token)


def configured(obj: Any, name: str) -> int | None:
    """The value :func:`device_configuration` gives property ``name`` of ``obj``'s vmsd, if it does."""
    values = _CONFIGURATION.get()
    return None if values is None else values.get((type(obj).VMSD_NAME, name))


def check_version(name: str, v: int, version: int, minimum: int, offset: int | None) -> None:
    if v > version:
        raise VersionMismatch(f"{name}: incoming version_id {v} is too new for local version_id {version}", offset=offset)
    if v < minimum:
        raise VersionMismatch(f"{name}: incoming version_id {v} is too old for local minimum version_id {minimum}", offset=offset)


# ---- small helpers for generated code -------------------------------------

def missing(name: str) -> NoReturn:
    """An optional field is None but the version being saved needs it."""
    raise SaveError(f"field '{name}' is None but version being saved needs it")


def opt(value: V | None, name: str) -> V:
    """An optional field read inside an expression: it must have been loaded."""
    if value is None:
        raise CheckFailed(f"expression needs field '{name}', which is absent at this version")
    return value


def count(n: int) -> int:
    """A variable element count; QEMU loops zero times for a negative count."""
    return n if n > 0 else 0


def check_len(value: Sized, n: int, name: str) -> None:
    if len(value) != n:
        raise SaveError(f"'{name}' has {len(value)} elements, its length field says {n}")


def check_fixed_len(value: Sized, n: int, name: str) -> None:
    if len(value) != n:
        raise SaveError(f"'{name}' has {len(value)} elements, the spec fixes {n}")


def flat(rows: Sequence[Sequence[Any]], n: int, m: int, name: str) -> list[Any]:
    if len(rows) != n or any(len(row) != m for row in rows):
        raise SaveError(f"'{name}' must be {n} rows of {m} elements")
    return [x for row in rows for x in row]


def c_div(a: int, b: int) -> int:
    if b == 0:
        raise CheckFailed("division by zero in expression")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def c_mod(a: int, b: int) -> int:
    return a - c_div(a, b) * b


# Device-specific VMStateInfo encodings (QEMU's "virtio", "pci msix" …) are not
# self-delimiting.  An extent function looks at the bytes ahead (and the
# object loaded so far) and says how many belong to the field.
Extent = Callable[[Reader, Any], int]
_EXTENTS: dict[str, Extent] = {}


def register_extent(info: str, fn: Extent) -> None:
    _EXTENTS[info] = fn


def opaque_extent(info: str, r: Reader, obj: Any) -> int:
    fn = _EXTENTS.get(info)
    if fn is None:
        raise RegistryError(f"no extent function registered for QEMU type '{info}'", offset=r.tell())
    return fn(r, obj)


def fresh(cls: Callable[[], T]) -> T:
    """A new instance of the class registered for ``cls``, about to be loaded.

    It starts without the defaults its loader always overwrites (a CPU's
    register arrays are not built only to be replaced).  A registered
    subclass that may look at those first (its own ``__init__``, attrs
    fields or ``pre_load``) is built with all of them.
    """
    ctor: Any = _IMPLS.get(cls, cls)
    obj: T = ctor._fresh() if _quick(ctor) else ctor()
    return obj


def _quick(ctor: Any) -> bool:
    """Whether instances of ``ctor`` may be made without its ``__init__`` (see :func:`fresh`)."""
    quick = _QUICK.get(ctor)
    if quick is None:
        quick = _QUICK[ctor] = _starts_fresh(ctor)
    return quick


class _Absent:
    """Stands for a subsection field's default until the load shows it is needed."""

    __slots__ = ()

    def __len__(self) -> int:  # an empty "existing" array for load_struct_array
        return 0

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


class _Default:
    """Default of a generated ``__init__`` parameter whose default is built per instance."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
_QUICK: dict[Any, bool] = {}
_SEES_DEFAULTS = ("__init__", "__attrs_attrs__", "__attrs_post_init__", "pre_load")


def _starts_fresh(ctor: Any) -> bool:
    for klass in ctor.__mro__:
        if klass.__dict__.get("_generated"):
            return "_fresh" in klass.__dict__
        if any(name in klass.__dict__ for name in _SEES_DEFAULTS):
            return False
    return False


def new_array(cls: Callable[[], T], n: int) -> list[T]:
    """``n`` fresh elements of the class registered for ``cls``."""
    ctor: Any = impl(cls)
    if getattr(ctor, "_FLAT", None) is not None and _quick(ctor):
        # All of a flat element is its one fused run: build from its default row.
        built: list[T] = ctor._from_rows(itertools.repeat(ctor._FLAT_DEFAULTS, n))
        return built
    return [ctor() for _ in range(n)]


def load_struct_array(r: Reader, cls: Callable[[], T], n: int, version: int, existing: list[T]) -> list[T]:
    ctor: Any = impl(cls)
    flat: struct.Struct | None = getattr(ctor, "_FLAT", None)
    if flat is not None and n > 0 and ctor.pre_load is _NO_HOOK_PRE and ctor.post_load is _NO_HOOK_POST:
        # One fused run per element and no hooks: unpack all elements at once,
        # into the elements there are and then into new ones.
        size = flat.size * n
        buf, p = r.take(size)
        rows = flat.iter_unpack(memoryview(buf)[p : p + size])
        keep = min(len(existing), n)
        out: list[T] = existing[:keep] if keep else []
        for obj in out:
            obj._set_flat(next(rows))  # type: ignore[attr-defined]
        if keep < n:
            if _quick(ctor):
                out += ctor._from_rows(rows)
            else:
                for values in rows:
                    new = ctor()
                    new._set_flat(values)
                    out.append(new)
        return out
    out = []
    for i in range(n):
        obj = existing[i] if i < len(existing) else fresh(cls)
        try:
            obj._load_nested(r, version)
        except VMSDError as e:
            raise e.within(f"[{i}]") from None
        out.append(obj)
    return out


_NO_HOOK_PRE = VMStateObject.pre_load
_NO_HOOK_POST = VMStateObject.post_load


def save_struct_array(w: Writer, values: Sequence[T], n: int, version: int, name: str) -> None:
    if len(values) != n:
        raise SaveError(f"'{name}' has {len(values)} elements, expected {n}")
    kind: Any = type(values[0]) if values else None
    if kind is not None and "_save_rows" in kind.__dict__ and all(type(v) is kind for v in values):
        # Elements of one generated flat class (no hooks): one loop of packs.
        # Anything wrong is left to the element-wise path below, which names it.
        start = len(w.buf)
        try:
            kind._save_rows(values, w.buf)
            return
        except (VMSDError, struct.error, TypeError, OverflowError):
            del w.buf[start:]
    for i, obj in enumerate(values):
        try:
            obj._save_nested(w, version)
        except VMSDError as e:
            raise e.within(f"[{i}]") from None


def load_nullable_array(r: Reader, n: int, version: int, existing: list[T | None]) -> list[T | None]:
    """QEMU's array of pointers: a slot that is NULL on the destination reads the marker byte."""
    out: list[T | None] = []
    for i in range(n):
        slot = existing[i] if i < len(existing) else None
        if slot is None:
            at = r.tell()
            if r.u8() != NULLPTR_MARKER:
                raise MalformedStream(f"[{i}]: expected the NULL slot marker 0x30", offset=at)
            out.append(None)
            continue
        try:
            slot._load_nested(r, version)
        except VMSDError as e:
            raise e.within(f"[{i}]") from None
        out.append(slot)
    return out


def save_nullable_array(w: Writer, values: Sequence[T | None], n: int, version: int, name: str) -> None:
    if len(values) != n:
        raise SaveError(f"'{name}' has {len(values)} elements, expected {n}")
    for i, obj in enumerate(values):
        if obj is None:
            w.buf.append(NULLPTR_MARKER)
            continue
        try:
            obj._save_nested(w, version)
        except VMSDError as e:
            raise e.within(f"[{i}]") from None


def load_bitmap(r: Reader, nbits: int) -> int:
    """QEMU bitmaps: 64-bit big-endian words, bit i of the map is bit i%64 of word i//64."""
    nwords = (nbits + 63) // 64
    buf, p = r.take(nwords * 8)
    words = struct.unpack_from(f">{nwords}Q", buf, p)
    value = 0
    for i, word in enumerate(words):
        value |= word << (64 * i)
    return value


def save_bitmap(w: Writer, value: int, nbits: int, name: str) -> None:
    nwords = (nbits + 63) // 64
    if value < 0 or value >> (64 * nwords):
        raise SaveError(f"bitmap '{name}' does not fit in {nwords} 64-bit words")
    mask = (1 << 64) - 1
    w.buf += struct.pack(f">{nwords}Q", *((value >> (64 * i)) & mask for i in range(nwords)))


def load_qlist(r: Reader, cls: Callable[[], T], version: int) -> list[T]:
    """QTAILQ/QLIST: a non-zero byte before each element, a zero byte at the end."""
    out: list[T] = []
    while r.u8():
        obj = fresh(cls)
        try:
            obj._load_nested(r, version)
        except VMSDError as e:
            raise e.within(f"[{len(out)}]") from None
        out.append(obj)
    return out


def save_qlist(w: Writer, values: Sequence[T], version: int) -> None:
    for i, obj in enumerate(values):
        w.buf.append(1)
        try:
            obj._save_nested(w, version)
        except VMSDError as e:
            raise e.within(f"[{i}]") from None
    w.buf.append(0)


def load_gtree(r: Reader, key_cls: Callable[[], VMStateObject] | None, cls: Callable[[], T], version: int) -> list[tuple[Any, T]]:
    """GTree: be32 node count; per node a 1 byte, the key, the value; then a 0 byte."""
    start = r.tell()
    nnodes = r.u32()
    out: list[tuple[Any, T]] = []
    while r.u8():
        if len(out) >= nnodes:
            raise MalformedStream(f"tree announces {nnodes} nodes but holds more", offset=start)
        key: Any
        if key_cls is None:
            key = r.u64()
        else:
            key = fresh(key_cls)
            key._load_nested(r, version)
        value = fresh(cls)
        try:
            value._load_nested(r, version)
        except VMSDError as e:
            raise e.within(f"[{key!r}]") from None
        out.append((key, value))
    if len(out) != nnodes:
        raise MalformedStream(f"tree announces {nnodes} nodes but holds {len(out)}", offset=start)
    return out


def save_gtree(w: Writer, items: Sequence[tuple[Any, T]], version: int, direct_key: bool) -> None:
    w.u32(len(items))
    for key, value in items:
        w.buf.append(1)
        if direct_key:
            w.u64(key)
        else:
            key._save_nested(w, version)
        value._save_nested(w, version)
    w.buf.append(0)


def load_subsections(obj: Any, r: Reader, prefix: bytes, top: bool, table: dict[bytes, tuple[int, int, SubLoader]]) -> None:
    """QEMU's subsection loop: stops at the first thing that is not one of ours.

    ``prefix`` is the name of the vmsd (``top``) or subsection holding them.
    """
    seen = getattr(obj, "__dict__", None)
    if seen is not None:  # registered subclasses remember what they were loaded with
        if top:
            seen["_vmsd_loaded_subsections"] = set()
        else:
            seen.setdefault("_vmsd_loaded_subsections", set())
    while True:
        # Look at the marker, length and name in place when they are buffered.
        buf, pos = r.buf, r.pos
        if pos + 2 > len(buf):
            buf, pos = r.peek(2 + 255), 0
            if len(buf) < 2:
                return
        n = buf[pos + 1]
        if buf[pos] != QEMU_VM_SUBSECTION or n < len(prefix) + 1:
            return
        if pos + 2 + n > len(buf):
            buf, pos = r.peek(2 + n), 0
            if len(buf) < 2 + n:
                return
        if not buf.startswith(prefix, pos + 2):
            return
        name = buf[pos + 2 : pos + 2 + n]
        at = r.tell()
        entry = table.get(name)
        if entry is None:
            raise MalformedStream(f"unknown subsection '{name.decode(errors='replace')}'", offset=at)
        r.take(2 + n)
        label = name.decode()
        if seen is not None:
            seen["_vmsd_loaded_subsections"].add(label)
        # QEMU stores the subsection version in a uint8_t: only the low byte counts.
        v = r.u32() & 0xFF
        version, minimum, loader = entry
        try:
            if not minimum <= v <= version:
                check_version(label, v, version, minimum, at)
            loader(obj, r, v)
        except VMSDError as e:
            raise e.within(label) from None


def as_loaded_subclass(cls: type[T]) -> type[T] | None:
    """A subclass answering ``needed custom(...)`` predicates "as it was loaded".

    When a stream is decoded and written back, a subsection whose predicate
    depends on configuration the stream does not carry (CPU features, device
    options) is exactly needed when it was present in the input.  Returns
    None when some custom predicate decides field presence instead: that one
    needs a real implementation.
    """
    missing = set(getattr(impl(cls), "__abstractmethods__", ()))
    if not missing:
        return None
    spec = cls.VMSD
    needed: dict[str, list[str]] = {}
    tests = {f.test for f in spec.all_fields()}
    for sub in spec.all_subsections():
        if sub.needed is not None and sub.needed in missing:
            needed.setdefault(sub.needed, []).append(sub.name)
    if missing & tests or missing - needed.keys():
        return None

    def predicate(names: list[str]) -> Callable[[Any, int], bool]:
        wanted = frozenset(names)

        def decide(self: Any, version_id: int) -> bool:
            return not wanted.isdisjoint(self.__dict__.get("_vmsd_loaded_subsections", ()))

        return decide

    methods = {name: predicate(subs) for name, subs in needed.items()}
    base: type[T] = impl(cls)  # type: ignore[assignment]
    return type(f"{cls.__name__}AsLoaded", (base,), methods)


def write_subsection_header(w: Writer, name: bytes, version: int) -> None:
    w.buf.append(QEMU_VM_SUBSECTION)
    w.buf.append(len(name))
    w.buf += name
    w.u32(version)
