"""Test configuration: privilege gating for system tests and throwaway testbeds.

System tests (marked `system`) need root, tracefs and the tools that send traffic.  On a
developer's machine without them they skip with the reason; in CI (CI=true) they fail,
because a skip there would hide a broken install step.

Helpers the system tests share (pings, output read as it comes, the one-line error check)
are plain functions in tests/helpers.py: `from helpers import ...` (this directory is on
sys.path because this conftest.py is in it).
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def _system_blocker() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root (perf tracepoints, network namespaces)"
    for tool in ("ping", "nft", "ip", "setpriv"):
        if shutil.which(tool) is None:
            return (f"system tests need `{tool}` (Debian packages iputils-ping, nftables, "
                    "iproute2, util-linux)")
    if not os.path.exists("/proc/sys/kernel/perf_event_paranoid"):
        return "this kernel has no perf events"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/system" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.system)


@pytest.fixture(autouse=True)
def _gate_system(request):
    if request.node.get_closest_marker("system") is None:
        return
    reason = _system_blocker()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _clear_stale_testbeds():
    """Remove testbeds left by runs that were killed outright (SIGKILL)."""
    if os.geteuid() == 0:
        from mace.testing.testbed import remove_stale
        remove_stale()
    yield


@pytest.fixture
def testbed_factory():
    """Build testbeds that are torn down whatever the test does."""
    from mace.testing.testbed import Testbed

    made = []

    def make(**kw):
        tb = Testbed(**kw)
        made.append(tb)
        return tb.__enter__()

    yield make
    for tb in reversed(made):
        tb.teardown()


@pytest.fixture
def testbed(testbed_factory):
    return testbed_factory(containers_n=1)
