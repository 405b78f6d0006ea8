"""`vmsd fmt`: the canonical layout is stable, keeps comments, and never changes what a spec means."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsd.cli import main
from vmsd.codegen.compiler import compile_specs
from vmsd.grammar.diagnostics import SpecError
from vmsd.grammar.formatter import format_source

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").rglob("*.vmsd"))
# Text pieces a layout may separate with whitespace: comments and strings whole, then
# names and numbers, the two-character operators, single punctuation.
_PIECE = re.compile(r'#[^\n]*|"(?:[^"\\\n]|\\.)*"|\s+|[A-Za-z0-9_.]+(?:[eE][+-][0-9]+)?'
                    r"|<<|>>|<=|>=|==|!=|&&|\|\||.")
_SPACES = [" ", "  ", "\t", " \t  "]


def _scramble(text: str, rng: random.Random) -> str:
    """The same tokens, comments and blank lines in another layout: every run of
    whitespace replaced (a comment keeps its own line or its place after code), and
    whitespace added at random between two pieces that had none."""
    pieces = _PIECE.findall(text)
    out: list[str] = []
    for i, piece in enumerate(pieces):
        nxt = pieces[i + 1] if i + 1 < len(pieces) else ""
        if piece.isspace():
            lines = piece.count("\n")
            near_comment = nxt.startswith("#") or (out and out[-1].startswith("#"))
            if lines >= 2:
                out.append("\n" + rng.choice(_SPACES) + "\n" * rng.randint(1, 2) + rng.choice(_SPACES))
            elif near_comment:
                out.append("\n" * lines + rng.choice(_SPACES))
            else:
                out.append(rng.choice([*_SPACES, "\n", "\n" + rng.choice(_SPACES)]))
            continue
        out.append(piece)
        if nxt and not nxt.isspace() and not piece.startswith("#") and rng.random() < 0.3:
            out.append(rng.choice([" ", "\n", "\t"]))
    return "".join(out)


def _compiled(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[Path, str]:
    """compile_specs of every spec under ``folder``/specs, named from ``folder`` as the compiler names
    files relative to the current directory; without the hash of each spec's text."""
    monkeypatch.chdir(folder)
    files = compile_specs(sorted(Path("specs").rglob("*.vmsd")), "specs")
    return {rel: re.sub(r"\(sha256 [0-9a-f]+\)", "", text) for rel, text in files.items()}


def test_every_shipped_spec_is_formatted() -> None:
    assert SPECS
    for path in SPECS:
        text = path.read_text(encoding="utf-8")
        assert format_source(text, str(path)) == text, f"{path}: run vmsd fmt"


def test_scrambled_specs_compile_alike_and_format_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped spec in another layout: the compiler's output is the same, and fmt restores the spec."""
    rng = random.Random(18)
    scrambled = tmp_path / "specs"
    shutil.copytree(REPO / "specs", scrambled)
    changed = 0
    for path in sorted(scrambled.rglob("*.vmsd")):
        original = path.read_text(encoding="utf-8")
        text = _scramble(original, rng)
        changed += text != original
        path.write_text(text, encoding="utf-8")
        assert format_source(text, str(path)) == original, path
    assert changed == len(SPECS)
    assert _compiled(tmp_path, monkeypatch) == _compiled(REPO, monkeypatch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SPECS), st.randoms(use_true_random=False))
def test_layout_does_not_matter(path: Path, rng: random.Random) -> None:
    original = path.read_text(encoding="utf-8")
    assert format_source(_scramble(original, rng), "x.vmsd") == original


def _with_comments(text: str, rng: random.Random) -> tuple[str, list[str]]:
    """``text`` with ``#`` comments put between random pieces (each ends its line)."""
    pieces = _PIECE.findall(text)
    out: list[str] = []
    added: list[str] = []
    for i, piece in enumerate(pieces):
        out.append(piece)
        if not piece.startswith("#") and rng.random() < 0.05:
            added.append(f"# note {len(added)}  about {pieces[i]!r}")
            out.append(rng.choice([" ", "\n", "\n\n  "]) + added[-1] + "\n")
    return "".join(out), added


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SPECS), st.randoms(use_true_random=False))
def test_comments_anywhere_are_kept_in_order(path: Path, rng: random.Random) -> None:
    original = path.read_text(encoding="utf-8")
    text, added = _with_comments(original, rng)
    once = format_source(text, "x.vmsd")
    assert format_source(once, "x.vmsd") == once
    comments = [line.split("#", 1)[1] for line in once.splitlines() if "# note " in line]
    assert comments == [c[1:] for c in added]
    # (format_source itself refuses a result that parses to other declarations.)


