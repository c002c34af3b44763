"""`import mace`: the documented library face, loaded lazily so that `import mace` stays light."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

import mace
from mace import errors

FACE = ("Tracer", "Plan", "ContainerPath", "discover", "resolve", "Report", "MaceError")


def test_all_lists_the_face_and_every_error():
    subclasses = [n for n, cls in vars(errors).items()
                  if isinstance(cls, type) and issubclass(cls, errors.MaceError)]
    assert set(FACE) | set(subclasses) | {"__version__"} <= set(mace.__all__)
    assert len(mace.__all__) == len(set(mace.__all__))


@pytest.mark.parametrize("name", [n for n in mace.__all__ if n != "__version__"])
def test_each_name_resolves_and_has_a_docstring(name):
    obj = getattr(mace, name)
    assert (inspect.getdoc(obj) or "").strip(), f"mace.{name} has no docstring"


def test_names_are_the_real_objects():
    from mace.plan import ContainerPath, Plan
    from mace.tracer import Tracer

    assert (mace.Tracer, mace.Plan, mace.ContainerPath) == (Tracer, Plan, ContainerPath)
    assert mace.MaceError is errors.MaceError and mace.UsageError is errors.UsageError
    assert isinstance(mace.__version__, str) and mace.__version__
    assert set(FACE) <= set(dir(mace))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        mace.no_such_thing      # noqa: B018


def test_the_module_docstring_has_a_worked_example():
    doc = mace.__doc__ or ""
    assert ">>>" in doc or "::" in doc
    assert "Tracer(" in doc and "discover(" in doc


def test_import_mace_alone_loads_no_compiled_module():
    code = ("import sys, mace; heavy = [m for m in sys.modules if m.startswith('pyroute2') or m in "
            "('mace.capture._ring', 'mace.correlate._correlate', 'mace.tracer')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_lists_every_exit_status_from_the_one_table():
    from mace.cli import build_parser

    text = build_parser().format_help()
    for name, code in errors.EXIT_CODES.items():
        assert re.search(rf"^ +{code} +{re.escape(errors.meaning(name))}$", text, re.M), name
    assert re.search(r"^ +0 +done$", text, re.M)


def test_command_epilogs_take_their_numbers_from_the_table():
    from mace.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "trace" in a.choices).choices
    for command in ("trace", "serve", "on", "read"):
        text = sub[command].format_help()
        rows = re.findall(r"^ +(\d+) +(.+)$", text.split("exit status:")[1], re.M)
        assert rows, command
        by_meaning = {errors.meaning(n): c for n, c in errors.EXIT_CODES.items()}
        for code, meaning in rows:
            if code != "0":
                assert by_meaning.get(meaning) == int(code), (command, code, meaning)


def test_defaults_agree_with_the_compiled_correlator():
    from mace import defaults
    from mace.correlate import _correlate

    assert tuple(_correlate.DIRECTIONS) == defaults.DIRECTIONS


# -- the one poll loop (Tracer.follow) --------------------------------------------------------


def test_follow_reports_each_gone_container_once_and_ends_when_none_is_left():
    from mace.tracer import follow

    checks = iter([[True, True], None, [True, False], [True, False], [False, False]])
    batches, gone = [], []
    why = follow(lambda ms: [ms], on_batch=batches.append, presence=lambda: next(checks),
                 on_gone=lambda i, left: gone.append((i, left)), check_every=0, timeout_ms=7)
    assert why == "gone"
    assert gone == [(1, 1), (0, 0)]
    assert batches == [[7]] * 5


def test_follow_hears_of_a_reused_index_again_and_stops_on_request():
    from mace.tracer import follow

    checks = iter([[True, False], [True, None], [True, False], [True, True]])
    gone = []
    polls = []
    why = follow(lambda ms: polls.append(ms) or [], until=lambda: len(polls) == 4,
                 presence=lambda: next(checks), on_gone=lambda i, left: gone.append(i), check_every=0)
    assert (why, gone) == ("until", [1, 1])
    assert follow(lambda ms: [1], on_batch=lambda b: True) == "done"
