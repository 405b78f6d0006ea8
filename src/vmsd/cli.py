"""Command line: `vmsd COMMAND ...`, one function per command; every error is one line (exit 1, usage 2)."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmsd.migration.profile import NEWEST, PROFILES, peer_profile
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.outfile import OutputExists
from vmsd.tools.errors import ToolError, UsageError

if TYPE_CHECKING:
    from vmsd.migration.incoming import IncomingResult

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
# A shell's status for a process ended by SIGINT / SIGTERM (128 + the signal's number).
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
# What `pip install 'vmsd[compiler]'` adds.  Without them the runtime, the
# stream tools and the live demo work; anything that parses or compiles specs
# stops with one line naming the extra (see main).
COMPILER_MODULES = frozenset({"lark", "jinja2"})


def _repo_root() -> Path | None:
    """The vmsd source checkout we run in, if any (for bare ``vmsd compile``)."""
    for d in [Path.cwd(), *Path.cwd().parents]:
        if (d / "specs").is_dir() and (d / "src" / "vmsd" / "generated").is_dir():
            return d
    return None


def _cmd_compile(args: argparse.Namespace) -> int:
    from vmsd.codegen.compiler import compile_specs
    from vmsd.codegen.package import ensure_marker, marker_path
    from vmsd.runtime.outfile import write_file

    packages = None
    if args.specs:
        from vmsd.bundled import specs_dir

        specs = [_readable(s, regular=True) for s in args.specs]
        out_dir = Path(args.output or ".")
        root = None
        packages = {specs_dir(): "vmsd.generated"}  # shipped specs they import are vmsd's own classes
    else:
        repo = _repo_root()
        if repo is None:
            return _outside_repo("compile")
        specs = sorted((repo / "specs").rglob("*.vmsd"))
        out_dir = Path(args.output) if args.output else repo / "src" / "vmsd" / "generated"
        root = str(repo / "specs")
    files = compile_specs(specs, root, packages, outside_imports=args.allow_outside_imports)
    stale = []
    for rel, text in sorted(files.items()):
        target = out_dir / rel
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(target)
        if not args.check:
            # Generated modules are regenerated, never edited: replacing them is what compile is for.
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, text, force=True)
    # Output inside a package makes it typed for consumers: the marker goes to its top-level package (PEP 561).
    if args.check:
        for target in stale:
            print(f"stale: {target}")
        marker = marker_path(out_dir)
        missing = marker is not None and not marker.exists()
        if missing:
            print(f"missing: {marker}")
        return EXIT_FINDINGS if stale or missing else EXIT_OK
    print(f"wrote {len(stale)} of {len(files)} files under {out_dir}")
    written = ensure_marker(out_dir)
    if written is not None:
        print(f"wrote {written}")
    return EXIT_OK


def _outside_repo(command: str) -> int:
    """Refuse a bare ``vmsd compile`` / ``vmsd fmt`` outside the vmsd repository."""
    from vmsd.bundled import specs_dir

    print(f"vmsd {command}: no SPEC given and not inside the vmsd repository (the bundled specs are under "
          f"{specs_dir()})", file=sys.stderr)
    return EXIT_USAGE


def _cmd_fmt(args: argparse.Namespace) -> int:
    from vmsd.grammar.diagnostics import Diagnostic, SpecError
    from vmsd.grammar.formatter import format_source
    from vmsd.grammar.loader import display_path, read_spec
    from vmsd.runtime.outfile import write_file

    repo = _repo_root()
    if args.specs:
        specs = [_readable(s, regular=True) for s in args.specs]
    elif repo is None:
        return _outside_repo("fmt")
    else:
        specs = sorted((repo / "specs").rglob("*.vmsd"))
    diagnostics: list[Diagnostic] = []
    sources: dict[str, str] = {}
    changed = 0
    for path in specs:
        try:
            source = read_spec(path, display_path(path))
            text = format_source(source, display_path(path))
        except SpecError as exc:  # the others are still formatted; the errors come together at the end
            diagnostics.extend(exc.diagnostics)
            sources.update(exc.sources)
            continue
        if text == source:
            continue
        changed += 1
        if args.check:
            print(f"would reformat: {path}")
        else:
            write_file(path, text, force=True)  # the spec is ours to rewrite: replacing it is what fmt is for
            print(f"reformatted: {path}")
    if diagnostics:
        raise SpecError(diagnostics, sources)
    return EXIT_FINDINGS if args.check and changed else EXIT_OK


def _cmd_new(args: argparse.Namespace) -> int:
    from vmsd.tools.scaffold import new_package

    folder = Path(args.path)
    try:
        written = new_package(folder, args.name)
    except ToolError as exc:  # a name or folder to choose again: usage, not a finding
        print(f"vmsd new: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"created a device package in {folder}:")
    for rel in written:
        print(f"  {rel}")
    print(f"next: cd {folder} && pip install '.[dev]' && sh ci/check.sh")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from vmsd.bundled import specs_dir
    from vmsd.grammar.loader import load
    from vmsd.grammar.semantic import check

    # Specs may import the ones vmsd ships (import-qemu writes such imports).
    check(load([_readable(s, regular=True) for s in args.specs], outside_imports=args.allow_outside_imports,
               also=[specs_dir()]))
    print(f"{len(args.specs)} spec(s) ok")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vmsd.migration.stream import read_partial
    from vmsd.tools import streams

    data = streams.read_input(args.stream)
    specs = streams.load_specs(args.specs, streams.shipped_specs(args.qemu, data))
    streams.load_hooks(args.hooks)
    # A damaged stream still shows what came before the damage (the error last): what a person debugging
    # a failed migration needs first.
    stream, error = read_partial(data, specs)
    if args.json:
        # One compact document: json's C encoder only serves the unindented
        # form, several times faster on a stream's megabytes of device state.
        streams.write_json(stream, sys.stdout, error)
        sys.stdout.write("\n")
    else:
        for line in streams.tree_lines(stream, error):
            print(line)
    sys.stdout.flush()
    if error is not None:
        raise error
    if args.strict:
        streams.refuse_unless_strict(stream)
    return EXIT_OK


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from vmsd.runtime.outfile import OutputFile
    from vmsd.tools import streams

    for assignment in args.set or []:  # before the stream is read: a typo costs no decoding
        if "=" not in assignment:
            raise UsageError(f"--set needs SECTION.FIELD=VALUE, got {assignment!r}")
    # The output is checked before the work; a stream holds guest RAM (0600).
    with OutputFile(args.output, force=args.force, private=True, stdout=True) as out:
        data = streams.read_input(args.stream)
        specs = streams.load_specs(args.specs, streams.shipped_specs(args.qemu, data))
        streams.load_hooks(args.hooks)
        data = streams.rewrite(data, specs, args.set or [], strict=args.strict)
        try:
            out.file.write(data)
        except OSError as e:
            raise ToolError(f"cannot write {args.output}: {e.strerror}") from None
        out.commit()
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from vmsd.migration.stream import read_stream
    from vmsd.tools import streams
    from vmsd.tools.streamdiff import diff_streams

    data_a, data_b = streams.read_input(args.a), streams.read_input(args.b)
    # Each stream with the spec set of the QEMU that wrote it, unless --qemu names one.
    specs_a = streams.load_specs(args.specs, streams.shipped_specs(args.qemu, data_a))
    specs_b = streams.load_specs(args.specs, streams.shipped_specs(args.qemu, data_b))
    streams.load_hooks(args.hooks)
    a, b = read_stream(data_a, specs_a), read_stream(data_b, specs_b)
    lines = diff_streams(data_a, a, data_b, b)
    for line in lines:
        print(line)
    return EXIT_FINDINGS if lines else EXIT_OK


def _cmd_compat(args: argparse.Namespace) -> int:
    from vmsd.tools.compat import compat
    from vmsd.tools.compat.report import json_text, text_lines, verdict

    for side in (args.source, args.dest):
        if not side.startswith("qemu:") and not os.path.isdir(side):
            _readable(side)
    if args.source_dump is not None:
        _readable(args.source_dump)
    findings = compat(args.source, args.dest, args.machine, args.source_dump)
    if args.json:
        print(json_text(args.source, args.dest, findings))
    else:
        for line in text_lines(args.source, args.dest, findings):
            print(line)
    return EXIT_FINDINGS if verdict(findings) == "incompatible" else EXIT_OK


def _cmd_import_qemu(args: argparse.Namespace) -> int:
    from vmsd.tools.importer import import_qemu

    for path in import_qemu(_readable(args.dump), _readable(args.stream) if args.stream else None, Path(args.output),
                            force=args.force):
        print(path)
    return EXIT_OK


def _readable(path: str, regular: bool = False) -> Path:
    """An input file named on the command line: one that is absent or unreadable is a usage error, not a
    finding.  Only looked at, never opened (a FIFO would block); ``regular``: specs must be regular files."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot read {path}: it is a folder")
    if regular and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"cannot read {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {path}: permission denied")
    return Path(path)