def test_canonical_layout() -> None:
    text = (
        "  # about the file\n\n\n"
        "import   \"a.vmsd\"   # why\n"
        "enum   Mode:uint8 { OFF=0 ## doc of ON\n ON = 1 }\n"
        'vmsd "dev" version 2 minimum 1 class Dev { uint32 n since 2 uint8 vals [ n*2 ] as "v" if(n>0&&-n<~1)\n'
        "    list < \"x\" > items  map<uint32,x>by_key\n"
        "  validate \"n ok\" ( n <= 8 )\n\n"
        "  subsection \"dev/more\" version 1 needed custom( more ) {\n"
        "      struct x ? one   # which\n"
        "      # closing\n"
        "  }}\n"
    )
    assert format_source(text, "dev.vmsd") == (
        "# about the file\n"
        "\n"
        'import "a.vmsd"  # why\n'
        "enum Mode : uint8 {\n"
        "    OFF = 0\n"
        "    ## doc of ON\n"
        "    ON  = 1\n"
        "}\n"
        'vmsd "dev" version 2 minimum 1 class Dev {\n'
        "    uint32 n           since 2\n"
        '    uint8  vals[n * 2] as "v" if (n > 0 && -n < ~1)\n'
        '    list<"x"> items\n'
        "    map<uint32, x> by_key\n"
        '    validate "n ok" (n <= 8)\n'
        "\n"
        '    subsection "dev/more" version 1 needed custom(more) {\n'
        "        struct x? one  # which\n"
        "        # closing\n"
        "    }\n"
        "}\n"
    )


def test_long_subsection_header_breaks_before_needed() -> None:
    cond = " || ".join(f"field_{i} != 0" for i in range(8))
    text = f'vmsd d version 1 minimum 1 {{ subsection "d/s" version 1 needed ({cond}) {{ uint8 a }} }}'
    assert format_source(text, "d.vmsd").splitlines()[1:3] == [
        '    subsection "d/s" version 1',
        f"            needed ({cond}) {{",
    ]


def test_bad_spec_is_a_located_error() -> None:
    with pytest.raises(SpecError) as info:
        format_source("vmsd d version 1 minimum 1 {\n    uint8\n}\n", "d.vmsd")
    assert info.value.diagnostics[0].pos.line == 3


def test_cli_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.vmsd"
    good.write_text("vmsd g version 1 minimum 1 {\n    uint8 a\n}\n")
    messy = tmp_path / "messy.vmsd"
    messy.write_text("vmsd m version 1 minimum 1 {   uint8 a  # kept\n}")
    bad = tmp_path / "bad.vmsd"
    bad.write_text("vmsd b version 1 minimum 1 {\n    uint8\n}\n")

    assert main(["fmt", "--check", str(good), str(messy)]) == 1
    assert capsys.readouterr().out == f"would reformat: {messy}\n"
    assert messy.read_text() == "vmsd m version 1 minimum 1 {   uint8 a  # kept\n}"

    assert main(["fmt", str(good), str(messy), str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"reformatted: {messy}\n"
    assert "bad.vmsd:3:1: error: unexpected '}'" in captured.err
    assert messy.read_text() == "vmsd m version 1 minimum 1 {\n    uint8 a  # kept\n}\n"
    assert bad.read_text() == "vmsd b version 1 minimum 1 {\n    uint8\n}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.vmsd", "good.vmsd", "messy.vmsd"]  # no temporaries left

    assert main(["fmt", "--check", str(good), str(messy)]) == 0
    assert main(["fmt", str(tmp_path / "absent.vmsd")]) == 2
