"""Extent functions for QEMU 7.2's device-specific encodings (``opaque`` fields).

Importing this module registers, with :func:`vmsd.runtime.vmstate.register_extent`:

``"virtio"``
    VMSTATE_VIRTIO_DEVICE (virtio-net, virtio-blk): the bytes virtio_save()
    writes with the virtio-pci transport.  The layout is documented in
    specs/qemu/7.2/virtio.vmsd; the extent reads every length it can from the
    bytes themselves:

    * the saved PCI config space tells whether the function is PCI Express
      (a PCI Express capability, ID 0x10: 4096 config bytes instead of 256) and
      how many MSI-X vectors it has (the MSI-X capability, ID 0x11: table size
      field of Message Control).  No MSI-X capability means no vector table,
      no config vector and no per-queue vectors, as in msix_present();
    * config_len and the number of queues are in the bytes;
    * the device part and the generic "virtio" subsections are measured by
      loading them with the classes generated from virtio.vmsd,
      virtio_net.vmsd and virtio_blk.vmsd.

    What the bytes do not say is assumed, then checked: the field must end
    where the section footer (0x7e) or the input ends, and the other
    assumption is tried when it does not.  virtio-net: max_queue_pairs > 1
    is taken from max_virtqueue_pairs in the saved config space (when the
    config is at least 10 bytes and the field is not 0: QEMU only refreshes
    vdev->config when the guest reads it), otherwise from the queue count.
    virtio-blk: a packed ring (host feature, "packed=off" by default) adds 4
    bytes to each pending request; the split ring is tried first.

``"virtio-net-tx_waiting"``
    The tmp struct of virtio-net's tx_waiting flags: 4 bytes per queue pair
    after the first (curr_queue_pairs - 1, loaded just before).

``"slirp guestfwd sockets"``
    The socket list at the head of libslirp's "slirp" section: the byte 42
    and a "slirp-socket" per connected guestfwd rule, then the byte 0.

It also registers the xHCI controller's implementation (its PCI function is
always PCI Express, see :class:`XHCIPciFunction`) and implementations of the
custom predicates of the vmsds the extents load (the virtio device parts and generic virtio state).  While an
extent measures, a predicate that the stream decides (queue pairs, guest
features, queue count) answers from the bytes already read; otherwise it
answers from the object's state ("was this optional field loaded"), or with
QEMU 7.2's default configuration for save-only transport predicates.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vmsd.generated.qemu.v7_2.pci import PCIDevice
from vmsd.generated.qemu.v7_2.slirp import SlirpSocket
from vmsd.generated.qemu.v7_2.virtio import VirtIODevice, VirtIOPCIProxy
from vmsd.generated.qemu.v7_2.virtio_blk import VirtIOBlockDevice, VirtIOBlockReq
from vmsd.generated.qemu.v7_2.virtio_net import VirtIONetDevice
from vmsd.generated.qemu.v7_2.xhci import XHCIPciState
from vmsd.runtime.errors import MalformedStream, RegistryError, VMSDError
from vmsd.runtime.io import Reader
from vmsd.runtime.markers import QEMU_VM_SECTION_FOOTER
from vmsd.runtime.vmstate import fresh, register, register_extent, reporting_checks

__all__ = [
    "VirtioHeader",
    "XHCIController",
    "XHCIPciFunction",
    "lookahead",
    "msix_vectors",
    "pci_capabilities",
    "read_virtio_header",
    "register_virtio_device",
]

PCI_CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_ENTRY_SIZE = 16
VIRTIO_QUEUE_MAX = 1024
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
# struct virtio_net_config: mac[6], status (le16), max_virtqueue_pairs (le16).
VIRTIO_NET_CONFIG_MAX_VQ_PAIRS = 8

# Bytes requested at a time from a stream that is still arriving: enough
# for the common case, small enough not to wait for data far past the field.
_STEP = 4096


# ---- reading ahead -------------------------------------------------------------

class _Lookahead:
    """A byte source serving what follows ``r``'s position, without consuming it."""

    def __init__(self, r: Reader) -> None:
        self._r = r
        self._off = 0

    def readinto(self, buffer: memoryview, /) -> int:
        want = len(buffer) if self._r.remaining() is not None else min(len(buffer), _STEP)
        data = self._r.peek(self._off + want)[self._off :]
        n = len(data)
        buffer[:n] = data
        self._off += n
        return n