def _migration_options(args: argparse.Namespace) -> dict[str, str]:
    """QEMU-named capabilities and parameters (``xbzrle=on``, ``max-bandwidth=...``)."""
    out: dict[str, str] = {}
    for item in [*(args.capability or []), *(args.parameter or [])]:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"expected NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _cmd_incoming(args: argparse.Namespace) -> int:
    from vmsd.tools import snapshot, streams

    _migration_options(args)  # the receiver decodes whatever the peer chose; names are checked
    _uri(args.uri)
    caps, _ = _settings(args)
    multifd = _multifd(args, caps)
    mode, cpr_channel = _cpr_options(args)
    max_ram = _size(args.max_ram, "--max-ram") if args.max_ram is not None else None
    # A live stream cannot be looked at first: the specs are those of --qemu, else of the peer.
    from vmsd.qemu.versions import nearest

    shipped = streams.shipped_specs(args.qemu or nearest(args.peer_version))
    tls = _tls(args)
    specs = streams.load_specs(args.specs, shipped)
    streams.load_hooks(args.hooks)
    result = snapshot.incoming(args.uri, args.output, specs, args.timeout,
                               multifd=multifd, force=args.force, mode=mode, cpr_channel=cpr_channel,
                               max_ram=max_ram, tls=tls)
    _check_spec_set(result, args.qemu or nearest(args.peer_version), "--qemu" if args.qemu else "--peer-version")
    ram = result.counters
    print(f"received {ram['normal']} normal and {ram['duplicate']} zero pages, {len(result.sections)} device "
          f"sections in {result.seconds:.2f}s; snapshot written to {args.output}",
          file=sys.stderr if args.output == "-" else sys.stdout)
    return EXIT_OK


