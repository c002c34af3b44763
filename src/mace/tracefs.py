"""Find (or privately mount) tracefs and read tracepoint ids and field layouts.

Field offsets differ between tracepoints and kernels, so they are always read from the
`format` files, never assumed.  When tracefs is not mounted, mace mounts it on a private
temporary directory only for as long as it reads the formats, and unmounts it again:
the system is left as it was found.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mace.errors import MaceError, TracefsError, TracepointMissing

STANDARD_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
MNT_DETACH = 2


@dataclass(frozen=True)
class Field:
    """One field of a tracepoint's raw record."""

    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    data_loc: bool = False   # u32: low 16 bits offset of the payload in the record, high 16 its length

    @property
    def is_string(self) -> bool:
        return self.data_loc and "char" in self.ctype


@dataclass(frozen=True)
class EventFormat:
    """A tracepoint's id and its fields, parsed from `events/<system>/<name>/format`."""

    system: str
    name: str
    id: int
    fields: dict[str, Field] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def size(self) -> int:
        """Bytes of the fixed part of the record (every field inside it)."""
        return max((f.offset + f.size for f in self.fields.values()), default=8)

    def field(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            raise TracepointMissing(
                f"tracepoint {self.qualified} has no field {name!r} on this kernel",
                hint="mace needs a kernel whose net tracepoints carry skbaddr, len and name (Linux >= 4.x)",
            ) from None


_FIELD = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);"
)


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse the text of a tracefs `format` file.

    >>> fmt = parse_format(open("/sys/kernel/tracing/events/net/netif_rx/format").read(), "net")
    >>> fmt.fields["name"].data_loc, fmt.fields["skbaddr"].offset
    (True, 8)
    """
    name = None
    ev_id = None
    fields: dict[str, Field] = {}
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            ev_id = int(line.split(":", 1)[1])
        else:
            m = _FIELD.match(line)
            if not m:
                continue
            decl = m["decl"].strip()
            data_loc = decl.startswith("__data_loc ")
            if data_loc:
                decl = decl[len("__data_loc "):]
            # "unsigned char common_flags", "const void * skbaddr", "char name[16]"
            decl = re.sub(r"\[[^\]]*\]\s*$", "", decl)
            fname = re.split(r"[\s*]+", decl)[-1]
            ctype = decl[: len(decl) - len(fname)].strip()
            fields[fname] = Field(fname, ctype, int(m["offset"]), int(m["size"]),
                                  m["signed"] == "1", data_loc)
    if name is None or ev_id is None:
        raise ValueError("not a tracepoint format file (no name: or ID: line)")
    return EventFormat(system, name, ev_id, fields)


def _mounted_tracefs() -> Path | None:
    for p in STANDARD_PATHS:
        if os.path.isdir(os.path.join(p, "events")):
            return Path(p)
    # Somewhere else (a container may mount it at /tracing): look in the mount table.
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "tracefs" and os.path.isdir(os.path.join(parts[1], "events")):
                    return Path(parts[1])
    except OSError:
        pass
    return None


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@contextmanager
def tracefs() -> Iterator[Path]:
    """Yield the tracefs root, mounting it privately for the duration when it is absent."""
    found = _mounted_tracefs()
    if found is not None:
        yield found
        return
    libc = _libc()
    mnt = tempfile.mkdtemp(prefix="mace-tracefs-")
    try:
        if libc.mount(b"nodev", mnt.encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            if err == errno.ENODEV:
                raise TracefsError("this kernel has no tracefs (CONFIG_TRACING is off)",
                                   hint="mace needs a kernel built with tracepoints")
            raise TracefsError(f"cannot mount tracefs: {os.strerror(err)}",
                               hint="run as root (mace mounts tracefs itself), or mount it: "
                                    "mount -t tracefs nodev /sys/kernel/tracing")
        try:
            yield Path(mnt)
        finally:
            libc.umount2(mnt.encode(), MNT_DETACH)
    finally:
        os.rmdir(mnt)


def read_format(root: Path, qualified: str) -> EventFormat:
    """Read `system:name` from a tracefs root."""
    system, _, name = qualified.partition(":")
    path = root / "events" / system / name / "format"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TracepointMissing(f"this kernel has no tracepoint {qualified}",
                                hint="mace needs the net and skb tracepoints (CONFIG_TRACEPOINTS, Linux >= 4.x)") from None
    except PermissionError:
        raise TracefsError(f"cannot read {path}: permission denied",
                           hint="run as root or with CAP_PERFMON and read access to tracefs") from None
    return parse_format(text, system)


def read_formats(names: list[str]) -> dict[str, EventFormat]:
    """Formats of several tracepoints in one tracefs visit."""
    with tracefs() as root:
        return {n: read_format(root, n) for n in names}


def is_mounted_somewhere() -> bool:
    return _mounted_tracefs() is not None


__all__ = ["Field", "EventFormat", "parse_format", "tracefs", "read_format", "read_formats",
           "MaceError"]