def lookahead(r: Reader) -> Reader:
    """A reader over the bytes ahead of ``r``: its ``tell()`` is the count read so far."""
    return Reader(source=_Lookahead(r))


def _ends_field(r: Reader, n: int) -> bool:
    """``n`` bytes ahead is the end of a section's last field: the footer or the end of input."""
    nxt = r.peek(n + 1)[n:]
    return nxt in (b"", bytes([QEMU_VM_SECTION_FOOTER]))


# ---- PCI config space ------------------------------------------------------------

def pci_capabilities(config: bytes) -> dict[int, int]:
    """Capability ID -> offset of the first capability with that ID (standard list)."""
    caps: dict[int, int] = {}
    if len(config) < PCI_CONFIG_SPACE_SIZE or not config[PCI_STATUS] & PCI_STATUS_CAP_LIST:
        return caps
    ptr = config[PCI_CAPABILITY_LIST] & 0xFC
    seen: set[int] = set()
    while ptr and ptr not in seen and ptr + 4 <= PCI_CONFIG_SPACE_SIZE:
        seen.add(ptr)
        caps.setdefault(config[ptr], ptr)
        ptr = config[ptr + 1] & 0xFC
    return caps


def msix_vectors(config: bytes) -> int:
    """The MSI-X table size from the capability's Message Control (0 without MSI-X)."""
    ptr = pci_capabilities(config).get(PCI_CAP_ID_MSIX)
    if ptr is None:
        return 0
    control = int.from_bytes(config[ptr + 2 : ptr + 4], "little")
    return (control & 0x7FF) + 1


# ---- the virtio header -----------------------------------------------------------

@dataclass
class VirtQueueHeader:
    """What virtio_save writes for one queue in use."""

    num: int
    desc: int
    last_avail_idx: int
    vector: int | None


@dataclass
class VirtioHeader:
    """The part of virtio_save's output before the device state, as read."""

    pci_version_id: int
    pci_config: bytes
    pci_irq_state: bytes
    msix_table: bytes
    msix_pba: bytes
    config_vector: int | None
    status: int
    isr: int
    queue_sel: int
    guest_features: int
    config: bytes
    queues: list[VirtQueueHeader] = field(default_factory=list)

    @property
    def msix_present(self) -> bool:
        return msix_vectors(self.pci_config) > 0

    def has_guest_feature(self, bit: int) -> bool:
        """A negotiated feature among the low 32 bits (the only ones in the header)."""
        return bit < 32 and bool(self.guest_features >> bit & 1)


