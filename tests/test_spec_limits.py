"""Hostile specs meet the limits of vmsd.grammar.limits: one located SpecError, never a Python error.

Each shape is tried at its limit (accepted; the deep ones also compile to a
module that imports and round-trips) and above it, up to sizes that used to
exhaust the recursion limit.  Cost is asserted on counts (profiler call
events, tracemalloc), never on time.
"""

from __future__ import annotations

import os
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsd.cli import EXIT_FINDINGS, main
from vmsd.codegen.compiler import compile_specs
from vmsd.grammar import limits
from vmsd.grammar.diagnostics import SpecError
from vmsd.grammar.loader import load, load_text
from vmsd.grammar.semantic import check


def _vmsd(body: str, name: str = "a") -> str:
    return f'vmsd "{name}" version 1 minimum 1 {{\n    uint8 x = 1\n{body}\n}}\n'


def parens(n: int) -> str:
    return _vmsd('    validate "v" (' + "(" * (n - 1) + "x" + ")" * (n - 1) + ")")


def bangs(n: int) -> str:
    return _vmsd('    validate "v" (' + "!" * n + "x)")


def ands(n: int) -> str:
    return _vmsd('    validate "v" (' + " && ".join(["x"] * (n + 1)) + ")")


def subsections(n: int) -> str:
    opened, name = [], "a"
    for _ in range(n):
        name += "/s"
        opened.append(f'subsection "{name}" version 1 needed (x > 0) {{ uint8 y{len(opened)}')
    return _vmsd(" ".join(opened) + " }" * n)


def structs(n: int) -> str:
    """A chain of n struct fields: v0 holds v1 holds ... holds vn."""
    return "".join(f'vmsd "v{i}" version 1 minimum 1 {{ uint8 x struct v{i + 1} s }}\n' for i in range(n)) + \
        f'vmsd "v{n}" version 1 minimum 1 {{ uint8 x }}\n'


# shape -> (spec of depth n, the limit, the message above it)
SHAPES: dict[str, tuple[Callable[[int], str], int, str]] = {
    "parentheses": (parens, limits.MAX_EXPR_DEPTH, "parentheses nest more than"),
    "chained !": (bangs, limits.MAX_EXPR_DEPTH, "expression nests more than"),
    "&& chain": (ands, limits.MAX_EXPR_DEPTH, "expression nests more than"),
    "subsections": (subsections, limits.MAX_SUBSECTION_DEPTH, "subsections nest more than"),
    "structs": (structs, limits.MAX_STRUCT_DEPTH, "nests structs more than"),
}


def _spec_error(text: str) -> SpecError | None:
    try:
        check(load_text(text, "deep.vmsd"))
    except SpecError as exc:
        return exc
    return None


@pytest.mark.parametrize("shape", SHAPES)
def test_depth_above_the_limit_is_one_located_error(shape: str) -> None:
    make, limit, message = SHAPES[shape]
    for n in (limit + 1, 2 * limit, 5000):
        exc = _spec_error(make(n))
        assert exc is not None, (shape, n)
        assert len(exc.diagnostics) == 1, exc.render()
        diag = exc.diagnostics[0]
        assert message in diag.message and str(limit) in diag.message
        assert diag.pos.path == "deep.vmsd" and diag.pos.line >= 1 and diag.pos.col >= 1
        assert "^" in exc.render()  # the caret under the place


@pytest.mark.parametrize("shape", SHAPES)
def test_depth_at_the_limit_compiles_imports_and_round_trips(shape: str, tmp_path: Path) -> None:
    make, limit, _ = SHAPES[shape]
    spec = tmp_path / "deep.vmsd"
    spec.write_text(make(limit), encoding="utf-8")
    files = compile_specs([spec])
    (module_file,) = [p for p in files if p.name != "__init__.py"]
    namespace: dict[str, Any] = {}
    exec(compile(files[module_file], str(module_file), "exec"), namespace)
    cls = namespace["A" if shape != "structs" else "V0"]
    obj = cls()
    assert cls.load(obj.save()) == obj


