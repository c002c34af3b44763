"""The live view on a real pseudo-terminal, with real packets: rows appear, q quits cleanly."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>78]")


def spawn_on_pty(argv, cols=170, rows=40):
    pid, fd = pty.fork()
    if pid == 0:
        # the size must be set before the program looks at its terminal
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.environ.update(TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        os.execvp(argv[0], argv)
    return pid, fd


def read_until(fd, pattern, timeout, seen=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 65536).decode(errors="replace")
            except OSError:
                break
            seen += chunk
            if re.search(pattern, ANSI.sub("", seen)):
                return seen, True
    return seen, False


def wait_exit(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("mace did not exit")


def test_live_view_shows_both_containers_and_quits_on_q(testbed_factory):
    tb = testbed_factory(containers_n=2, masquerade=True)
    c0, c1 = tb.containers
    pid, fd = spawn_on_pty([sys.executable, "-m", "mace", "trace", "--netns", c0.ns,
                            "--netns", c1.ns, "--hops", "--duration", "30"])
    try:
        for c, size in ((c0, "56"), (c1, "300")):
            tb.popen(c.ns, ["ping", "-n", "-q", "-c", "150", "-i", "0.02", "-s", size, tb.peer_ip],
                     stdout=-1)
        # live view without a format option on a terminal: rows with numbers for both
        screen, ok = read_until(fd, rf"(?s){re.escape(c0.ns[-8:])}.*{re.escape(c1.ns[-8:])}.*"
                                    r"100\.0%.*where the time goes.*events [\d,]+/s", 20)
        text = ANSI.sub("", screen)
        assert ok, text[-3000:]
        # egress ends at the uplink's queue by default: its qdisc is no segment of the panel
        assert "where the time goes" in text and "uplink qdisc" not in text
        assert "prerouting, route" in text and "forward, postrouting" in text
        assert re.search(r"events [\d,]+/s · lost 0", text), text[-1500:]
        assert "100.0%" in text
        os.write(fd, b"q")
        rest, _ = read_until(fd, r"lost-to", 10, screen)
        code = wait_exit(pid, 10)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
    assert code == 0
    tail = ANSI.sub("", rest)
    # after the view closes, the usual summary (stderr shares the terminal here)
    assert re.search(rf"{re.escape(c0.ns[:22])}\s+egress\s+\d+\s+\d+\.\d%", tail), tail[-2000:]