def read_virtio_header(r: Reader) -> VirtioHeader:
    """Read the transport config, device status, config space and queues of virtio_save."""
    # virtio_pci_save_config: pci_device_save (PCIDevice at version 2) ...
    pci_version_id = r.s32()
    config = r.read(PCI_CONFIG_SPACE_SIZE)
    if PCI_CAP_ID_EXP in pci_capabilities(config):
        config += r.read(PCIE_CONFIG_SPACE_SIZE - PCI_CONFIG_SPACE_SIZE)
    irq_state = r.read(16)
    # ... msix_save and the config vector, only with an MSI-X capability.
    n = msix_vectors(config)
    table = r.read(n * PCI_MSIX_ENTRY_SIZE)
    pba = r.read((n + 7) // 8)
    config_vector = r.u16() if n else None
    status, isr = r.u8(), r.u8()
    queue_sel = r.u16()
    guest_features = r.u32()
    config_len = r.u32()
    device_config = r.read(config_len)
    at = r.tell()
    nq = r.u32()
    if nq > VIRTIO_QUEUE_MAX:
        raise MalformedStream(f"virtio: {nq} queues in use, at most {VIRTIO_QUEUE_MAX} exist", offset=at)
    queues = []
    for _ in range(nq):
        num = r.u32()
        desc = r.u64()
        last_avail_idx = r.u16()
        vector = r.u16() if n else None
        queues.append(VirtQueueHeader(num, desc, last_avail_idx, vector))
    return VirtioHeader(
        pci_version_id, config, irq_state, table, pba, config_vector, status, isr, queue_sel,
        guest_features, device_config, queues,
    )


# ---- what the bytes do not say ---------------------------------------------------------

@dataclass(frozen=True)
class _Assumptions:
    header: VirtioHeader
    max_queue_pairs_gt_1: bool = False
    packed: bool = False


_CONTEXT: contextvars.ContextVar[_Assumptions | None] = contextvars.ContextVar("vmsd_virtio_context", default=None)


@contextmanager
def _assuming(a: _Assumptions) -> Iterator[None]:
    token = _CONTEXT.set(a)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _net_max_queue_pairs(h: VirtioHeader) -> int:
    cfg = h.config
    off = VIRTIO_NET_CONFIG_MAX_VQ_PAIRS
    if len(cfg) >= off + 2:
        pairs = int.from_bytes(cfg[off : off + 2], "little")  # virtio_stw_p: little endian on x86
        if pairs:
            return pairs
    # rx/tx per pair, plus the control queue (its presence is not in the header).
    return max(1, len(h.queues) // 2)


def _net_guesses(h: VirtioHeader) -> list[_Assumptions]:
    first = _net_max_queue_pairs(h) > 1
    return [_Assumptions(h, max_queue_pairs_gt_1=first), _Assumptions(h, max_queue_pairs_gt_1=not first)]


def _blk_guesses(h: VirtioHeader) -> list[_Assumptions]:
    return [_Assumptions(h, packed=False), _Assumptions(h, packed=True)]


def _load_net(r: Reader) -> None:
    fresh(VirtIONetDevice)._load_nested(r, VirtIONetDevice.VERSION_ID)


def _load_blk(r: Reader) -> None:
    fresh(VirtIOBlockDevice)._load_nested(r, VirtIOBlockDevice.VERSION_ID)


def _no_guesses(h: VirtioHeader) -> list[_Assumptions]:
    return [_Assumptions(h)]


_Device = tuple[Callable[[VirtioHeader], list[_Assumptions]], Callable[[Reader], None]]

# By the section's vmsd name, and by PCI device ID (transitional and modern).
_DEVICES: dict[str, _Device] = {}
_PCI_DEVICE_IDS: dict[int, str] = {}


def register_virtio_device(
    vmsd_name: str, load_device: Callable[[Reader], None], pci_device_ids: tuple[int, ...] = (),
) -> None:
    """Teach the "virtio" extent the device part of another virtio device.

    ``load_device`` reads what the device's vdc->save and vdc->vmsd write
    (typically by loading a generated class); ``vmsd_name`` is the name of
    the section's vmsd (the object whose "virtio" field is measured) and
    ``pci_device_ids`` the virtio-pci device IDs that identify it otherwise.
    """
    _DEVICES[vmsd_name] = (_no_guesses, load_device)
    for i in pci_device_ids:
        _PCI_DEVICE_IDS[i] = vmsd_name


_DEVICES["virtio-net"] = (_net_guesses, _load_net)
_DEVICES["virtio-blk"] = (_blk_guesses, _load_blk)
_PCI_DEVICE_IDS.update({0x1000: "virtio-net", 0x1041: "virtio-net", 0x1001: "virtio-blk", 0x1042: "virtio-blk"})


def _device_kind(obj: Any, h: VirtioHeader) -> str:
    name = getattr(obj, "VMSD_NAME", None)
    if isinstance(name, str) and name in _DEVICES:
        return name
    device_id = int.from_bytes(h.pci_config[2:4], "little")
    found = _PCI_DEVICE_IDS.get(device_id)
    if found is None:
        raise RegistryError(
            f"virtio: no device state layout known for {name or 'this device'} (PCI device {device_id:#06x}); "
            "see register_virtio_device()"
        )
    return found


def _virtio_extent(r: Reader, obj: Any) -> int:
    start = r.tell()
    try:
        header = read_virtio_header(lookahead(r))
    except VMSDError as e:
        raise MalformedStream(f"virtio header: {e.message}", offset=start + (e.offset or 0)) from None
    guesses, load_device = _DEVICES[_device_kind(obj, header)]
    first: int | None = None
    problems: list[str] = []
    for a in guesses(header):
        sub = lookahead(r)
        try:
            # Measuring only: a value check that fails (max_queue_pairs "equal",
            # which compares with the destination's configuration) is not a
            # reason to reject this reading.
            with _assuming(a), reporting_checks():
                read_virtio_header(sub)
                load_device(sub)
                fresh(VirtIODevice)._load_nested(sub, VirtIODevice.VERSION_ID)
        except VMSDError as e:
            problems.append(f"{e} (at +{sub.tell()})")
            continue
        n = sub.tell()
        if _ends_field(r, n):
            return n
        first = n if first is None else first
    if first is not None:
        return first  # nothing ended at a footer; the first reading that parsed
    raise MalformedStream("virtio: the device state does not parse: " + "; ".join(problems), offset=start)


def _tx_waiting_extent(r: Reader, obj: Any) -> int:
    curr = getattr(obj, "curr_queue_pairs", None) or 0
    return 4 * max(curr - 1, 0)


def _slirp_guestfwd_extent(r: Reader, obj: Any) -> int:
    sub = lookahead(r)
    start = r.tell()
    try:
        while sub.u8():
            # libslirp loads these at the section version; QEMU 7.2 writes 4.
            fresh(SlirpSocket)._load_nested(sub, SlirpSocket.VERSION_ID)
    except VMSDError as e:
        raise MalformedStream(f"slirp guestfwd socket: {e}", offset=start + sub.tell()) from None
    return sub.tell()


register_extent("virtio", _virtio_extent)
register_extent("virtio-net-tx_waiting", _tx_waiting_extent)
register_extent("slirp guestfwd sockets", _slirp_guestfwd_extent)


# ---- custom predicates of the vmsds measured above ---------------------------------------

def _loaded(obj: Any, name: str) -> bool | None:
    """Whether ``obj`` was loaded with subsection ``name`` (None: it was not loaded)."""
    seen: set[str] | None = getattr(obj, "__dict__", {}).get("_vmsd_loaded_subsections")
    return None if seen is None else name in seen


@register
class VirtIODeviceState(VirtIODevice):
    """Generic virtio state: a loaded object re-sends the subsections it had;
    a new one follows QEMU 7.2's defaults for a modern virtio-pci device."""

    def features_64bit_needed(self, version_id: int) -> bool:
        # (host_features >> 32) != 0: VIRTIO_F_VERSION_1 (bit 32) is a host
        # feature of every modern virtio-pci device (disable-modern=off).
        return _loaded(self, "virtio/64bit_features") is not False

    def virtqueues_needed(self, version_id: int) -> bool:
        # Host feature VIRTIO_F_VERSION_1, as above.
        return _loaded(self, "virtio/virtqueues") is not False

    def ringsize_needed(self, version_id: int) -> bool:
        # Some vring.num != vring.num_default (sizes are not in this object).
        return bool(_loaded(self, "virtio/ringsize"))

    def extra_state_needed(self, version_id: int) -> bool:
        # virtio-pci "migrate-extra", on by default.
        return _loaded(self, "virtio/extra_state") is not False

    def packed_virtqueues_needed(self, version_id: int) -> bool:
        # Host feature VIRTIO_F_RING_PACKED ("packed", off by default).
        return bool(_loaded(self, "virtio/packed_virtqueues"))


@register
class VirtIOPCIProxyState(VirtIOPCIProxy):
    def modern_state_needed(self, version_id: int) -> bool:
        # virtio_pci_modern(): "disable-modern" is off by default.
        return _loaded(self, "virtio_pci/modern_state") is not False


@register
class VirtIONetDeviceState(VirtIONetDevice):
    def max_queue_pairs_gt_1(self, version_id: int) -> bool:
        a = _CONTEXT.get()
        return a.max_queue_pairs_gt_1 if a is not None else self.curr_queue_pairs is not None

    def has_ctrl_guest_offloads(self, version_id: int) -> bool:
        a = _CONTEXT.get()
        if a is not None:
            return a.header.has_guest_feature(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        return self.curr_guest_offloads is not None


@register
class VirtIOBlockReqState(VirtIOBlockReq):
    def multiqueue(self, version_id: int) -> bool:
        a = _CONTEXT.get()
        return len(a.header.queues) > 1 if a is not None else self.vq_index is not None

    def packed(self, version_id: int) -> bool:
        a = _CONTEXT.get()
        return a.packed if a is not None else self.ndescs is not None



# ---- xHCI -------------------------------------------------------------------------

class XHCIPciFunction(PCIDevice):
    """The PCI function of an xHCI controller: always PCI Express.

    xhci_instance_init() sets QEMU_PCI_CAP_EXPRESS for every TYPE_XHCI_PCI
    device, so its config space travels as 4096 bytes, but it adds the PCI
    Express capability only on a PCI Express bus: on the pc machine the
    config space has no capability that says so.
    """

    def migrate_is_pcie(self, version_id: int) -> bool:
        return True

    def migrate_is_not_pcie(self, version_id: int) -> bool:
        return False


@register
class XHCIController(XHCIPciState):
    def pre_load(self) -> None:
        if not isinstance(self.parent_obj, XHCIPciFunction):
            self.parent_obj = XHCIPciFunction()
