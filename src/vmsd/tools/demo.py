"""``vmsd demo``: compile the bundled specs, walk through the generated API, live-migrate, round-trip QEMU."""

from __future__ import annotations

import importlib
import inspect
import sys
import tempfile
from pathlib import Path

import attrs

from vmsd.bundled import specs_dir
from vmsd.runtime import VMSDError
from vmsd.runtime.vmdesc import describe, dumps


def run(ram_size: int = 1 << 30, json_lines: bool = False, capabilities: dict[str, bool] | None = None,
        parameters: dict[str, int] | None = None, live_only: bool = False) -> int:
    """Compile and show the API, live-migrate the demo machine, then round-trip a QEMU stream."""
    from vmsd.tools import livedemo

    if not live_only:
        _compile_and_show()
    status = livedemo.run(ram_size, json_lines=json_lines, parameters=parameters, capabilities=capabilities)
    if live_only:
        return status
    return _qemu_round_trip() or status


def _compile_and_show() -> None:
    # Imported here, not at the top: the compiler needs the [compiler] extra
    # (lark, jinja2), and the live part runs on the checked-in generated code
    # without it.  Imported before anything is printed, so that without the
    # extra the CLI's one-line hint is all the user sees.
    from vmsd.codegen.compiler import compile_specs

    root = specs_dir()
    specs = sorted(root.rglob("*.vmsd"))
    print(f"== compiling {len(specs)} bundled specs from {root}")
    with tempfile.TemporaryDirectory() as tmp:
        files = compile_specs(specs, str(root))
        out = Path(tmp) / "demo_generated"
        for rel, text in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)
        (out / "__init__.py").write_text("")
        for rel in sorted(files):
            print(f"   {rel}  ({len(files[rel].splitlines())} lines)")
        sys.path.insert(0, tmp)
        try:
            serial_mod = importlib.import_module("demo_generated.examples.serial")
        finally:
            sys.path.remove(tmp)
        serial_cls = serial_mod.Serial
        print("\n== the generated class for vmsd 'serial' (specs/examples/serial.vmsd)")
        for field in attrs.fields(serial_cls):
            print(f"   {field.name}: {field.type}")
        print("   methods:", ", ".join(n for n, _ in inspect.getmembers(serial_cls, inspect.isfunction) if not n.startswith("_")))
        dev = serial_cls(divider=12, ier=0x0F, lcr=0x03, scr=0x5A, poll_msl=3, modem_status_poll=123456789)
        wire = dev.save()
        print(f"\n== saved at version {serial_cls.VERSION_ID}: {len(wire)} bytes")
        print("   " + wire.hex(" "))
        back = serial_cls.load(wire)
        print(f"   loaded back equal: {back == dev}")
        old = dev.save(version_id=2)
        print(f"   saved at version 2 (no fcr_vmstate): {len(old)} bytes -> fcr_vmstate={serial_cls.load(old, 2).fcr_vmstate}")
        body, size = describe(dev)
        print(f"\n== QEMU trailer description ({size} bytes described)")
        print("   " + dumps(body)[:400] + " ...")
        print("\n== hostile input is one clear error, never a traceback")
        for bad in (wire[:5], wire[:11] + b"\x05\x0bserial/nope\x00\x00\x00\x01", wire + b"\xff"):
            try:
                serial_cls.load(bad)
            except VMSDError as e:
                print(f"   {type(e).__name__}: {e}")


def _qemu_round_trip() -> int:
    """Save a real QEMU 7.2 machine, decode it typed, edit it, and have QEMU load the edit."""
    import shutil

    from vmsd.migration.stream import read_stream, write_stream
    from vmsd.qemu.versions import choose, spec_set
    from vmsd.testing.qmp import QEMU_BINARY, load_stream, save_stream
    from vmsd.tools.streams import apply_set

    print("\n== a real QEMU 7.2 migration stream")
    if shutil.which(QEMU_BINARY) is None:
        print(f"   {QEMU_BINARY} is not installed (apt-get install qemu-system-x86; scripts/setup.sh in a checkout): "
              "skipping this part")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "pc.mig"
        save_stream(saved, args=["-device", "isa-serial"], run_seconds=0.5)
        data = saved.read_bytes()
        chosen = choose(data)
        print(f"   spec set: QEMU {chosen.version} (from {chosen.reason})")
        stream = read_stream(data, spec_set(chosen.version))
        full = stream.full_sections()
        typed = [s for s in full if s.generic_body is None]
        print(f"   {len(data)} bytes, {len(stream.records)} records, {len(typed)}/{len(full)} device sections decoded by typed specs")
        rtc = next(s for s in full if s.idstr == "mc146818rtc")
        print(f"   mc146818rtc: {type(rtc.payload).__name__}, CMOS[0x0e] = {rtc.payload.cmos_data[14]:#04x}")
        same = write_stream(stream) == data
        print(f"   re-encoded with a trailer regenerated from the specs: byte-identical = {same}")
        apply_set(stream, "mc146818rtc.cmos_data[14]=0x55")
        edited = Path(tmp) / "edited.mig"
        edited.write_bytes(write_stream(stream))
        back = Path(tmp) / "back.mig"
        q = load_stream(edited, args=["-device", "isa-serial"])
        try:
            q.migrate_to_file(back)
        finally:
            q.stop()
        rtc_back = next(s for s in read_stream(back.read_bytes(), spec_set(chosen.version)).full_sections()
                        if s.idstr == "mc146818rtc")
        print(f"   edited CMOS[0x0e] to 0x55, QEMU loaded it and saved it back as {rtc_back.payload.cmos_data[14]:#04x}")
        return 0 if same and rtc_back.payload.cmos_data[14] == 0x55 else 1
