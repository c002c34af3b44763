"""Targets and topology: from `--netns TARGET` to the devices mace must watch.

A TARGET is a PID (any process inside the container), a namespace name as `ip netns`
lists it, a path to a namespace file (/proc/PID/ns/net, /run/netns/NAME, a container
runtime's netns path), or a container named through its runtime: `docker:web`,
`podman:ID`, `containerd:[NS/]ID`, `pod:[NS/]NAME[/CONTAINER]` (mace.targets.runtimes).
Discovery, with pyroute2, finds in the container its veth interfaces, the namespace holding
each veth's peer (the host), the peer's name there (the host-side veth), the bridge it is
enslaved to, and the host's uplink (the device of its default route, unless one is named).

Example::

    targets = [resolve("1234"), resolve("web")]
    topo = discover(targets)
    for line in topo.describe():
        print(line)      # netns 4026532281 (pid 1234): eth0 ⇄ vethab12 → br0 → eth1
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from mace.errors import TargetNotFound, TopologyError, UplinkMissing
from mace.plan import ContainerPath, Plan
from mace.targets import cgroups

NETNS_RUN_DIRS = ("/run/netns", "/var/run/netns")
NS_GET_NSTYPE = 0xB703          # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
NO_NSID = 0xFFFFFFFF            # RTM_GETNSID's answer for "no id assigned"
RUNTIME_PREFIXES = ("docker", "podman", "containerd", "pod")    # docker:web, ...


@dataclass(frozen=True)
class Target:
    """A network namespace to trace, as the user named it.

    A target named through a container runtime (`docker:web`, see mace.targets.runtimes)
    also carries what the runtime said about it, and the socket it was asked on: with the
    spec, that is what `runtimes.reresolve` needs to find it again after a restart."""

    spec: str               # what the user wrote
    path: str               # a file that refers to the namespace
    inode: int              # the namespace's identity (what `ls -i /proc/PID/ns/net` shows)
    pid: int | None = None
    name: str | None = None             # the container's name ("web"), the pod's for a pod
    runtime: str | None = None          # "docker", "podman", "containerd", "cri"
    container_id: str | None = None     # the full id (a pod's: its sandbox id)
    pod: str | None = None
    k8s_namespace: str | None = None
    runtime_socket: str | None = None   # the socket the runtime answered on
    shares: str | None = None           # the container whose network namespace this one joined

    @property
    def label(self) -> str:
        return self.name or self.spec

    def identity(self) -> dict | None:
        """What reports name the target by (mace.output.sinks): None for a PID or a
        namespace, which no runtime named."""
        if self.runtime is None:
            return None
        out = {"container": self.name}
        if self.pod is not None:
            out.update(pod=self.pod, k8s_namespace=self.k8s_namespace)
        return out


@dataclass
class VethLink:
    """One veth of a container and its peer on the host."""

    inner: str
    inner_index: int
    host_ns: str             # path of the namespace the peer lives in
    host_ns_inode: int
    veth: str                # host-side name
    veth_index: int
    bridge: str | None
    default_route: bool      # the container's default route leaves through it


@dataclass
class Container:
    target: Target
    links: list[VethLink]

    @property
    def main(self) -> VethLink:
        """The link that carries the container's default route (else its first veth)."""
        return next((l for l in self.links if l.default_route), self.links[0])


