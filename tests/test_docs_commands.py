"""Every ```bash block of README.md and docs/*.md works as written.

A block runs here, line by line in bash, in one fresh folder per page (so a page's later
blocks see what its earlier ones wrote, e.g. ``rf2 resume=outputs/first``), with the paths
as written, on the synthetic data. An HTML comment on the line above a block can say
otherwise, with a reason in brackets:

- ``<!-- docs-test: skip (REASON) -->``: needs real data, a cluster or a fresh install;
- ``<!-- docs-test: ci (REASON) -->``: .ci/run runs the block verbatim;
- ``<!-- docs-test: run by tests/FILE.py (REASON) -->``: that test runs each line verbatim.

The fast tests check the markers hold (a "ci" or "run by" line must appear verbatim in
that file); the slow one runs the remaining blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:^<!--\s*docs-test:\s*(?P<marker>[^>]*?)\s*-->\n)?^```(?:bash|sh|shell)\n"
                   r"(?P<body>.*?)^```", re.S | re.M)
MARKER = re.compile(r"^(?P<kind>skip|ci|run by (?P<file>tests/[\w/]+\.py))\s*(?:\((?P<why>.+)\))?$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    marker: str  # "" = run here
    body: str

    @property
    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comments and blanks left out."""
        text = re.sub(r"\\\n\s*", "", self.body)
        return [line.split("  #")[0].strip() for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            found.append(Block(page, text[:m.start("body")].count("\n"), m.group("marker") or "",
                               m.group("body")))
    return found


def test_markers_are_known_and_give_a_reason() -> None:
    bad = []
    for block in blocks():
        if not block.marker:
            continue
        m = MARKER.match(block.marker)
        if m is None or not m.group("why"):
            bad.append(f"{block}: {block.marker!r}")
    assert not bad, f"unknown docs-test marker or no (reason): {bad}"


def test_blocks_run_elsewhere_are_run_verbatim_there() -> None:
    missing = []
    for block in blocks():
        m = MARKER.match(block.marker)
        if m is None or m.group("kind") == "skip":
            continue
        where = REPO / (".ci/run" if m.group("kind") == "ci" else m.group("file"))
        text = where.read_text(encoding="utf-8")
        missing += [f"{block}: {cmd!r} not in {where.relative_to(REPO)}"
                    for cmd in block.commands if cmd not in text]
    assert not missing, "\n".join(missing)


def test_blocks_on_synthetic_data_run_here() -> None:
    every = blocks()
    here = [b for b in every if not b.marker]
    assert len(every) >= 15 and len(here) >= 4, [str(b) for b in here]


@pytest.mark.slow  # runs rf2 several times (synthetic data, a few rounds each)
def test_unmarked_blocks_run_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    by_page: dict[Path, list[Block]] = {}
    for block in blocks():
        if not block.marker:
            by_page.setdefault(block.page, []).append(block)
    assert by_page, "no runnable block"
    for page, page_blocks in by_page.items():
        cwd = tmp_path / page.stem
        cwd.mkdir()
        (cwd / "notebooks").symlink_to(REPO / "notebooks")  # paths as written, from the root
        for block in page_blocks:
            for command in block.commands:
                proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env,
                                      capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, (f"{block}: {command}\n{proc.stdout[-2000:]}"
                                              f"\n{proc.stderr[-2000:]}")
    # what the getting-started page promises its commands leave behind
    first = tmp_path / "getting-started"
    assert (first / "outputs" / "first" / "DONE").is_file()
    assert (first / "outputs" / "first" / "figures" / "tier_curves_recall_at_20.png").is_file()
    assert (first / "multirun" / "first_sweep" / "figures" / "mdac_recall_at_20.csv").is_file()
