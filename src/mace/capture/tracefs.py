"""Find tracefs (or mount it privately) and read tracepoint ids and field layouts.

Field offsets differ between tracepoints and kernels, so they are always read from the
`format` files, never assumed.  When tracefs is not mounted, a child process mounts it
inside a mount namespace of its own, reads the formats and exits: the mount never
exists outside that child, so the system is left as it was found, even after a SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mace.errors import TracefsError, TracepointMissing

STANDARD_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


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
    print_fmt: str = ""

    @property
    def qualified(self) -> str:
        return f"{self.system}:{self.name}"

    def symbol(self, fieldname: str, symbol: str) -> int | None:
        """The value __print_symbolic gives `symbol` for `fieldname` (enum values such as
        kfree_skb's drop reasons differ between kernels), or None."""
        m = re.search(r"__print_symbolic\(REC->" + re.escape(fieldname) + r",(.*?)\)\s*(,|$)",
                      self.print_fmt)
        if not m:
            return None
        for value, name in re.findall(r'\{\s*(-?\w+)\s*,\s*"([^"]*)"\s*\}', m.group(1)):
            if name == symbol:
                return int(value, 0)
        return None

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
    print_fmt = ""
    fields: dict[str, Field] = {}
    for line in text.splitlines():
        if line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        elif line.startswith("name:"):
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
    return EventFormat(system, name, ev_id, fields, print_fmt)


def _mounted_tracefs() -> Path | None:
    """A tracefs mount listed in the mount table.  Only the table is consulted: merely
    looking inside /sys/kernel/debug/tracing makes the kernel automount tracefs there."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    found = [m[1] for m in mounts if len(m) > 2 and m[2] == "tracefs"]
    for p in (*STANDARD_PATHS, *found):
        if p in found:
            return Path(p)
    return None


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _read_privately(paths: list[str]) -> dict[str, str | None]:
    """Texts of files under the tracefs root (None: absent), read by a child that mounts
    tracefs in a mount namespace of its own: nothing is mounted where anyone else can see
    it, even if mace is killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: no Python cleanup, just _exit
        try:
            os.close(r)
            reply = {"files": _child_mount_and_read(paths)}
        except OSError as e:
            reply = {"errno": e.errno, "what": str(e)}
        except BaseException as e:                 # noqa: BLE001 - reported to the parent
            reply = {"errno": 0, "what": repr(e)}
        data = json.dumps(reply).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    reply = json.loads(b"".join(chunks) or b'{"errno": 0, "what": "the child died"}')
    if "files" in reply:
        return reply["files"]
    err = reply["errno"]
    if err == errno.ENODEV:
        raise TracefsError("this kernel has no tracefs (CONFIG_TRACING is off)",
                           hint="mace needs a kernel built with tracepoints")
    if err in (errno.EPERM, errno.EACCES):
        raise TracefsError("tracefs is not mounted and mace may not mount it",
                           hint="run as root, or mount it: mount -t tracefs nodev /sys/kernel/tracing")
    raise TracefsError(f"cannot mount tracefs: {reply['what']}",
                       hint="mount it: mount -t tracefs nodev /sys/kernel/tracing")


def _child_mount_and_read(paths: list[str]) -> dict[str, str | None]:
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # make every mount private first, or the tracefs mount would propagate back
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    target = STANDARD_PATHS[0] if os.path.isdir(STANDARD_PATHS[0]) else "/tmp"
    if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount -t tracefs nodev {target}")
    return _read_all(Path(target), paths)


def _read_all(root: Path, paths: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for path in paths:
        try:
            out[path] = (root / path).read_text()
        except FileNotFoundError:
            out[path] = None
    return out


def _event_file(qualified: str, name: str) -> str:
    system, _, event = qualified.partition(":")
    return f"events/{system}/{event}/{name}"


def read_tracefs(paths: list[str]) -> dict[str, str | None]:
    """Files under the tracefs root (e.g. "events/net/net_dev_xmit/enable"), None where
    absent: from the mounted tracefs, or through a private mount (see _read_privately)."""
    found = _mounted_tracefs()
    if found is not None:
        return _read_all(found, paths)
    return _read_privately(paths)


def read_format(root: Path, qualified: str) -> EventFormat:
    """Read `system:name` from a tracefs root."""
    system, _, name = qualified.partition(":")
    path = root / "events" / system / name / "format"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _missing(qualified) from None
    except PermissionError:
        raise TracefsError(f"cannot read {path}: permission denied",
                           hint="run as root or with CAP_PERFMON and read access to tracefs") from None
    return parse_format(text, system)


def read_formats(names: list[str]) -> dict[str, EventFormat]:
    """Formats of several tracepoints.  Uses the mounted tracefs, or reads them through a
    private mount that disappears with the child that made it."""
    return read_formats_with(names, [])[0]


def read_formats_with(names: list[str], paths: list[str]) -> tuple[dict[str, EventFormat],
                                                                  dict[str, str | None]]:
    """read_formats, and in the same read the tracefs files `paths` (see read_tracefs):
    without a mounted tracefs, one private mount serves both."""
    found = _mounted_tracefs()
    if found is not None:
        return {n: read_format(found, n) for n in names}, _read_all(found, paths)
    files = _read_privately([_event_file(n, "format") for n in names] + list(paths))
    out = {}
    for name in names:
        text = files[_event_file(name, "format")]
        if text is None:
            raise _missing(name)
        out[name] = parse_format(text, name.partition(":")[0])
    return out, {p: files[p] for p in paths}


def _missing(qualified: str) -> TracepointMissing:
    return TracepointMissing(f"this kernel has no tracepoint {qualified}",
                             hint="mace needs the net and skb tracepoints (CONFIG_TRACEPOINTS, Linux >= 4.x)")


__all__ = ["Field", "EventFormat", "parse_format", "read_format", "read_formats", "read_formats_with",
           "read_tracefs"]
