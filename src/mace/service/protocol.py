"""The per-container service's wire protocol, shared by `mace serve` and its clients.

Newline-delimited JSON over a Unix stream socket, one request at a time per connection:

    → {"v": 1, "op": "on"}
    ← {"v": 1, "ok": true, "op": "on", "netns": 4026532281, "state": "enabled", ...}

Requests are objects with `v` (the protocol version, 1) and `op`: "on", "off", "status" or
"read"; "read" may add `"follow": true`.  Nothing else is accepted: in particular no request
names a namespace, the service takes the caller's from the socket's peer credentials.  A
request line is at most MAX_REQUEST bytes.

Every reply and control message carries `v`; errors are `{"v": 1, "ok": false, "code": ...,
"error": ..., "hint": ...}` and the service then closes the connection.  A read answers with
a header `{"v":1,"ok":true,"op":"read",...}`, then report lines (the objects of `mace trace
--format jsonl`, which never carry `v`), with `{"v":1,"dropped":N}` where N reports were lost
because the queue was full, and ends with `{"v":1,"end":true,"reason":...,"reports":N,
"dropped":N}` (a follow read ends only when the namespace is disabled or the service stops).

This module imports nothing from mace's compiled extensions: a client in a container needs
only the Python standard library (and mace.defaults, which is plain constants).
"""

from __future__ import annotations

import json
import os

from mace.defaults import DEFAULT_SOCKET, SOCKET_ENV  # noqa: F401 - part of the protocol

VERSION = 1
MAX_REQUEST = 4096
OPS = ("on", "off", "status", "read")
FIELDS = {"v", "op", "follow"}

# error codes, stable for scripts
BAD_REQUEST = "bad-request"
TOO_LONG = "too-long"
NOT_ENABLED = "not-enabled"
TOPOLOGY = "topology"
IDENTITY = "identity"
BUSY = "busy"
FAILED = "failed"
STOPPING = "stopping"


class ProtocolError(Exception):
    """A request the service refuses: `code`, a message and a hint for the user."""

    def __init__(self, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.code = code
        self.hint = hint

    def reply(self) -> dict:
        out = {"v": VERSION, "ok": False, "code": self.code, "error": str(self)}
        if self.hint:
            out["hint"] = self.hint
        return out


def socket_path(given: str | None = None) -> str:
    return given or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def parse_request(line: bytes) -> dict:
    """A validated request, or ProtocolError."""
    if len(line) > MAX_REQUEST:
        raise ProtocolError(TOO_LONG, f"request of more than {MAX_REQUEST} bytes",
                            hint="a request is one short JSON object per line")
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(BAD_REQUEST, "request is not JSON",
                            hint='send one JSON object per line, e.g. {"v":1,"op":"status"}') from None
    if not isinstance(req, dict):
        raise ProtocolError(BAD_REQUEST, "request is not a JSON object",
                            hint='send one JSON object per line, e.g. {"v":1,"op":"status"}')
    if type(req.get("v")) is not int or req["v"] != VERSION:
        raise ProtocolError(BAD_REQUEST, f"protocol version {req.get('v')!r} is not supported",
                            hint=f'this service speaks version {VERSION}: send "v": {VERSION}')
    unknown = sorted(set(req) - FIELDS)
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field {unknown[0]!r}",
                            hint="requests never name a namespace: the service answers for the "
                                 "caller's own; fields are v, op and follow")
    if req.get("op") not in OPS:
        raise ProtocolError(BAD_REQUEST, f"unknown op {req.get('op')!r}",
                            hint="ops are " + ", ".join(OPS))
    if "follow" in req and (req["op"] != "read" or not isinstance(req["follow"], bool)):
        raise ProtocolError(BAD_REQUEST, "follow is a boolean of read requests",
                            hint='send {"v":1,"op":"read","follow":true}')
    return req
