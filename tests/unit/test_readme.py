"""The README's Quick start runs the test suite as CI does: its test command installs the
same Debian packages as .ci/run, with and without recommends alike."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def apt_installs(text: str) -> list[tuple[bool, frozenset[str]]]:
    """(with recommends, packages) of each `apt-get install` in `text`."""
    out = []
    for m in re.finditer(r"apt-get install ([^&>\n]*)", text):
        words = m[1].split()
        out.append(("--no-install-recommends" not in words,
                    frozenset(w for w in words if not w.startswith("-"))))
    return out


def test_quick_starts_test_command_installs_what_ci_installs():
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.endswith("python -m pytest"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert apt_installs(line) == apt_installs(ci), (line, apt_installs(ci))
    assert "pip install '.[test]' && python -m pytest" in ci
