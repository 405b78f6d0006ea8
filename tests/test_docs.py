"""The documentation's examples run, and the generated pages are current.

Convention (docs/examples.md says the same for writers):

* Every fenced ```python and ```sh block of README.md and docs/ is run, in page order, in a fresh
  folder for the page (a link ``specs`` there points to the repository's specs/).  Python blocks of a
  page share one namespace, with that folder as the current directory and first on ``sys.path``; sh
  blocks run with ``bash -e -o pipefail`` there, ``vmsd`` and ``python`` on ``PATH`` being this
  checkout's.  A block fails its test by raising, or by a non-zero exit status.
* An HTML comment on the line(s) right above a block (invisible once rendered) changes that:
  ``<!-- norun: REASON -->`` skips it (the reason is required), ``<!-- exit: N -->`` expects exit
  status N from an sh block, ``<!-- file: PATH -->`` writes the block (of any language) to PATH in the
  page's folder instead of running it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
RUNNABLE = ("python", "sh")
_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<lang>[^`\s]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<key>norun|exit|file)\s*:\s*(?P<value>.*?)\s*-->\s*$")


@attrs.frozen
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    directives: dict[str, str]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].startswith(indent) and lines[i].strip().startswith(fence)
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        directives: dict[str, str] = {}
        j = start - 1
        while j >= 0 and (d := _DIRECTIVE.match(lines[j])) is not None:
            directives[d["key"]] = d["value"]
            j -= 1
        out.append(Block(page, start + 1, m["lang"], "\n".join(body) + "\n", directives))
    return out


def _shims(folder: Path) -> dict[str, str]:
    """``vmsd`` and ``python`` of this checkout first on PATH (scripts, not links: a link to a virtualenv's
    interpreter would lose the virtualenv)."""
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    for name, run in (("vmsd", f'"{sys.executable}" -m vmsd'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(folder)])}


def run_page(page: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the page's blocks as the convention says; the number of blocks run."""
    (folder / "specs").symlink_to(REPO / "specs")
    env = _shims(folder)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for b in blocks(page):
        if "file" in b.directives:
            target = folder / b.directives["file"]
            assert target.resolve().is_relative_to(folder), f"{b.where}: file: must stay in the page's folder"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(b.text, encoding="utf-8")
            continue
        if b.lang not in RUNNABLE:
            assert not b.directives, f"{b.where}: a directive on a {b.lang or 'plain'} block means nothing"
            continue
        if "norun" in b.directives:
            assert b.directives["norun"], f"{b.where}: norun needs a reason"
            continue
        ran += 1
        if b.lang == "python":
            exec(compile(textwrap.dedent(b.text), b.where, "exec"), namespace)
        else:
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.text], cwd=folder, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
            expected = int(b.directives.get("exit", "0"))
            assert proc.returncode == expected, (
                f"{b.where}: exit {proc.returncode}, expected {expected}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return ran


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(sys.modules)
    try:
        run_page(page, tmp_path, monkeypatch)
    finally:
        # Modules the page generated and imported live in its folder, gone after the test.
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(str(tmp_path)):
                del sys.modules[name]


def test_the_convention_is_followed(tmp_path: Path) -> None:
    """The parser finds blocks and directives as the convention says (on a page written here)."""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        ```python
        x = 1
        ```
        <!-- norun: needs a peer -->
        ```sh
        vmsd incoming tcp:127.0.0.1:4444 -o x.mig
        ```
        - in a list:

          <!-- file: a.vmsd -->
          ```vmsd
          vmsd a version 1 minimum 1 { uint8 x }
          ```
        """))
    found = blocks(page)
    assert [(b.lang, b.directives) for b in found] == [
        ("python", {}), ("sh", {"norun": "needs a peer"}), ("vmsd", {"file": "a.vmsd"})]
    assert found[2].text == "vmsd a version 1 minimum 1 { uint8 x }\n"


def test_every_page_is_in_the_site() -> None:
    """mkdocs.yml's nav lists every page of docs/ (a page left out would be built but unreachable)."""
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")
               if str(p.relative_to(REPO / "docs")) not in nav]
    assert missing == []


def test_cli_reference_is_current() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "cli_reference.py"), "--check"],
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_points_into_the_repository() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in text
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)", text):
        assert (REPO / target).exists(), target
