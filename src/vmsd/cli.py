"""Command line: ``vmsd compile`` and ``vmsd check``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmsd.grammar.diagnostics import SpecError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def _repo_root() -> Path | None:
    """The vmsd source checkout we run in, if any (for bare ``vmsd compile``)."""
    for d in [Path.cwd(), *Path.cwd().parents]:
        if (d / "specs").is_dir() and (d / "src" / "vmsd" / "generated").is_dir():
            return d
    return None


def _cmd_compile(args: argparse.Namespace) -> int:
    from vmsd.codegen.compiler import compile_specs

    if args.specs:
        specs = [Path(s) for s in args.specs]
        out_dir = Path(args.output or ".")
        root = None
    else:
        repo = _repo_root()
        if repo is None:
            print("vmsd compile: no SPEC given and not inside the vmsd repository", file=sys.stderr)
            return EXIT_USAGE
        specs = sorted((repo / "specs").rglob("*.vmsd"))
        out_dir = Path(args.output) if args.output else repo / "src" / "vmsd" / "generated"
        root = str(repo / "specs")
    files = compile_specs(specs, root)
    stale = []
    for rel, text in sorted(files.items()):
        target = out_dir / rel
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(target)
        if not args.check:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".py.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
    if args.check:
        for target in stale:
            print(f"stale: {target}")
        return EXIT_FINDINGS if stale else EXIT_OK
    print(f"wrote {len(stale)} of {len(files)} files under {out_dir}")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from vmsd.grammar.loader import load
    from vmsd.grammar.semantic import check

    check(load([Path(s) for s in args.specs]))
    print(f"{len(args.specs)} spec(s) ok")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from vmsd.demo import run

    return run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmsd", description="Typed QEMU VMState descriptions and migration streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="generate Python modules from .vmsd specs")
    p.add_argument("specs", nargs="*", metavar="SPEC")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (default: current directory, or vmsd.generated in the repository)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 and name the files that would change")
    p.set_defaults(func=_cmd_compile)
    p = sub.add_parser("check", help="parse and check specs without generating code")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("demo", help="compile the bundled specs and show the generated API at work")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        return int(args.func(args))
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_FINDINGS
