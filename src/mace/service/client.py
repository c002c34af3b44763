"""The client side of `mace serve`, for `mace on|off|status|read` inside a container.

It needs no privileges and nothing but the socket: the service works out which network
namespace the caller is in.  Plain Python; see mace.service.protocol for the wire format.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from typing import IO

from mace.errors import ServiceRefused, ServiceUnreachable, TargetNotFound, TopologyError, UsageError
from mace.service import protocol as P

# what a refusal means for the exit status
_EXIT = {P.NOT_ENABLED: TargetNotFound, P.TOPOLOGY: TopologyError, P.BAD_REQUEST: UsageError,
         P.TOO_LONG: UsageError}


class Connection:
    """One connection to the service; requests go one at a time."""

    def __init__(self, path: str | None = None, timeout: float | None = 30.0):
        self.path = P.socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise ServiceUnreachable(
                f"cannot reach the mace service at {self.path}: {e.strerror or e}",
                hint="is `mace serve` running on the host, and its socket mounted here? "
                     f"(--socket PATH or {P.SOCKET_ENV})") from None
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _message(self) -> dict | bytes | None:
        line = self.file.readline()
        if not line:
            return None
        # reports are passed on as they came (their ts keeps all nine digits)
        if line.startswith(b'{"v":'):
            return json.loads(line)
        return line

    def request(self, op: str, **fields) -> dict:
        """Send a request and return its reply; a refusal raises."""
        self.sock.sendall(P.encode({"v": P.VERSION, "op": op, **fields}))
        try:
            reply = self._message()
        except (TimeoutError, OSError) as e:
            raise ServiceUnreachable(f"the mace service did not answer: {e}",
                                     hint="check the service's log") from None
        if reply is None:
            raise ServiceUnreachable("the mace service closed the connection",
                                     hint="check the service's log")
        if not isinstance(reply, dict) or reply.get("v") != P.VERSION:
            raise ServiceUnreachable("the mace service answered in another protocol version",
                                     hint="use the same mace version inside and outside")
        if not reply.get("ok"):
            cls = _EXIT.get(reply.get("code"), ServiceRefused)
            raise cls(reply.get("error", "refused"), reply.get("hint"))
        return reply

    def stream(self) -> Iterator[dict | bytes]:
        """After a read request: report lines (bytes) and control messages (dicts), up to and
        including the end message."""
        self.sock.settimeout(None)
        while True:
            msg = self._message()
            if msg is None:
                raise ServiceUnreachable("the mace service closed the connection mid-read",
                                         hint="check the service's log")
            yield msg
            if isinstance(msg, dict) and msg.get("end"):
                return


def mace_line(report: bytes) -> str:
    """A report line as the original MACE's /dev/mace wrote it: [sec.usec] (seq) dir: ns."""
    r = json.loads(report, parse_float=str)
    sec, _, frac = str(r["ts"]).partition(".")
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
    us = (ns + 500) // 1000
    return f"[{us // 1_000_000}.{us % 1_000_000:06d}] ({r['seq']}) {r['dir']}: {r['latency_ns']}\n"


def read(conn: Connection, *, follow: bool, fmt: str, out: IO[str],
         err: IO[str] = sys.stderr) -> dict:
    """Copy reports to `out` in `fmt`; notes about drops go to `err`.  Returns the end message."""
    conn.request("read", **({"follow": True} if follow else {}))
    for msg in conn.stream():
        if isinstance(msg, bytes):
            out.write(msg.decode() if fmt == "jsonl" else mace_line(msg))
            if follow:
                out.flush()
        elif msg.get("dropped") and not msg.get("end"):
            err.write(f"mace: {msg['dropped']} reports dropped: the service's queue for this "
                      "namespace was full (read more often, or ask for a larger --queue)\n")
        elif msg.get("end"):
            out.flush()
            return msg
    return {}