@dataclass
class Topology:
    containers: list[Container]
    host_ns: str
    host_ns_inode: int
    uplink: str
    uplink_index: int
    notes: list[str] = field(default_factory=list)
    extra_uplinks: tuple[str, ...] = ()
    # devices the host routes some traffic by that are not traced (named when packets
    # reach no traced uplink)
    other_routes: tuple[str, ...] = ()
    # interface index of each uplink (uplinks order), in the host namespace
    uplink_indexes: tuple[int, ...] = ()

    @property
    def uplinks(self) -> tuple[str, ...]:
        return (self.uplink, *self.extra_uplinks)

    def plan(self, *, hops: bool = False, end_at_queue: bool | None = None,
             start_at_veth: bool = True, segment: str = "device",
             cgroups: Sequence[str] | None = None) -> Plan:
        """The plan that traces these containers; the socket segment looks each one's cgroup
        up (mace.targets.cgroups.own_cgroup: refused where it has none of its own), unless
        `cgroups` gives them (a testbed's, before any process runs there).  Egress ends by
        default where the segment's does: the uplink's queue (device), its driver (socket)."""
        if end_at_queue is None:
            end_at_queue = segment != "socket"
        paths = [path_of(c, segment) if cgroups is None else dataclasses.replace(path_of(c), cgroup=cg)
                 for c, cg in zip(self.containers, cgroups or [None] * len(self.containers), strict=True)]
        return Plan(paths, self.uplink, hops=hops,
                    end_at_queue=end_at_queue, start_at_veth=start_at_veth,
                    extra_uplinks=self.extra_uplinks, uplink_indexes=self.uplink_indexes,
                    segment=segment)

    def describe(self) -> list[str]:
        out = []
        for c in self.containers:
            t = c.target
            who = f"pid {t.pid}" if t.pid else t.spec
            if t.runtime:       # netns 4026532281 (docker web, pid 1234, shared with db)
                shared = [f"shared with {t.shares}"] if t.shares else []
                who = ", ".join([f"{t.runtime} {t.label}", who, *shared])
            out.append(f"netns {t.inode} ({who}): {describe_path(c.main, '|'.join(self.uplinks))}")
        return out + self.notes

    def present(self) -> list[bool] | None:
        """Which containers still have their host-side veth (see present())."""
        return present(self.host_ns, [(c.main.veth, c.main.veth_index) for c in self.containers])


def path_of(c: Container, segment: str = "device") -> ContainerPath:
    """How a plan names container `c`: its devices, and for the socket segment its cgroup."""
    cgroup = None
    if segment == "socket":
        t = c.target
        # every process in its namespace (a pod's sandbox holds it, its containers' run
        # elsewhere), and the one it was named by
        pids = {*cgroups.pids_in_netns(t.inode), *((t.pid,) if t.pid else ())}
        cgroup = cgroups.own_cgroup(t.label, pids)
    return ContainerPath(c.target.label, c.main.inner, c.main.veth, c.main.bridge, cgroup)


def describe_path(path, uplink: str) -> str:
    """A container's path through the host, as mace prints it: `eth0 ⇄ vethab12 → br0 → eth1`.
    `path` has `inner`, `veth` and `bridge` (a VethLink, a ContainerPath)."""
    chain = [f"{path.inner} ⇄ {path.veth}"] + ([path.bridge] if path.bridge else []) + [uplink]
    return " → ".join(chain)