def test_a_deep_spec_never_raises_recursion_error_in_any_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for shape, (make, _, _) in SHAPES.items():
        spec = tmp_path / "deep.vmsd"
        spec.write_text(make(3000), encoding="utf-8")
        for argv in (["check", str(spec)], ["compile", "-o", str(tmp_path / "out"), str(spec)]):
            assert main(argv) == EXIT_FINDINGS, shape
            err = capsys.readouterr().err
            assert "Traceback" not in err and "deep.vmsd:" in err


@pytest.mark.parametrize(("literal", "message"), [
    ("1" * 5000, "integer literal of 5000 characters"),
    ("0x" + "f" * 200, "integer literal of 202 characters"),
])
def test_long_integer_literals_are_refused_before_conversion(literal: str, message: str) -> None:
    exc = _spec_error(f'vmsd "a" version 1 minimum 1 {{ uint64 x = {literal} }}')
    assert exc is not None and [d.message for d in exc.diagnostics] == [f"{message}; the limit is {limits.MAX_LITERAL_CHARS}"]
    assert (exc.diagnostics[0].pos.line, exc.diagnostics[0].pos.col) == (1, 43)


def test_longest_binary_uint64_literal_is_accepted() -> None:
    literal = "0b" + "_".join(["11111111"] * 8)
    assert len(literal) <= limits.MAX_LITERAL_CHARS
    check(load_text(f'vmsd "a" version 1 minimum 1 {{ uint64 x = {literal} }}'))


@pytest.mark.parametrize("literal", ["1" * 400 + ".0", "1.0e999", "9" * 99 + ".9e308"])
def test_floats_that_are_too_long_or_infinite_are_refused(literal: str) -> None:
    exc = _spec_error(f'vmsd "a" version 1 minimum 1 {{ float64 x = {literal} }}')
    assert exc is not None and len(exc.diagnostics) == 1
    assert "float64" in exc.diagnostics[0].message or "characters" in exc.diagnostics[0].message


def test_unused_size_is_bounded() -> None:
    check(load_text(f'vmsd "a" version 1 minimum 1 {{ unused {limits.MAX_UNUSED_BYTES} }}'))
    exc = _spec_error('vmsd "a" version 1 minimum 1 { unused 99999999999 }')
    assert exc is not None and [d.message for d in exc.diagnostics] == [
        f"unused size 99999999999 is above the limit of {limits.MAX_UNUSED_BYTES} bytes"]


# ---- files and imports ---------------------------------------------------------------------


def _load_error(paths: list[Path], **kw: Any) -> str:
    with pytest.raises(SpecError) as info:
        load(paths, **kw)
    return info.value.render()


def test_imports_outside_the_spec_folders_are_refused(tmp_path: Path) -> None:
    inside = tmp_path / "specs"
    inside.mkdir()
    (tmp_path / "elsewhere.vmsd").write_text('vmsd "e" version 1 minimum 1 { uint8 x }\n')
    (inside / "link.vmsd").symlink_to(tmp_path / "elsewhere.vmsd")
    for target in ("/dev/zero", "/proc/self/environ", "../elsewhere.vmsd", "link.vmsd"):
        spec = inside / "spec.vmsd"
        spec.write_text(f'import "{target}"\n')
        text = _load_error([spec])
        assert f"cannot import '{target}': outside the folders of the specs given" in text
        assert "SHELL=" not in text and "PATH=" not in text  # nothing of the target is read
    # The flag lets a real spec through, still refuses what is not a regular file.
    spec.write_text('import "../elsewhere.vmsd"\n')
    assert "elsewhere.vmsd" in " ".join(load([spec], outside_imports=True).files)
    spec.write_text('import "/dev/zero"\n')
    assert "cannot import '/dev/zero': not a regular file" in _load_error([spec], outside_imports=True)


