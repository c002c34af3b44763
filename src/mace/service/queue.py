"""The per-namespace report queue of `mace serve`: what an enabled namespace's readers take.

Owned by the event loop: the engine hands it batches already attributed to the namespace
(mace.service.engine), the server's connections take from it (mace.service.server).
"""

from __future__ import annotations

import asyncio
import base64
import time

from mace.output.report import REPORT_SIZE
from mace.plan import ContainerPath


class Namespace:
    """An enabled network namespace: its path through the host and its report queue.

    The queue is a ring of the correlator's packed reports (REPORT_SIZE bytes each, its
    memory bounded by `size` and taken only as reports arrive).  Reports are numbered from
    0 as they arrive; `base` is the number of the oldest still held, so a reader's cursor
    below it means reports were dropped."""

    def __init__(self, inode: int, path: ContainerPath, veth_index: int, size: int, *,
                 pid: int | None, since: float | None = None):
        self.inode = inode
        self.path = path
        self.veth_index = veth_index
        self.pid = pid
        self.since = since if since is not None else time.time()
        self.index = -1                     # container index in the tracer's plan (engine)
        self.size = size
        self.ring = bytearray()             # grows to size * REPORT_SIZE, then wraps
        self.base = 0
        self.end = 0
        self.read_at = 0                    # what `read` without --follow returns next
        self.dropped = 0
        self.received = 0
        self.closed: str | None = None      # why it was disabled
        self.discarded = 0                  # unread reports freed when it was disabled
        self.waiters: set[asyncio.Event] = set()
        # what its runtime calls it ({"container": "web", "runtime": "docker"}), if one does
        self.identity: dict | None = None
        # traced because the service was told to (--all, --netns), not by a client's `on`;
        # its reports are queued only once a client asks for them (`keep`), the metrics
        # count them regardless
        self.auto = False
        self.keep = True

    @property
    def label(self) -> str:
        return f"netns:{self.inode}"

    @property
    def queued(self) -> int:
        return self.end - self.base

    def push(self, raw: bytes) -> None:
        """Append packed reports; beyond `size`, the oldest go."""
        R, size = REPORT_SIZE, self.size
        n = len(raw) // R
        self.received += n
        if n > size:
            raw = raw[(n - size) * R:]
            self.end += n - size
            n = size
        if self.end + n <= size and len(self.ring) == self.end * R:
            self.ring += raw                    # still filling for the first time
        else:
            if len(self.ring) < size * R:
                self.ring += bytes(size * R - len(self.ring))
            done = 0
            while done < n:
                pos = (self.end + done) % size
                k = min(n - done, size - pos)
                self.ring[pos * R:(pos + k) * R] = raw[done * R:(done + k) * R]
                done += k
        self.end += n
        if self.end - self.base > size:
            self.dropped += self.end - size - self.base
            self.base = self.end - size
        for w in self.waiters:
            w.set()

    def take(self, cursor: int, limit: int) -> tuple[int, bytes, int]:
        """(dropped, packed reports, new cursor) from `cursor` on, at most `limit`."""
        R, size = REPORT_SIZE, self.size
        dropped = max(0, self.base - cursor)
        cursor += dropped
        n = max(0, min(limit, self.end - cursor))
        out = bytearray()
        while len(out) < n * R:
            pos = (cursor + len(out) // R) % size
            k = min(n - len(out) // R, size - pos)
            out += self.ring[pos * R:(pos + k) * R]
        return dropped, bytes(out), cursor + n

    def close(self, reason: str) -> None:
        self.closed = reason
        self.discarded = max(0, self.end - max(self.read_at, self.base))
        self.ring = bytearray()
        self.base = self.end
        for w in self.waiters:
            w.set()

    def saved(self, queue: bool = True) -> dict:
        """What a restarted service needs to resume it (with `queue`, its unread reports)."""
        out = {"inode": self.inode, "inner": self.path.inner, "veth": self.path.veth,
               "cgroup": self.path.cgroup,
               "veth_index": self.veth_index, "bridge": self.path.bridge, "since": self.since,
               "pid": self.pid}
        if queue:
            _, unread, _ = self.take(self.read_at, self.size)
            out.update(unread=base64.b64encode(unread).decode(), dropped=self.dropped)
        return out
