"""Property tests over every shipped spec: round trips, the trailer description, and hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from generated_classes import all_classes
from strategies import configuration_of, instances
from vmsd.runtime import SaveError, VMSDError, VMStateObject
from vmsd.runtime.generic import decode_body, encode_body
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.vmdesc import describe, dumps, loads
from vmsd.runtime.vmstate import device_configuration, impl

CLASSES = all_classes()
IDS = [c.__name__ for c in CLASSES]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large],
)


def test_every_shipped_spec_has_classes() -> None:
    assert len(CLASSES) >= 7


def _save(obj: object) -> bytes:
    try:
        return obj.save()  # type: ignore[attr-defined, no-any-return]
    except SaveError as e:
        # Drawn states that a spec's validate rejects are not valid inputs.
        assume("validation" not in str(e))
        raise


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_load_save_round_trip(cls: type, data: st.DataObject) -> None:
    """``load(save(x)) == x`` and ``save(load(b)) == b``.

    As in QEMU, a subsection that is not sent leaves its fields at the
    destination's defaults, which may differ from the source's values (QEMU
    devices reset them in pre_load).  So a drawn object is first put through
    one save/load to be canonical; from there both identities must hold.
    Classes without conditional parts must also round-trip the drawn object
    itself.
    """
    drawn = data.draw(instances(cls))
    configuration = configuration_of(drawn)
    assume(configuration is not None)
    assert configuration is not None
    with device_configuration(configuration):
        x = cls.load(_save(drawn))  # type: ignore[attr-defined]
        assert type(x) is impl(cls)
        b = x.save()
        assert cls.load(b) == x, "load(save(x)) == x"  # type: ignore[attr-defined]
        assert cls.load(b).save() == b, "save(load(b)) == b"  # type: ignore[attr-defined]
    if not _lossy(cls):
        assert x == drawn


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_fresh_load_equals_load_into_defaults(cls: type, data: st.DataObject) -> None:
    """``load`` starts from a bare instance (no defaults for fields the loader
    always assigns, subsection defaults built only when absent); the result
    must equal loading into a fully defaulted object, and every attribute set."""
    drawn = data.draw(instances(cls))
    configuration = configuration_of(drawn)
    assume(configuration is not None)
    assert configuration is not None
    wire = _save(drawn)
    with device_configuration(configuration):
        quick = cls.load(wire)  # type: ignore[attr-defined]
        full = impl(cls)()
        full.load_into(wire)
    assert quick == full
    assert repr(quick) == repr(full)  # repr reads every attribute, at every depth


def _lossy(cls: type, seen: frozenset[type] = frozenset()) -> bool:
    """Whether a save may drop state: subsections, conditional fields or load hooks, at any depth."""
    if cls in seen:
        return False
    spec = cls.VMSD  # type: ignore[attr-defined]
    hooked = any(getattr(impl(cls), h) is not getattr(VMStateObject, h) for h in ("pre_load", "post_load"))
    if spec.subsections or hooked or any(f.test or f.since for f in spec.fields):
        return True
    return any(_lossy(f.struct, seen | {cls}) for f in spec.fields if f.struct is not None)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_trailer_description_matches_bytes(cls: type, data: st.DataObject) -> None:
    """The generated description drives the interpretive decoder over the same bytes."""
    x = data.draw(instances(cls))
    b = _save(x)
    body, size = describe(x)
    assert size == len(b)
    body = loads(dumps(body))
    r = Reader(b)
    values = decode_body(r, body)
    assert r.tell() == len(b)
    w = Writer()
    encode_body(w, body, values)
    assert w.getvalue() == b


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=300))
def test_random_bytes_raise_only_our_errors(cls: type, blob: bytes) -> None:
    try:
        cls.load(blob)  # type: ignore[attr-defined]
    except VMSDError:
        pass


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.large_base_example, HealthCheck.data_too_large, HealthCheck.too_slow])
@given(data=st.data())
def test_truncated_input_raises_only_our_errors(cls: type, data: st.DataObject) -> None:
    b = _save(data.draw(instances(cls)))
    # Every cut for small states; for large ones (cpu: kilobytes) a drawn sample.
    cuts = range(len(b)) if len(b) <= 256 else sorted(data.draw(st.sets(st.integers(0, len(b) - 1), max_size=64)))
    for cut in cuts:
        try:
            cls.load(b[:cut])  # type: ignore[attr-defined]
        except VMSDError as e:
            assert e.offset is None or e.offset <= cut
