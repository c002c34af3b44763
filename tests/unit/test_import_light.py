"""The client (`mace on|off|status|read`) runs inside containers: it must import the
standard library and mace's protocol and client code only, never the engine."""

from __future__ import annotations

import os
import subprocess
import sys

from mace.errors import ServiceUnreachable

HEAVY = ("pyroute2", "mace.capture._ring", "mace.correlate._correlate", "mace.service.server",
         "mace.service.engine", "mace.tracer", "rich")


def imported(args: list[str]) -> tuple[int, set[str], str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MACE_SOCKET", None)
    p = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                       text=True, env=env, timeout=60)
    names = set()
    other = []
    for line in p.stderr.splitlines():
        if line.startswith("import time:"):
            names.add(line.rsplit("|", 1)[1].strip())
        else:
            other.append(line)
    return p.returncode, names, "\n".join(other)


def test_the_client_imports_no_engine_module():
    rc, names, err = imported(["-m", "mace", "status", "--socket", "/nonexistent/mace.sock"])
    assert rc == ServiceUnreachable.exit_code == 10, err
    assert "cannot reach the mace service" in err
    assert "mace.service.client" in names           # the measurement is of the right thing
    heavy = sorted(n for n in names if n.split(".")[0] == "pyroute2" or n in HEAVY)
    assert heavy == []


def test_help_imports_no_engine_module():
    rc, names, err = imported(["-m", "mace", "--help"])
    assert rc == 0, err
    assert sorted(n for n in names if n.split(".")[0] == "pyroute2" or n in HEAVY) == []