def test_a_fifo_or_a_device_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.vmsd"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    spec = tmp_path / "spec.vmsd"
    spec.write_text('import "fifo.vmsd"\n')
    assert "cannot import 'fifo.vmsd': not a regular file" in _load_error([spec])
    assert "cannot read spec: not a regular file" in _load_error([Path("/dev/zero")])


def test_oversized_spec_files_are_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.vmsd"
    with big.open("wb") as fh:
        fh.truncate(limits.MAX_SPEC_BYTES + 1)
    assert f"larger than the limit of {limits.MAX_SPEC_BYTES >> 20} MiB" in _load_error([big])


def test_import_chains_and_file_counts_are_bounded(tmp_path: Path) -> None:
    n = limits.MAX_IMPORT_DEPTH + 5
    for i in range(n):
        (tmp_path / f"f{i}.vmsd").write_text(f'import "f{i + 1}.vmsd"\n')
    (tmp_path / f"f{n}.vmsd").write_text("")
    text = _load_error([tmp_path / "f0.vmsd"])
    assert text.count("error:") == 1 and f"imports nest more than {limits.MAX_IMPORT_DEPTH} files deep" in text
    # At the limit the chain loads.
    assert len(load([tmp_path / f"f{n - limits.MAX_IMPORT_DEPTH}.vmsd"]).files) == limits.MAX_IMPORT_DEPTH + 1


# ---- cost grows linearly -------------------------------------------------------------------


def _big_spec(n: int) -> str:
    """n vmsds in chains of ten structs, each with a length and a condition, and one vmsd of n fields."""
    out = [f'vmsd "v{i}" version 1 minimum 1 {{ uint8 a uint16 b[a] '
           + (f"struct v{i - 1} c if (a > 2 && version >= 1) " if i % 10 else "") + "}\n" for i in range(n)]
    out.append('vmsd "big" version 1 minimum 1 {\n    uint8 f0\n')
    out += [f"    uint8 f{i} if (f{i - 1} == 1)\n" for i in range(1, n)]
    out.append("    subsection \"big/s\" version 1 { uint8 g if (f0 > 1) }\n" * 1 + "}\n")
    return "".join(out)


def _calls(fn: Callable[[], object]) -> int:
    """Python and C function calls (and generator resumptions) while ``fn`` runs: a deterministic cost."""
    count = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal count
        count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_checking_cost_is_linear_in_the_spec() -> None:
    small, large = _big_spec(500), _big_spec(2000)
    check(load_text(small))  # the parser is built once, outside the counts
    ratio = _calls(lambda: check(load_text(large))) / _calls(lambda: check(load_text(small)))
    assert ratio < 4.6, ratio  # 4x the text; a scan per reference made this ~16x


def test_checking_memory_is_a_bounded_multiple_of_the_spec() -> None:
    text = _big_spec(2000)
    check(load_text(text))
    tracemalloc.start()
    try:
        check(load_text(text))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * len(text), (peak, len(text))


# ---- fuzz ------------------------------------------------------------------------------------

_PIECES = ["(", ")", "{", "}", "!", "&&", "||", "x", "1", "0x", "version", "subsection \"a/s\" version 1",
           "uint8 y", "struct a s", "validate \"v\" (", "if (", "unused 4", "[", "]", "=", "99999", "1.5e308", " "]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), max_size=60), st.integers(0, 4), st.integers(1, 400))
def test_random_token_soup_gives_a_spec_error_or_passes(pieces: list[str], repeat: int, times: int) -> None:
    """Whatever the text, checking either passes or raises SpecError with located diagnostics."""
    body = " ".join(pieces)
    if repeat:  # stretch one piece to find depth problems
        body += " " + pieces[0] * times if pieces else ""
    try:
        check(load_text(_vmsd(body)))
    except SpecError as exc:
        assert exc.diagnostics and all(d.pos.line >= 1 and d.pos.col >= 1 for d in exc.diagnostics)