def _is_netns(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def resolve(spec: str, runtime_socket: str | None = None) -> Target:
    """Turn a PID, a namespace name, a namespace path or a runtime's container
    (`docker:web`, `podman:ID`, `containerd:[NS/]ID`, `pod:[NS/]NAME[/CONTAINER]`; see
    mace.targets.runtimes, which asks the runtime on `runtime_socket`) into a Target."""
    spec = spec.strip()
    if spec.partition(":")[0] in RUNTIME_PREFIXES:
        from mace.targets import runtimes  # imports this module; only runtime targets need it

        return runtimes.resolve(spec, runtime_socket)
    if spec.isdigit():
        pid = int(spec)
        path = f"/proc/{pid}/ns/net"
        if not os.path.exists(f"/proc/{pid}"):
            raise TargetNotFound(f"no process with PID {pid}",
                                 hint="give the PID of a process inside the container")
        if not _is_netns(path):
            raise TargetNotFound(f"cannot open the network namespace of PID {pid}",
                                 hint="run as root, or grant CAP_SYS_PTRACE")
        return Target(spec, path, os.stat(path).st_ino, pid)
    if "/" in spec:
        if not os.path.exists(spec):
            raise TargetNotFound(f"{spec} does not exist",
                                 hint="give /proc/PID/ns/net, /run/netns/NAME or a runtime's netns path")
        if not _is_netns(spec):
            raise TargetNotFound(f"{spec} is not a network namespace",
                                 hint="give /proc/PID/ns/net, /run/netns/NAME or a runtime's netns path")
        return Target(spec, spec, os.stat(spec).st_ino)
    for d in NETNS_RUN_DIRS:
        path = os.path.join(d, spec)
        if os.path.exists(path) and _is_netns(path):
            return Target(spec, path, os.stat(path).st_ino)
    raise TargetNotFound(f"no network namespace named {spec!r}",
                         hint="`ip netns list` shows the names; a PID or a path works too")


def _own_ns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def candidate_namespaces():
    """(path, inode) of every network namespace we can find, ours first, each once."""
    seen = set()
    paths = ["/proc/self/ns/net", "/proc/1/ns/net"]
    for d in NETNS_RUN_DIRS:
        try:
            paths += [os.path.join(d, n) for n in sorted(os.listdir(d))]
        except OSError:
            pass
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            paths.append(f"/proc/{pid}/ns/net")
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        yield p, st.st_ino


def _peer_namespace(ipr: IPRoute, nsid: int, likely: Sequence[tuple[str, int]] = ()) -> tuple[str, int] | None:
    """The namespace that the target's namespace calls `nsid`, asking those in `likely`
    first: the containers of one host share it, and a search through every namespace per
    container made discovery quadratic (82 s for 500 containers whose host namespace was
    a named one, listed after theirs)."""
    for path, inode in itertools.chain(likely, candidate_namespaces()):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            got = ipr.get_netnsid(fd=fd).get("nsid")
            # the namespace the path names now (a /proc/PID path may name another since)
            inode = os.fstat(fd).st_ino
        except Exception:       # noqa: BLE001 - a namespace that vanished meanwhile
            got = None
        finally:
            os.close(fd)
        if got == nsid:
            return path, inode
    return None


def _container(target: Target, hosts: HostViews) -> Container:
    if target.inode == _own_ns_inode():
        raise TopologyError(f"{target.spec} is mace's own network namespace, not a container's",
                            hint="give a PID or namespace of the container, not of the host")
    try:
        ipr = IPRoute(netns=target.path, flags=0)
    except OSError as e:
        raise TargetNotFound(f"cannot enter the network namespace of {target.spec}: {e.strerror}",
                             hint="run as root") from None
    links: list[VethLink] = []
    with ipr:
        default_oifs = {r.get("oif") for r in ipr.route("dump")
                        if r.get("dst_len") == 0 and r.get("table") == 254}
        for link in ipr.get_links():
            if link.get(("linkinfo", "kind")) != "veth" or link.get("link_netnsid") is None:
                continue
            peer = _peer_namespace(ipr, link.get("link_netnsid"), hosts.found)
            if peer is None:
                continue
            host_path, host_inode = peer
            hosts.found.setdefault(peer, None)
            hl = hosts.link(host_path, link.get("link"))
            if hl is None:
                continue
            m = hosts.link(host_path, hl.get("master")) if hl.get("master") else None
            bridge = m.get("ifname") if m else None
            links.append(VethLink(link.get("ifname"), link.get("index"), host_path, host_inode,
                                  hl.get("ifname"), hl.get("index"), bridge,
                                  link.get("index") in default_oifs))
    if not links:
        raise TopologyError(f"{target.spec} has no veth to another namespace",
                            hint="mace measures containers attached by veth pairs (Docker, Podman, "
                                 "CNI bridge/ptp); macvlan, ipvlan and host networking have no such path")
    return Container(target, links)


class HostViews:
    """What discovery reads of host namespaces, kept over the containers of one discovery,
    or over several discover() calls of one pass (`mace serve --all` asks one namespace at a
    time): a socket in each (entering a namespace costs pyroute2 a helper process, ~7 ms),
    its links and routes dumped once for the uplinks.  Made afresh for each pass, so it
    never outlives what it read; close() (or `with`) ends it."""

    def __init__(self):
        self.found: dict[tuple[str, int], None] = {}     # host namespaces seen, asked first
        self._sockets: dict[str, IPRoute] = {}
        self._links: dict[str, dict] = {}
        self._routes: dict[str, list] = {}

    def __enter__(self) -> HostViews:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ipr in self._sockets.values():
            ipr.close()
        self._sockets.clear()

    def socket(self, path: str) -> IPRoute:
        if path not in self._sockets:
            self._sockets[path] = IPRoute(netns=path, flags=0)
        return self._sockets[path]

    def links(self, path: str) -> list:
        if path not in self._links:
            self._links[path] = {l.get("index"): l for l in self.socket(path).get_links()}
        return list(self._links[path].values())

    def link(self, path: str, index: int):
        """One link by index, asked now, never from the dump: a container's veth may have
        been renamed or put on its bridge since (one starting during a long pass)."""
        found = self.socket(path).get_links(index)
        return found[0] if found else None

    def routes(self, path: str) -> list[tuple[int | None, int, int, bool]]:
        if path not in self._routes:
            self._routes[path] = _routes(self.socket(path))
        return self._routes[path]


def discover(targets: list[Target], uplink: str | Sequence[str] | None = None,
             hosts: HostViews | None = None) -> Topology:
    """Find every target's veth path to a common host namespace and that host's uplinks:
    the devices named (`--uplink`, repeatable), else every device of a default route, in any
    routing table, and every overlay device with routes.  `hosts`: the host views of a pass
    of several calls (the caller closes it); one of its own otherwise."""
    if hosts is None:
        with HostViews() as own:
            return discover(targets, uplink, own)
    if not targets:
        raise TopologyError("no target", hint="give at least one --netns")
    inodes = [t.inode for t in targets]
    if len(set(inodes)) != len(inodes):
        dup = next(t for t in targets if inodes.count(t.inode) > 1)
        raise TopologyError(f"{dup.spec} names a namespace given twice",
                            hint="give each container once")
    containers = [_container(t, hosts) for t in targets]
    ends = {c.main.host_ns_inode: c.main.host_ns for c in containers}
    if len(ends) > 1:
        raise TopologyError("the targets' veths lead to different host namespaces",
                            hint="trace containers of one host per mace process")
    host_inode, host_path = next(iter(ends.items()))
    notes = []
    for c in containers:
        if len(c.links) > 1:
            others = ", ".join(l.inner for l in c.links if l is not c.main)
            why = "which carries its default route" if c.main.default_route else "its first veth"
            notes.append(f"note: {c.target.spec} also has {others}; mace follows {c.main.inner}, {why}")
    named = [uplink] if isinstance(uplink, str) else list(uplink or [])
    links = hosts.links(host_path)
    names = {l.get("index"): l.get("ifname") for l in links}
    kinds = {l.get("index"): _kind(l) for l in links}
    every = hosts.routes(host_path)
    routes = [r for r in every if r[3]]     # the default ones
    by_name = {n: i for i, n in names.items()}
    if named:
        for n in named:
            if n not in by_name:
                raise UplinkMissing(f"the host has no device {n!r}",
                                    hint="`ip link` on the host lists its devices")
        uplinks = list(dict.fromkeys(named))
        why = {n: "named with --uplink" for n in uplinks}
    else:
        # every device a packet may leave the host by: default routes of any table (policy
        # routing, a second NIC), then overlays, which carry routes to other hosts' pods
        why = {}
        for table, family, oif, _ in routes:
            if oif in names and table is not None and names[oif] not in why:
                v = "IPv6 " if family == AF_INET6 else ""
                why[names[oif]] = (f"{v}default route" if table == MAIN_TABLE
                                   else f"{v}default route in table {table}")
        for index, kind in kinds.items():
            if kind in OVERLAY_KINDS and index in {oif for _, _, oif, _ in every}:
                why.setdefault(names[index], kind)
        if not why:
            raise UplinkMissing("the host has no default route to find its uplink by",
                                hint="name the uplink with --uplink DEV")
        uplinks = list(why)
    veths = {c.main.veth for c in containers}
    bridges = {c.main.bridge for c in containers}
    for u in uplinks:
        if u in veths:
            raise TopologyError(f"the uplink {u} is a container's veth",
                                hint="name the host's uplink with --uplink DEV")
        if u in bridges:
            raise TopologyError(f"the uplink {u} is the containers' bridge: their packets are "
                                "bridged, not routed through an uplink",
                                hint="name the bridge's physical port with --uplink DEV")
    if len(uplinks) > 1 or not named:
        notes.append("uplink" + ("s" if len(uplinks) > 1 else "") + ": "
                     + ", ".join(f"{u} ({why[u]})" for u in uplinks)
                     + ("" if named else " (choose with --uplink DEV, repeatable)"))
    traced = set(uplinks) | veths | bridges | {"lo"}
    others = tuple(dict.fromkeys(names[oif] for _, _, oif, _ in every
                                 if oif in names and names[oif] not in traced))
    return Topology(containers, host_path, host_inode, uplinks[0], by_name[uplinks[0]], notes,
                    tuple(uplinks[1:]), others, tuple(by_name[u] for u in uplinks))


MAIN_TABLE = 254
LOCAL_TABLE = 255
AF_INET, AF_INET6 = 2, 10
OVERLAY_KINDS = {"vxlan", "wireguard", "geneve", "ipip", "gre", "gretap", "sit", "ip6tnl", "ip6gre"}


def _routes(host) -> list[tuple[int | None, int, int, bool]]:
    """(table, family, device index, default?) of every route of the host outside the local
    table, main table first, IPv4 first."""
    out = []
    for family in (AF_INET, AF_INET6):
        for r in host.route("dump", family=family):           # every table
            table = r.get_attr("RTA_TABLE") or r.get("table")
            if table == LOCAL_TABLE:
                continue
            out += [(table, family, oif, r.get("dst_len") == 0) for oif in _oifs(r)]
    return sorted(out, key=lambda x: (x[0] != MAIN_TABLE, x[1] != AF_INET))


def _oifs(route) -> list[int]:
    oif = route.get_attr("RTA_OIF")
    if oif:
        return [oif]
    return [hop.get("oif") for hop in route.get_attr("RTA_MULTIPATH") or [] if hop.get("oif")]


def _kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def host_links(host_ns: str) -> set[tuple[str, int]] | None:
    """(name, interface index) of every link in the namespace at `host_ns`; None if it cannot
    be asked (a transient netlink failure is not a stop)."""
    try:
        # our own namespace (the usual case) without pyroute2's fork into another
        own = os.stat(host_ns).st_ino == os.stat("/proc/self/ns/net").st_ino
        with (IPRoute() if own else IPRoute(netns=host_ns, flags=0)) as ipr:
            return {(l.get("ifname"), l.get("index")) for l in ipr.get_links()}
    except Exception:       # noqa: BLE001 - a transient netlink failure is not a stop
        return None


def present(host_ns: str, veths: Sequence[tuple[str, int] | None]) -> list[bool | None] | None:
    """For each host-side veth (name, interface index), whether it is still there: a stopped
    container loses it; a new one may reuse the name, not the index.  None for an unused
    slot; None instead of a list if the host cannot be asked (nothing changed)."""
    links = host_links(host_ns)
    if links is None:
        return None
    return [None if v is None else tuple(v) in links for v in veths]