def _check_spec_set(result: IncomingResult, used: str, option: str) -> None:
    """Warn when the trailer that arrived after EOF shows that another QEMU version's specs fit the stream:
    a live stream is decoded before it can be looked at, with the set the options name."""
    from vmsd.qemu.versions import choose_by

    if result.trailer is None:
        return
    conf = result.configuration
    fits = choose_by(bytes(conf.state.name) if conf is not None else None, result.trailer)
    if fits.version != used:
        print(f"vmsd incoming: warning: the stream fits QEMU {fits.version}'s specs ({fits.reason}), but its device "
              f"sections were decoded with QEMU {used}'s ({option}); the snapshot describes them as QEMU {used} "
              f"does. Pass --peer-version {fits.version} to keep the source's layouts.", file=sys.stderr)


def _cmd_outgoing(args: argparse.Namespace) -> int:
    from vmsd.tools import snapshot, streams
    from vmsd.tools.progress import Progress, summary

    _migration_options(args)
    _readable(args.snapshot)
    _refuse_existing_file_uri(args.uri, args.force)
    caps, params = _settings(args)
    multifd = _multifd(args, caps)
    params.setdefault("max-bandwidth", 0)  # a snapshot does not change: no reason to hold it back
    try:
        from vmsd.migration.precopy import parse_settings

        peer = peer_profile(args.peer_version)
        parse_settings(caps, params, peer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    mode, cpr_channel = _cpr_options(args)
    tls = _tls(args)
    specs = streams.load_specs(args.specs, snapshot.snapshot_specs(Path(args.snapshot), args.qemu))
    streams.load_hooks(args.hooks)
    info = snapshot.outgoing(Path(args.snapshot), args.uri, specs, args.timeout,
                             caps, params, on_progress=Progress(json_lines=args.json), multifd=multifd, peer=peer,
                             mode=mode, cpr_channel=cpr_channel, tls=tls)
    if not args.json:
        print(summary(info))
    if info["status"] != "completed":
        raise ToolError(f"migration {info['status']}: {info.get('error-desc', '')}")
    return EXIT_OK


def _tls(args: argparse.Namespace) -> Any:
    """``--tls-creds DIR`` (and ``--tls-hostname NAME``) as a TlsConfig, or None."""
    from vmsd.migration.transport import TlsConfig

    hostname = getattr(args, "tls_hostname", None)
    if args.tls_creds is None:
        if hostname is not None:
            raise UsageError("--tls-hostname needs --tls-creds")
        return None
    return TlsConfig(Path(args.tls_creds), hostname)


def _cpr_options(args: argparse.Namespace) -> tuple[str, str | None]:
    """``--mode`` and ``--cpr-channel``: cpr-transfer needs a unix: cpr channel, no other mode takes one."""
    if args.mode == "cpr-transfer" and not (args.cpr_channel or "").startswith("unix:"):
        raise UsageError("--mode cpr-transfer needs --cpr-channel unix:PATH")
    if args.mode != "cpr-transfer" and args.cpr_channel is not None:
        raise UsageError("--cpr-channel is only for --mode cpr-transfer")
    return args.mode, args.cpr_channel


def _refuse_existing_file_uri(uri: str, force: bool) -> None:
    """A ``file:`` URI naming an existing file replaces it (QEMU's way) only with ``--force``.

    With an offset the file is meant to be written into (its first bytes are kept), and a FIFO or device
    is written in place: neither is an output about to be lost.
    """
    from vmsd.migration.transport import FileURI

    target = _uri(uri)
    if not force and isinstance(target, FileURI) and not target.offset and os.path.isfile(target.path):
        raise OutputExists(f"{target.path} exists")


def _uri(text: str) -> Any:
    """A migration URI given on the command line; a malformed one is a usage error."""
    from vmsd.migration.transport import parse_uri

    try:
        return parse_uri(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_relay(args: argparse.Namespace) -> int:
    from vmsd.tools import cpr, streams

    _uri(args.from_uri)
    _uri(args.to_uri)
    try:
        peer = peer_profile(args.peer_version)
    except ValueError as e:
        raise ToolError(str(e)) from None
    # The old QEMU's stream arrives live, as for incoming: the spec set of the newest version not newer than
    # the new QEMU's.
    from vmsd.qemu.versions import nearest

    specs = streams.load_specs(args.specs, streams.shipped_specs(nearest(args.peer_version)))
    report = cpr.relay_cpr_transfer(args.from_cpr, args.from_uri, args.to_cpr, args.to_uri,
                                    specs, args.set or [], peer, args.timeout,
                                    log=lambda line: print(f"vmsd relay: {line}", file=sys.stderr))
    print(f"passed {len(report.descriptors)} descriptors and {report.sections} device sections "
          f"({report.stream_bytes} bytes{', edited' if report.edited else ''}) to the new QEMU")
    return EXIT_OK


def _cmd_cpr_exec_wrap(args: argparse.Namespace) -> int:
    from vmsd.tools import cpr, streams

    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UsageError("give the QEMU command line after --")
    try:
        from vmsd.qemu.versions import nearest

        # cpr-exec came in QEMU 10.2: the newest spec set not newer than the newest peer.
        specs = streams.load_specs(args.specs, streams.shipped_specs(nearest(NEWEST.version)))
    except Exception as e:  # QEMU must start even when the specs cannot be loaded
        print(f"vmsd cpr-exec-wrap: cannot load the specs ({e}); starting QEMU unchanged", file=sys.stderr)
        specs = None
    cpr.cpr_exec_wrap(argv, specs, args.set or [] if specs is not None else [])
    return 127  # only reached when QEMU could not be exec'd (cpr_exec_wrap said why)


_MULTIFD_PARAMETERS = ("multifd-channels", "multifd-compression", "multifd-zlib-level", "multifd-zstd-level",
                       "zero-page-detection")


def _settings(args: argparse.Namespace) -> tuple[dict[str, bool], dict[str, int]]:
    """``--capability NAME=on|off`` and ``--parameter NAME=INT[K|M|G]`` as QEMU names them (multifd's apart)."""
    caps: dict[str, bool] = {}
    for item in args.capability or []:
        name, _, value = item.partition("=")
        if value not in ("on", "off"):
            raise UsageError(f"capability {name!r}: expected on or off, got {value!r}")
        caps[name] = value == "on"
    params: dict[str, int] = {}
    for item in args.parameter or []:
        name, _, value = item.partition("=")
        if name in ("tls-creds", "tls-hostname", "tls-authz"):
            raise UsageError(f"parameter {name!r}: TLS is set with --tls-creds DIR (and --tls-hostname NAME)")
        if name not in _MULTIFD_PARAMETERS:
            params[name] = _size(value, f"parameter {name!r}")
    return caps, params


def _multifd(args: argparse.Namespace, caps: dict[str, bool]) -> Any:
    """The multifd configuration when ``--capability multifd=on`` (``--peer-version``, ``--uuid``)."""
    from vmsd.migration.multifd import config_from

    raw = {name: value for name, _, value in (item.partition("=") for item in args.parameter or [])
           if name in _MULTIFD_PARAMETERS}
    if not caps.pop("multifd", False):
        if raw:
            raise UsageError(f"parameter {next(iter(raw))!r} needs --capability multifd=on")
        return None
    try:
        import uuid

        uid = uuid.UUID(args.uuid).bytes if getattr(args, "uuid", None) else bytes(16)
        return config_from(raw, args.peer_version, uid)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type: a bad one is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _size(text: str, what: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise UsageError(f"{what}: expected a number with an optional K/M/G/T suffix, got {text!r}")
    return int(digits) * scale


def _cmd_demo(args: argparse.Namespace) -> int:
    from vmsd.tools.demo import run

    _migration_options(args)
    caps, params = _settings(args)
    return run(ram_size=_size(args.ram, "--ram"), json_lines=args.json, capabilities=caps, parameters=params,
               live_only=args.live_only)


_OUTSIDE_HELP = "let an import name a file outside the folders of the SPECs and of the specs vmsd ships (by default refused)"
_SPECS_HELP = ("also use the .vmsd files under DIR for the sections they describe (they take precedence over the "
               "shipped specs)")
_CAPABILITY_HELP = "a QEMU migration capability, e.g. xbzrle=on or multifd=on (repeatable)"
_PARAMETER_HELP = ("a QEMU migration parameter, e.g. max-bandwidth=100M or multifd-channels=4 "
                   "(K/M/G/T suffixes; repeatable)")


def _qemu_option(p: argparse.ArgumentParser, default: str = "the one that wrote the stream") -> None:
    from vmsd.qemu.versions import SPEC_SETS

    p.add_argument("--qemu", metavar="VERSION", choices=list(SPEC_SETS),
                   help=f"decode with the spec set of this QEMU version ({', '.join(SPEC_SETS)}; default: {default})")


_STRICT_HELP = ("exit 1 when a section is not decoded by its typed spec or QEMU's loader of this spec set would "
                "refuse the stream (versions, unknown subsections, failed checks; see docs/stream-errors.md)")


def _hooks_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hooks", action="append", metavar="MODULE",
                   help="import this Python module first (a dotted name, or a .py file): it registers the "
                        "implementations of custom predicates and hooks of the specs (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmsd", description="Typed QEMU VMState descriptions and migration streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="generate Python modules from .vmsd specs")
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="spec files to compile, with the files they import (default, inside the vmsd repository: "
                        "every spec under specs/)")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (default: current directory, or vmsd.generated in the repository)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 and name the files that would change (and a missing py.typed)")
    p.add_argument("--allow-outside-imports", action="store_true", help=_OUTSIDE_HELP)
    p.set_defaults(func=_cmd_compile)
    p = sub.add_parser("new", help="start a device package: specs, build hook, generated state, test, CI script")
    p.add_argument("path", metavar="PATH", help="folder to create (it must not exist or be empty)")
    p.add_argument("--name", help="Python package name (default: the folder's name, '-' as '_')")
    p.set_defaults(func=_cmd_new)
    p = sub.add_parser("check", help="parse and check specs without generating code")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec files to check, with the files they import")
    p.add_argument("--allow-outside-imports", action="store_true", help=_OUTSIDE_HELP)
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("fmt", help="lay out .vmsd specs canonically (docs/spec-format.md), comments kept")
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="spec files to rewrite in place (default, inside the vmsd repository: every spec under specs/)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 and name the files that would change")
    p.set_defaults(func=_cmd_fmt)
    p = sub.add_parser("inspect", help="decode a QEMU migration stream into a tree or JSON")
    p.add_argument("stream", metavar="STREAM", help="stream file, or - for standard input")
    p.add_argument("--json", action="store_true", help="JSON instead of a tree")
    p.add_argument("--specs", type=Path, metavar="DIR", help=_SPECS_HELP)
    _hooks_option(p)
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    _qemu_option(p)
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("rewrite", help="decode every section and encode it again, optionally editing fields")
    p.add_argument("stream", metavar="STREAM", help="stream file, or - for standard input")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the new stream (0600), or - for standard output")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--specs", type=Path, metavar="DIR", help=_SPECS_HELP)
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="change one field before encoding, e.g. mc146818rtc.cmos_data[14]=0x55 (repeatable; "
                        "applied in order)")
    _hooks_option(p)
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP + "; nothing is written then")
    _qemu_option(p)
    p.set_defaults(func=_cmd_rewrite)
    p = sub.add_parser("diff", help="field-level differences between two streams (exit 1 when they differ)")
    p.add_argument("a", metavar="A", help="the first stream file (the left side of each difference), or -")
    p.add_argument("b", metavar="B", help="the second stream file")
    p.add_argument("--specs", type=Path, metavar="DIR", help=_SPECS_HELP)
    _hooks_option(p)
    _qemu_option(p)
    p.set_defaults(func=_cmd_diff)
    for name, helptext in (
        ("incoming", "receive a live migration from QEMU (URI as in -incoming) and write a snapshot QEMU loads"),
        ("outgoing", "migrate a snapshot to a QEMU started with -incoming (the vmsd precopy engine)"),
    ):
        p = sub.add_parser(name, help=helptext)
        _hooks_option(p)
        if name == "incoming":
            p.add_argument("uri", metavar="URI", help="where to listen: tcp:HOST:PORT, unix:PATH, fd:N, exec:COMMAND "
                                                      "(run by the shell) or file:PATH")
            p.add_argument("-o", "--output", required=True, metavar="SNAPSHOT",
                           help="the snapshot (0600), or - for standard output")
            p.add_argument("--force", action="store_true", help="replace SNAPSHOT if it exists")
            p.add_argument("--specs", type=Path, metavar="DIR", help=_SPECS_HELP)
            p.add_argument("--max-ram", metavar="SIZE", help="refuse a peer announcing more RAM than this "
                                                             "(K/M/G/T suffix; default: this host's memory)")
            p.set_defaults(func=_cmd_incoming)
        else:
            p.add_argument("snapshot", metavar="SNAPSHOT", help="a migration stream file (from vmsd incoming, "
                                                                "rewrite or QEMU's migrate to file:)")
            p.add_argument("uri", metavar="URI", help="where to send it: tcp:HOST:PORT, unix:PATH, fd:N, "
                                                      "exec:COMMAND (run by the shell) or file:PATH")
            p.add_argument("--specs", type=Path, metavar="DIR", help=_SPECS_HELP)
            p.add_argument("--json", action="store_true", help="progress as JSON lines (query-migrate objects)")
            p.add_argument("--force", action="store_true", help="replace the file a file: URI names if it exists")
            p.add_argument("--tls-hostname", metavar="NAME",
                           help="the name the destination's certificate must carry (default: the host of a tcp: URI)")
            p.set_defaults(func=_cmd_outgoing)
        p.add_argument("--capability", action="append", metavar="NAME=on|off", help=_CAPABILITY_HELP)
        p.add_argument("--parameter", action="append", metavar="NAME=VALUE", help=_PARAMETER_HELP)
        p.add_argument("--tls-creds", metavar="DIR",
                       help="TLS on every channel, with the certificates in DIR as QEMU's tls-creds-x509 names them "
                            "(ca-cert.pem, " + ("server-cert.pem, server-key.pem" if name == "incoming" else
                                                "client-cert.pem, client-key.pem") + "; see docs/tls.md)")
        p.add_argument("--timeout", type=_seconds, default=60.0,
                       help="seconds to wait for the peer: to connect, and whenever nothing moves on a connection "
                            "(a cut link, a stalled peer; default 60)")
        p.add_argument("--peer-version", choices=list(PROFILES), default=NEWEST.version,
                       help="the QEMU version on the other end: its multifd layout and parameter defaults "
                            "(QEMU does not negotiate them)")
        p.add_argument("--uuid", help="the UUID in every multifd channel's first packet (a QEMU destination "
                                      "checks it against its -uuid; default all zeros)")
        modes = ("normal", "cpr-reboot", "cpr-transfer", *(("cpr-exec",) if name == "incoming" else ()))
        p.add_argument("--mode", choices=modes, default="normal",
                       help="QEMU's migration mode; cpr-transfer hands guest RAM over as memfds on --cpr-channel "
                            "instead of copying it"
                            + ("; cpr-exec: vmsd is the program a QEMU exec'd (its cpr-exec-command) and takes "
                               "over its RAM" if name == "incoming" else "") + " (see docs/cpr.md)")
        p.add_argument("--cpr-channel", metavar="unix:PATH",
                       help="cpr-transfer: the unix socket of the CPR state (QEMU's 'cpr' channel); "
                            + ("vmsd listens on it" if name == "incoming" else "the new QEMU listens on it"))
        _qemu_option(p, "incoming: --peer-version's" if name == "incoming" else "the one that wrote the snapshot")
    p = sub.add_parser("relay", help="stand between an old and a new QEMU during a CPR upgrade: pass the RAM "
                                     "descriptors on, decode (and with --set edit) the device state")
    p.add_argument("--mode", choices=("cpr-transfer",), required=True, help="the old QEMU's migration mode")
    p.add_argument("--from-cpr", required=True, metavar="unix:PATH",
                   help="where the old QEMU sends its CPR state (its cpr channel; vmsd listens)")
    p.add_argument("--from", dest="from_uri", required=True, metavar="URI",
                   help="where the old QEMU sends its main stream (its main channel; vmsd listens)")
    p.add_argument("--to-cpr", required=True, metavar="unix:PATH", help="the new QEMU's cpr channel")
    p.add_argument("--to", dest="to_uri", required=True, metavar="URI", help="the new QEMU's -incoming")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="edit the device state on the way (repeatable)")
    p.add_argument("--specs", type=Path, metavar="DIR", help="extra .vmsd specs, overriding the shipped ones")
    p.add_argument("--peer-version", choices=list(PROFILES), default=NEWEST.version,
                   help="the new QEMU's version: the layout of the CPR state it reads")
    p.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to wait for either QEMU (default 60)")
    p.set_defaults(func=_cmd_relay)
    p = sub.add_parser("cpr-exec-wrap", help="use as QEMU's cpr-exec-command: report (and with --set edit) what "
                                             "the old QEMU left, then exec the new QEMU")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="edit the main stream in the new QEMU's -incoming file: (repeatable)")
    p.add_argument("--specs", type=Path, metavar="DIR", help="extra .vmsd specs, overriding the shipped ones")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- QEMU ARGS",
                   help="the new QEMU's command line")
    p.set_defaults(func=_cmd_cpr_exec_wrap)
    p = sub.add_parser("compat", help="can a QEMU described by DEST load what SOURCE saves? (exit 1 when it would "
                                      "fail; docs/compat.md)")
    p.add_argument("source", metavar="SOURCE",
                   help="what saves: qemu:VERSION (a shipped spec set), a folder of .vmsd specs, a QEMU "
                        "-dump-vmstate JSON file, or a migration stream file")
    p.add_argument("dest", metavar="DEST",
                   help="what loads: qemu:VERSION, a folder of .vmsd specs, or a -dump-vmstate JSON file")
    p.add_argument("--machine", metavar="TYPE",
                   help="the machine type the migration uses (e.g. pc-i440fx-7.2; a stream names its own): "
                        "DEST's QEMU must know it, and it decides whether QEMU 10.0+ sends SWITCHOVER_START")
    p.add_argument("--source-dump", metavar="FILE",
                   help="with a stream SOURCE: the -dump-vmstate file of the QEMU that saved it (same machine "
                        "type), so that the fields it left out are known and DEST's own tests are told from them")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: source, dest, verdict and findings (category, section, field, message)")
    p.set_defaults(func=_cmd_compat)
    p = sub.add_parser("import-qemu", help="skeleton specs from QEMU's -dump-vmstate output (types from a stream's trailer)")
    p.add_argument("dump", metavar="DUMP.json", help="what qemu-system-ARCH -M MACHINE -dump-vmstate DUMP.json writes")
    p.add_argument("--stream", metavar="FILE", help="a migration stream whose trailer gives the field types")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the .vmsd files (created)")
    p.add_argument("--force", action="store_true", help="replace .vmsd files of the same names in DIR")
    p.set_defaults(func=_cmd_import_qemu)
    p = sub.add_parser("demo", help="compile the bundled specs, live-migrate a Python machine to another process, "
                                    "and round-trip a real QEMU stream")
    p.add_argument("--ram", default="1G", help="guest RAM of the demo machine (default 1G)")
    p.add_argument("--json", action="store_true", help="progress as JSON lines (query-migrate objects) on stderr")
    p.add_argument("--live-only", action="store_true", help="only the live migration part")
    p.add_argument("--capability", action="append", metavar="NAME=on|off", help=_CAPABILITY_HELP)
    p.add_argument("--parameter", action="append", metavar="NAME=VALUE", help=_PARAMETER_HELP)
    p.set_defaults(func=_cmd_demo)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so every ``with`` and ``finally`` runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` while a command runs (only the main thread can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status.  Errors are one line on stderr, never a traceback:
    1 for a failure, 2 for a usage error, 130/143 after SIGINT/SIGTERM (temporary files removed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    prefix = f"vmsd {args.command}"
    try:
        with _sigterm_raises():
            return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except _Terminated:
        print(f"{prefix}: terminated", file=sys.stderr)
        return EXIT_SIGTERM
    except OutputExists as exc:
        hint = " (--force replaces it)" if hasattr(args, "force") else ""
        print(f"{prefix}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_FINDINGS
    except UsageError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (VMSDError, ToolError) as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    except BrokenPipeError:
        # A reader such as `head` went away: not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:  # transports: refused, timed out, disk full
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    except ModuleNotFoundError as exc:
        if exc.name not in COMPILER_MODULES:
            return _internal_error(prefix, exc)
        print(f"{prefix}: needs the compiler (no module named {exc.name!r}): "
              "pip install 'vmsd[compiler]'", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # Spec errors come only from commands that loaded the grammar; the
        # stream tools start faster without importing it.
        diagnostics = sys.modules.get("vmsd.grammar.diagnostics")
        if diagnostics is not None and isinstance(exc, diagnostics.SpecError):
            print(exc.render(), file=sys.stderr)
            return EXIT_FINDINGS
        if isinstance(exc, ValueError):  # a bad URI, setting or value given on the command line
            print(f"{prefix}: error: {exc}", file=sys.stderr)
            return EXIT_FINDINGS
        return _internal_error(prefix, exc)


def _internal_error(prefix: str, exc: Exception) -> int:
    """A failure no check of ours anticipated: still one line (``VMSD_TRACEBACK=1`` prints the traceback)."""
    if os.environ.get("VMSD_TRACEBACK"):
        import traceback

        traceback.print_exception(exc)
    print(f"{prefix}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_FINDINGS
