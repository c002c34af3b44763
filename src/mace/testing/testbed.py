"""Throwaway container topologies in network namespaces, built with pyroute2.

topology="bridge" (the default), as Docker's default network::

    peer ns ("the internet")             host ns                       container ns (xN)
    m<tag>pe 198.19.0.2/24  <== veth ==>  m<tag>up 198.19.0.1/24
                                          m<tag>br 198.18.0.1/24  <-- m<tag>v<i> <== veth ==> eth0 198.18.0.<10+i>/24

topology="routed", as Calico: no bridge; each container has a /32 and a default route to
a gateway address (198.18.0.1) that exists nowhere, which the host-side veth answers ARP
for (proxy_arp); the host routes each container's /32 to its veth::

    peer ns                              host ns                       container ns (xN)
    m<tag>pe 198.19.0.2/24  <== veth ==>  m<tag>up 198.19.0.1/24
                                          198.18.0.<10+i>/32 dev m<tag>v<i> <== veth ==> eth0 198.18.0.<10+i>/32
                                                                                 default via 198.18.0.1 onlink

The "host" is a namespace of its own, so tests never touch the machine's real network.
Every link name but the containers' eth0 (and, if asked for, the peer's) carries a per-run
tag, so the names mace filters on in the kernel (which sees every namespace) cannot collide
with another run; the eth0s are deliberately ambiguous, as on a real container host, and
`peer_dev="eth0"` makes the next hop's device one more of them, as when it is another
machine's eth0.  Addresses come only from 198.18.0.0/15, the range reserved for
benchmarking (RFC 2544).

Teardown is guaranteed by the context manager, on SIGTERM (turned into SystemExit while a
testbed is up) and, for runs that were killed outright, by `remove_stale()`.

Example::

    with Testbed(containers_n=2, masquerade=True, topology="routed") as tb:
        out = tb.run(tb.containers[0].ns, ["ping", "-c", "3", "-i", "0.2", tb.peer_ip])
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns

NS_PREFIX = "mace-tb"
NS_RUN_DIR = "/run/netns"
HOST_NET = ipaddress.ip_network("198.18.0.0/24")     # bridge (or routed gateway), containers
PEER_NET = ipaddress.ip_network("198.19.0.0/24")     # host uplink <-> peer
# With ipv6=True the same layout is dual-stack, in the IPv6 benchmarking range (RFC 5180), the
# counterpart of 198.18.0.0/15: nothing outside the testbed's namespaces ever routes it.
HOST_NET6 = ipaddress.ip_network("2001:2:0:1::/64")
PEER_NET6 = ipaddress.ip_network("2001:2:0:2::/64")
_NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-([0-9a-f]+)-")
TOPOLOGIES = ("bridge", "routed")
IFNAMSIZ = 16
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253
CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)


BENCHMARK_NETS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:2::/48"))


def _host_net(containers_n: int) -> ipaddress.IPv4Network:
    """HOST_NET, or as much wider a network from the same start as `containers_n` containers
    need (addresses from .10 on), within 198.18.0.0/16: PEER_NET stays apart."""
    net = HOST_NET
    while int(net.network_address) + 10 + containers_n >= int(net.broadcast_address):
        if net.prefixlen <= 16:
            raise ValueError(f"{containers_n} containers do not fit 198.18.0.0/16")
        net = net.supernet()
    return net


def _in_benchmark_range(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in BENCHMARK_NETS)


@dataclass
class Container:
    """One container: its namespace, inner device, address and host-side veth."""

    index: int
    ns: str
    inner: str
    ip: str
    veth: str             # host-side name, unique per run
    ip6: str | None = None  # with Testbed(ipv6=True)
    cgroup: str | None = None   # with Testbed(cgroups=True): its processes' cgroup v2 directory


@dataclass
class Testbed:
    """A host namespace with a bridge (or routes), an uplink to a peer namespace, and N containers.

    containers_n: how many container namespaces (hundreds build in seconds; past 245 the
    containers' network, `host_net`, widens from 198.18.0.0/24 to /23 and beyond).
    masquerade: NAT the containers' traffic to the uplink address with nftables (then the
    peer has no route back to them).
    ipv6: dual-stack: IPv6 addresses and routes beside the IPv4 ones, forwarding on (off by
    default, IPv6 disabled, so router solicitations and MLD do not add traffic the tests did
    not send).  uplink_rate_kbit: a token-bucket qdisc limiting what the host
    sends on its uplink, so that packets queue there, many at a time.  topology: "bridge"
    (host-side veths enslaved to a bridge) or "routed" (Calico's layout: /32 routes and
    proxy ARP, no bridge; then `bridge` is None).  peer_dev: the name of the peer's end of
    the uplink (default m<tag>pe); it lives in the peer namespace only.  cgroups: each
    container's processes run in a cgroup of its own, as a runtime's do (the socket segment
    binds its events to it), under <cgroup v2 root>/mace-tb-<pid>-<tag>.  room: how many
    more add_container may add (the containers' network is sized for them too).
    """

    containers_n: int = 1
    masquerade: bool = False
    ipv6: bool = False
    uplink_rate_kbit: int = 0
    topology: str = "bridge"
    peer_dev: str | None = None
    cgroups: bool = False
    room: int = 0
    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    containers: list[Container] = field(default_factory=list)

    def __post_init__(self):
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, not {self.topology!r}")
        if self.peer_dev is not None and not 0 < len(self.peer_dev) < IFNAMSIZ:
            raise ValueError(f"peer_dev {self.peer_dev!r} is not a valid interface name")
        base = f"{NS_PREFIX}-{os.getpid()}-{self.tag}"
        self.host_ns = f"{base}-host"
        self.peer_ns = f"{base}-peer"
        self.bridge: str | None = f"m{self.tag}br" if self.topology == "bridge" else None
        self.uplink = f"m{self.tag}up"
        self.peer_dev = self.peer_dev or f"m{self.tag}pe"
        self.host_ip = str(PEER_NET.network_address + 1)
        self.peer_ip = str(PEER_NET.network_address + 2)
        self.host_net = _host_net(self.containers_n + self.room)
        self.gateway = str(self.host_net.network_address + 1)
        self.host_ip6 = str(PEER_NET6.network_address + 1) if self.ipv6 else None
        self.peer_ip6 = str(PEER_NET6.network_address + 2) if self.ipv6 else None
        self.gateway6 = str(HOST_NET6.network_address + 1) if self.ipv6 else None
        self._made: list[str] = []
        self._cgroups: list[str] = []      # directories made, parents first
        self._old_term = None
        self._owner = os.getpid()
        self._procs: list[subprocess.Popen] = []
        for i in range(self.containers_n):
            self.containers.append(Container(
                index=i, ns=f"{base}-c{i}", inner="eth0",
                ip=str(self.host_net.network_address + 10 + i), veth=f"m{self.tag}v{i}",
                ip6=str(HOST_NET6.network_address + 10 + i) if self.ipv6 else None))
        for addr in (self.host_ip, self.peer_ip, self.gateway, *(c.ip for c in self.containers),
                     *(a for a in (self.host_ip6, self.peer_ip6, self.gateway6, *(c.ip6 for c in self.containers))
                       if a)):
            assert _in_benchmark_range(addr), addr

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        self._old_term = signal.getsignal(signal.SIGTERM)
        if self._old_term in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _TermToExit(self._owner))
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.teardown()
        return False

    def build(self) -> None:
        for c in self.containers:
            self._cgroup(c)
        for ns in (self.host_ns, self.peer_ns, *(c.ns for c in self.containers)):
            _create_ns(ns)
            self._made.append(ns)
            if self.ipv6:
                # A link-local address is tentative for DAD's second after its link comes up,
                # and the kernel sends no neighbour solicitation without one: a packet would
                # wait for the retransmit timer, which no call chain of its own leads to.
                # Hosts that carry containers finished DAD long ago.
                for conf in ("all", "default"):
                    self.sysctl(ns, f"net/ipv6/conf/{conf}/accept_dad", "0")
        with _netlink(self.ns_path(self.host_ns)) as host:
            _up(host, "lo")
            if self.bridge is not None:
                br = self._build_bridge(host)
            host.link("add", ifname=self.uplink, kind="veth",
                      peer={"ifname": self.peer_dev, "net_ns_fd": self.peer_ns})
            up = _index(host, self.uplink)
            host.addr("add", index=up, address=self.host_ip, prefixlen=PEER_NET.prefixlen)
            host.link("set", index=up, state="up")
            for c in self.containers:
                # one request each: created enslaved and up
                host.link("add", ifname=c.veth, kind="veth", state="up",
                          peer={"ifname": c.inner, "net_ns_fd": c.ns},
                          **({"master": br} if self.bridge is not None else {}))
                if self.bridge is None:
                    host.route("add", dst=f"{c.ip}/32", oif=_index(host, c.veth), scope=RT_SCOPE_LINK)
            host.route("add", dst="default", gateway=self.peer_ip)
            if self.uplink_rate_kbit:
                host.tc("add", "tbf", index=up, handle="1:", rate=f"{self.uplink_rate_kbit}kbit",
                        burst=16384, latency="500ms")
        with _netlink(self.ns_path(self.peer_ns)) as peer:
            _up(peer, "lo")
            p = _index(peer, self.peer_dev)
            peer.addr("add", index=p, address=self.peer_ip, prefixlen=PEER_NET.prefixlen)
            peer.link("set", index=p, state="up")
            if not self.masquerade:
                peer.route("add", dst=str(self.host_net), gateway=self.host_ip)
        for c in self.containers:
            with _netlink(self.ns_path(c.ns)) as cr:
                _up(cr, "lo")
                i = _index(cr, c.inner)
                if self.bridge is not None:
                    cr.addr("add", index=i, address=c.ip, prefixlen=self.host_net.prefixlen)
                    cr.link("set", index=i, state="up")
                    cr.route("add", dst="default", gateway=self.gateway)
                else:
                    # The gateway is on no subnet of the container's: onlink makes it reachable
                    # on eth0 all the same, and the host's proxy ARP answers for it.
                    cr.addr("add", index=i, address=c.ip, prefixlen=32)
                    cr.link("set", index=i, state="up")
                    cr.route("add", dst="default", gateway=self.gateway, oif=i, flags=RTNH_F_ONLINK)
        self.sysctl(self.host_ns, "net/ipv4/ip_forward", "1")
        if self.bridge is None:
            for c in self.containers:
                self.sysctl(self.host_ns, f"net/ipv4/conf/{c.veth}/proxy_arp", "1")
                # ARP requests are broadcasts, which proxy ARP answers only after a random delay
                # of up to proxy_delay (0.8 s): a container's first packet would wait that long.
                # Calico sets it to 0 too.
                self.sysctl(self.host_ns, f"net/ipv4/neigh/{c.veth}/proxy_delay", "0")
        if self.ipv6:
            self._address_ipv6()
        else:
            for ns in self._made:
                self.sysctl(ns, "net/ipv6/conf/all/disable_ipv6", "1")
                self.sysctl(ns, "net/ipv6/conf/default/disable_ipv6", "1")
        if self.masquerade:
            self.nft(self.host_ns,
                     "table ip mace_nat {\n"
                     "  chain post { type nat hook postrouting priority srcnat; policy accept;\n"
                     f'    oifname "{self.uplink}" masquerade\n'
                     "  }\n}\n")

    def add_container(self) -> Container:
        """One more container on the bridge of a built testbed, made as a runtime makes one
        (its veth created in the host namespace, the peer moved into a new namespace), torn
        down with the testbed.  IPv4 only."""
        if self.bridge is None or self.ipv6:
            raise ValueError("add_container is for the IPv4 bridge topology")
        i = max((c.index for c in self.containers), default=-1) + 1
        c = Container(index=i, ns=f"{self.host_ns.removesuffix('-host')}-c{i}", inner="eth0",
                      ip=str(self.host_net.network_address + 10 + i), veth=f"m{self.tag}v{i}")
        if not (_in_benchmark_range(c.ip) and ipaddress.ip_address(c.ip) in self.host_net):
            raise ValueError(f"no address left for container {i}: make the testbed with room=")
        self._cgroup(c)
        _create_ns(c.ns)
        self._made.append(c.ns)
        for conf in ("all", "default"):
            self.sysctl(c.ns, f"net/ipv6/conf/{conf}/disable_ipv6", "1")
        with _netlink(self.ns_path(self.host_ns)) as host:
            host.link("add", ifname=c.veth, kind="veth", state="up",
                      peer={"ifname": c.inner, "net_ns_fd": c.ns}, master=_index(host, self.bridge))
        with _netlink(self.ns_path(c.ns)) as cr:
            _up(cr, "lo")
            e = _index(cr, c.inner)
            cr.addr("add", index=e, address=c.ip, prefixlen=self.host_net.prefixlen)
            cr.link("set", index=e, state="up")
            cr.route("add", dst="default", gateway=self.gateway)
        self.containers.append(c)
        return c

    def _cgroup(self, c: Container) -> None:
        if not self.cgroups:
            return
        from mace.targets.cgroups import v2_root
        root = v2_root()
        if root is None:
            raise RuntimeError("no cgroup v2 hierarchy is mounted: Testbed(cgroups=True) needs one")
        base = os.path.join(root, f"{NS_PREFIX}-{os.getpid()}-{self.tag}")
        if not self._cgroups:
            os.mkdir(base)
            self._cgroups.append(base)
        c.cgroup = os.path.join(base, f"c{c.index}")
        os.mkdir(c.cgroup)
        self._cgroups.append(c.cgroup)

    def remove_container(self, c: Container) -> None:
        """The container's namespace goes, and its veth pair with it (a container stopped)."""
        netns.remove(c.ns)
        self._made.remove(c.ns)
        self.containers.remove(c)

    def _address_ipv6(self) -> None:
        """The IPv4 layout again in IPv6; addresses are added `nodad` so that they work at once
        instead of after duplicate address detection's second."""
        if self.bridge is None:
            raise ValueError("ipv6 is built for the bridge topology only")
        self.sysctl(self.host_ns, "net/ipv6/conf/all/forwarding", "1")
        nodad = 0x02  # IFA_F_NODAD
        with _netlink(self.ns_path(self.host_ns)) as host:
            host.addr("add", index=_index(host, self.bridge), address=self.gateway6,
                      prefixlen=HOST_NET6.prefixlen, flags=nodad)
            host.addr("add", index=_index(host, self.uplink), address=self.host_ip6,
                      prefixlen=PEER_NET6.prefixlen, flags=nodad)
            host.route("add", dst="::/0", gateway=self.peer_ip6, family=10)
        with _netlink(self.ns_path(self.peer_ns)) as peer:
            peer.addr("add", index=_index(peer, self.peer_dev), address=self.peer_ip6,
                      prefixlen=PEER_NET6.prefixlen, flags=nodad)
            peer.route("add", dst=str(HOST_NET6), gateway=self.host_ip6, family=10)
        for c in self.containers:
            with _netlink(self.ns_path(c.ns)) as cr:
                cr.addr("add", index=_index(cr, c.inner), address=c.ip6,
                        prefixlen=HOST_NET6.prefixlen, flags=nodad)
                cr.route("add", dst="::/0", gateway=self.gateway6, family=10)

    def _build_bridge(self, host: IPRoute) -> int:
        host.link("add", ifname=self.bridge, kind="bridge")
        br = _index(host, self.bridge)
        # A bridge takes the lowest MAC of its ports unless given one, and changes it when
        # that port leaves: the containers' ARP entries for the gateway would go stale.
        host.link("set", index=br, address=f"02:6d:{int(self.tag, 16) >> 12 & 0xff:02x}:"
                                             f"{int(self.tag, 16) >> 4 & 0xff:02x}:00:01")
        host.addr("add", index=br, address=self.gateway, prefixlen=self.host_net.prefixlen)
        host.link("set", index=br, state="up")
        return br

    def teardown(self) -> None:
        """Remove every namespace this testbed made (their links go with them)."""
        if os.getpid() != self._owner:
            # A forked child (pyroute2 forks helpers) unwinding its copy of our stack must
            # not tear down the parent's testbed.
            return
        # A signal now would stop the removal half way: hold it until we are done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            for p in self._procs:       # a live process keeps its namespace alive
                if p.poll() is None:
                    p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._procs.clear()
            for ns in reversed(self._made):
                _remove_ns(ns)
            self._made.clear()
            for d in reversed(self._cgroups):
                _remove_cgroup(d)
            self._cgroups.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if self._old_term is not None:
            if isinstance(signal.getsignal(signal.SIGTERM), _TermToExit):
                signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    # -- helpers -----------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return list(self._made)

    def ns_path(self, ns: str) -> str:
        return os.path.join(NS_RUN_DIR, ns)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Write /proc/sys/<key> inside `ns` (sysctls under net/ are per namespace: /proc/sys/net
        shows the one of the thread that looks, see _inside)."""
        with _inside(self.ns_path(ns)):
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(f"{value}\n")

    def nft(self, ns: str, ruleset: str) -> None:
        if shutil.which("nft") is None:
            raise RuntimeError("nft not found: install the Debian package nftables")
        self.run(ns, ["nft", "-f", "-"], input=ruleset, check=True)

    def _in(self, ns: str, argv: Sequence[str]) -> list[str]:
        # nsenter rather than setns in preexec_fn, which is unsafe once threads run; a
        # container with a cgroup: the shell moves itself there, then becomes argv
        _check_argv(argv)
        cg = next((c.cgroup for c in self.containers if c.ns == ns and c.cgroup), None)
        join = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg] if cg else []
        return ["nsenter", f"--net={self.ns_path(ns)}", "--", *join, *argv]

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv inside network namespace `ns`; teardown kills it if still running."""
        p = subprocess.Popen(self._in(ns, argv), **kw)
        self._procs.append(p)
        return p

    def run(self, ns: str, argv: Sequence[str], *, timeout: float = 60, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside `ns` to completion (bounded by `timeout`), capturing its output."""
        return subprocess.run(self._in(ns, argv), capture_output=True, text=True,
                              timeout=timeout, check=check, input=input)


def _check_argv(argv: Sequence[str]) -> None:
    # Test traffic must stay in the benchmarking range: refuse any other literal address.
    for a in argv:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if not _in_benchmark_range(str(ip)):
            raise ValueError(f"testbed commands may only address 198.18.0.0/15 or 2001:2::/48, not {a}")


@contextlib.contextmanager
def _inside(path: str | None):
    """This thread in the network namespace at `path` (a new one: None) for the block, then
    back in its own.  A namespace switch is per thread (setns, unshare: CLONE_NEWNET), and
    costs microseconds where a helper process (nsenter, pyroute2's netns sockets) costs
    milliseconds, which a testbed of hundreds of containers pays several times each.
    Sockets made inside stay in that namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if path is None:
            if _LIBC.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        else:
            _setns(path)
        try:
            yield
        finally:
            if _LIBC.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                # this thread would go on in the wrong namespace: nothing may continue
                os.write(2, f"testbed: cannot return to the own network namespace: {os.strerror(err)}\n".encode())
                os._exit(70)
    finally:
        os.close(home)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _create_ns(name: str) -> None:
    """`ip netns add name`, without a helper process: a new namespace for this thread,
    bound where pyroute2 and iproute2 look for it (netns.attach does the bind mount)."""
    with _inside(None):
        netns.attach(name, "thread-self")


@contextlib.contextmanager
def _netlink(path: str):
    """An IPRoute in the namespace at `path`, this thread in there with it for the block
    (whenever pyroute2 opens its socket, it opens it there)."""
    with _inside(path), IPRoute() as ipr:
        yield ipr


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise RuntimeError(f"link {name} was not created")
    return found[0]


def _up(ipr: IPRoute, name: str) -> None:
    ipr.link("set", index=_index(ipr, name), state="up")


def _remove_ns(ns: str) -> None:
    try:
        netns.remove(ns)
    except FileNotFoundError:
        pass


class _TermToExit:
    """SIGTERM handler that unwinds (and so tears down) in the process that built the
    testbed only.  Forked children inherit handlers: pyroute2 stops its helper children
    with SIGTERM, and they must simply die."""

    def __init__(self, owner: int):
        self.owner = owner

    def __call__(self, signum, frame):
        if os.getpid() != self.owner:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)


def interrupt(p: subprocess.Popen, timeout: float = 5) -> None:
    """Stop a process as a user would (SIGINT, so it ends cleanly), killed if it has not
    ended within `timeout`; reaped either way."""
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _remove_cgroup(path: str) -> None:
    # its processes were killed: they leave it as they exit (rmdir waits for none of them);
    # a test may have made cgroups below it (a pod's containers), which go first
    try:
        children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        children = []
    for child in children:
        _remove_cgroup(child)
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:         # EBUSY: a process still exiting; a child directory
            time.sleep(0.02)


def remove_stale() -> list[str]:
    """Remove testbed namespaces (and cgroups) whose creating process is gone (a run killed
    by SIGKILL)."""
    removed = []
    for ns in netns.listnetns():
        m = _NS_RE.match(ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _remove_ns(ns)
            removed.append(ns)
    from mace.targets.cgroups import v2_root
    root = v2_root()
    for d in os.listdir(root) if root else ():
        m = re.match(rf"^{NS_PREFIX}-(\d+)-[0-9a-f]+$", d)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            base = os.path.join(root, d)
            _remove_cgroup(base)
            removed.append(base)
    return removed
