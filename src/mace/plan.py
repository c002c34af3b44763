"""The event plan: which tracepoints to open on which devices, and how the correlator reads
them, for a set of containers behind one uplink.

What is measured, per packet:

- egress: from `netif_rx_entry` on the container's host-side veth (veth_xmit hands the
  packet over there, inside the container's own transmit call) to `net_dev_queue` on the
  host's uplink, where the packet enters the uplink's qdisc: the host's own (native)
  traffic waits in that qdisc too, so the wait is not what isolation adds, and ending
  there also holds for uplinks where segmentation replaces the skb before the driver sees
  it.  `end_at_queue=False` ends at `net_dev_start_xmit` there, MACE's end (the qdisc wait
  is then part of the expense).  The veth's name is unique on
  the host, so no other container's transmits pass the kernel's filter and each packet
  is attributed from its first event; with `start_at_veth=False` the start is
  `net_dev_start_xmit` on the inner device, the original plan, for veths with XDP or GRO,
  which skip netif_rx;
- ingress: from `netif_receive_skb` on the uplink to `netif_receive_skb` on the
  container's inner device.

Inner device names are ambiguous (every container has an eth0), so a packet is attributed
to a container by its host-side veth, whose name is unique on the host.  The events in
between make the chain safe against skb address reuse (see mace.correlate._correlate):

    egress   [xmit inner]  netif_rx veth  receive veth  [receive bridge]  queue uplink  xmit uplink
    ingress  receive uplink  [xmit bridge]  xmit veth  [netif_rx inner]  receive inner

Bracketed steps are traced only with `hops`, except xmit inner: it is the start with
`start_at_veth=False`, and netif_rx veth then a hop.  The others are the minimum for a safe chain,
and already split the expense in two (egress: before/after the veth's backlog, then the
uplink's qdisc; ingress: routing and bridge, then the container's backlog).  kfree_skb is
traced so that a packet dropped on the way ends its entry.

The kernel compares a hit's device name with each name of a filter in turn, for every hit
of the tracepoint: a filter of many veths is costly, and a page of filter text holds about
160 names.  Past GLOB_FROM veths, a prefix they share (veth<hex>) stands for them in the
filter; devices that share it but are not traced are then sampled too, and decode as
DEV_OTHER: a packet is still attributed by the exact name of its veth.  Names that no
prefix covers are spread over as many perf events of the tracepoint as the page requires
(see mace.capture.perf.Probe.filters).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from mace.capture.perf import GLOB_CHARS, Probe
from mace.correlate import _correlate
from mace.defaults import SEGMENTS

XMIT = "net:net_dev_start_xmit"
RECV = "net:netif_receive_skb"
RX = "net:netif_rx_entry"      # netif_rx with the protocol: the veth start must know it
QUEUE = "net:net_dev_queue"
FREE = "skb:kfree_skb"
ROUTE = "fib:fib_table_lookup"
READY = "sock:sk_data_ready"
RECEIVED = "sock:sock_recv_length"
AF_INET, AF_INET6 = 2, 10
STREAMS = (6, 132, 262)        # TCP, SCTP, MPTCP: their receives take bytes, not packets
LOOPBACK_IFINDEX = 1        # the input of every output route lookup (ip_route_output_key_hash)

# Filters name veths one by one up to this many, then by a prefix they share (veth_prefixes);
# groups are formed by their first PREFIX_KEY characters
GLOB_FROM = 32
PREFIX_KEY = 3

# report hop slots (the correlator's HOP_SLOTS per direction)
EGRESS_HOPS = ("veth rx", "veth backlog", "bridge", "route", "uplink queue")
INGRESS_HOPS = ("route", "bridge", "veth", "container rx")
# the socket segment: egress's first slot is the container's own stack (the send call to
# its veth); ingress goes on past the container's device to its socket
SOCKET_INGRESS_HOPS = (*INGRESS_HOPS, "container receive")


def hop_names(segment: str = "device") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The hop slots of each direction's reports."""
    return EGRESS_HOPS, SOCKET_INGRESS_HOPS if segment == "socket" else INGRESS_HOPS


@dataclass(frozen=True)
class ContainerPath:
    """One monitored container as the host sees it."""

    label: str               # how reports name it (the --netns argument, a namespace name)
    inner: str               # its device inside the container, e.g. eth0
    veth: str                # the host-side peer of that device (unique on the host)
    bridge: str | None = None
    cgroup: str | None = None  # its processes' cgroup (v2 directory): the socket segment's


@dataclass
class Plan:
    """What to trace for a list of containers behind one uplink.

    A container may be None: an index that is not in use (a service keeps each enabled
    container at one index while others come and go).  `devices` are the device slots; see
    `rebased` for keeping them stable across plans."""

    containers: list[ContainerPath | None]
    uplink: str
    hops: bool = False
    end_at_queue: bool = True
    start_at_veth: bool = True
    # more devices the containers' traffic may leave the host by (a second NIC, policy
    # routing, an overlay): each is an uplink like `uplink`, which reports name first
    extra_uplinks: tuple[str, ...] = ()
    # the host's interface index of each uplink (uplinks order): what tells the forward
    # route lookups of the containers' packets from the host's own (see probes)
    uplink_indexes: tuple[int, ...] = ()
    # "device" (between the container's device and the uplink) or "socket" (MACE's: from
    # its process's send call to the uplink's transmit, and back to its receive call)
    segment: str = "device"
    devices: list[str | None] = field(init=False)

    def __post_init__(self):
        if not self.active:
            raise ValueError("a plan needs at least one container")
        if self.segment not in SEGMENTS:
            raise ValueError(f"segment {self.segment!r}: one of {', '.join(SEGMENTS)}")
        if self.socket:
            if not self.start_at_veth:
                raise ValueError("the socket segment starts egress at the veth (start_at_veth)")
            for _, c in self.active:
                if not c.cgroup:
                    raise ValueError(f"{c.label}: the socket segment needs its cgroup")
        veths = [c.veth for _, c in self.active]
        if len(set(veths)) != len(veths):
            raise ValueError("two containers share a host-side veth")
        self.extra_uplinks = tuple(u for u in dict.fromkeys(self.extra_uplinks) if u != self.uplink)
        for u in self.uplinks:
            if u in veths:
                raise ValueError(f"the uplink {u} is a container's veth")
        self.devices = self._needed()

    def _needed(self) -> list[str]:
        names: list[str] = []
        active = [c for _, c in self.active]
        for n in (*(c.inner for c in active), *(c.veth for c in active), *self.bridges, *self.uplinks):
            if n not in names:
                names.append(n)
        return names

    @property
    def active(self) -> list[tuple[int, ContainerPath]]:
        """(index, container) of the indexes in use."""
        return [(i, c) for i, c in enumerate(self.containers) if c is not None]

    @property
    def uplinks(self) -> tuple[str, ...]:
        return (self.uplink, *self.extra_uplinks)

    @property
    def bridges(self) -> list[str]:
        return list(dict.fromkeys(c.bridge for _, c in self.active if c.bridge))

    @property
    def inner_names(self) -> list[str]:
        return list(dict.fromkeys(c.inner for _, c in self.active))

    @property
    def socket(self) -> bool:
        return self.segment == "socket"

    @property
    def cgroups(self) -> tuple[str, ...]:
        """The containers' cgroups (the socket segment's events are bound to them)."""
        return tuple(dict.fromkeys(c.cgroup for _, c in self.active if c.cgroup))

    def same_shape(self, other: Plan) -> bool:
        """Whether `other` traces the same tracepoints the same way (only containers differ)."""
        return ((self.uplinks, self.hops, self.end_at_queue, self.start_at_veth, self.segment)
                == (other.uplinks, other.hops, other.end_at_queue, other.start_at_veth, other.segment))

    def rebased(self, previous: Plan) -> Plan:
        """This plan with the device slots of `previous` kept where the name is still
        needed: a correlator reconfigured between the two then reads every slot the same way
        before and after, except slots that changed hands (see Correlator.reconfigure)."""
        needed = self._needed()
        slots: list[str | None] = [n if n in needed else None for n in previous.devices]
        for name in needed:
            if name in slots:
                continue
            if None in slots:
                slots[slots.index(None)] = name
            else:
                slots.append(name)
        out = Plan(list(self.containers), self.uplink, self.hops, self.end_at_queue, self.start_at_veth,
                   self.extra_uplinks, self.uplink_indexes, self.segment)
        out.devices = slots
        return out

    def probes(self, formats: dict | None = None) -> list[Probe]:
        """The tracepoints and in-kernel device filters this plan needs, nothing more.

        With the tracepoints' `formats`, kfree_skb is also filtered in the kernel: frees for
        want of a socket end every locally delivered datagram's life (each ping reply), and
        never a packet on its way through the host."""
        veths = tuple(c.veth for _, c in self.active)
        inner = tuple(self.inner_names)
        bridges = tuple(self.bridges) if self.hops else ()
        uplink = () if self.end_at_queue else self.uplinks
        # Starting egress at the host-side veth leaves every container's inner xmit out of
        # the kernel's filter: other containers' egress is never sampled.
        starts = () if self.start_at_veth else inner
        probes = [
            self._probe(XMIT, starts + veths + bridges + uplink),
            self._probe(RECV, self.uplinks + veths + inner + bridges),
            Probe(QUEUE, devices=self.uplinks),
            Probe(FREE, condition=_free_condition(formats)),
        ]
        if self.hops or self.start_at_veth:
            probes.append(self._probe(RX, veths + (inner if self.hops else ())))
        if self.route:
            probes.append(self.route_probe())
        if self.socket:
            probes += self.socket_probes()
        return probes

    def socket_probes(self) -> list[Probe]:
        """The socket segment's events: each traced container's send calls (entry and exit)
        and receive calls, bound to its cgroup, so no other process's calls are sampled; and
        every socket's data_ready (it runs in whatever context receives the packet, so it
        cannot be bound: an IPv4 or IPv6 socket's)."""
        cgroups = self.cgroups
        calls = [Probe(f"syscalls:sys_{way}_{c}", cgroups=cgroups)
                 for way in ("enter", "exit") for c in _correlate.SEND_CALLS]
        # Streams are not paired (a receive takes bytes, not a packet): neither their
        # data_ready (every TCP segment the host receives, for any socket) nor their
        # receives are sampled, nor those of unix and netlink sockets.  A container's packet
        # that went to a stream is unpaired when its call chain ends without a data_ready.
        datagrams = (f"(family == {AF_INET} || family == {AF_INET6}) && "
                     + " && ".join(f"protocol != {p}" for p in STREAMS))
        # A receive that took no datagram (an error, EAGAIN of a non-blocking poll), only
        # peeked or read the error queue is left out in the kernel: ping with an interval at
        # or under a tick spins on MSG_DONTWAIT receives between probes: ~900 per probe here,
        # each a sample for the ring and the correlator if it passed.
        taken = f"ret >= 0 && !(flags & {socket.MSG_PEEK | socket.MSG_ERRQUEUE})"
        return [*calls, Probe(READY, condition=datagrams),
                Probe(RECEIVED, cgroups=cgroups, condition=f"{datagrams} && {taken}")]

    @property
    def route(self) -> bool:
        """Whether the routing decision is timed (a hop of both directions): with hops."""
        return self.hops

    def route_probe(self) -> Probe:
        """fib:fib_table_lookup for the decisions of the containers' own packets, and as few
        others as its fields allow.  Its record has no skb and only the route's device
        (`name`) and input (`iif`): the correlator times with it the one call chain its CPU
        is in (see Correlator._route).
        - egress: the forward lookup towards an uplink.  The host's own packets look up
          the same device, but an output route's input is the loopback index, and a reply
          to the host comes in on the uplink: their lookups stay out;
        - ingress: a lookup whose route is a container's bridge, or its veth where there is
          none (routed, as Calico), which replies to the host never take."""
        ours = tuple(dict.fromkeys(c.bridge or c.veth for _, c in self.active))
        names = " || ".join(f'name == "{u}"' for u in self.uplinks)
        inputs = " && ".join(f"iif != {i}" for i in (LOOPBACK_IFINDEX, *self.uplink_indexes))
        probe = self._probe(ROUTE, ours)
        return Probe(ROUTE, devices=probe.devices, prefixes=probe.prefixes,
                     extra_terms=(f"(({names}) && {inputs})",), extra_devices=self.uplinks,
                     condition="err == 0")

    def _probe(self, tracepoint: str, devices: tuple[str, ...]) -> Probe:
        # Many veths in one filter cost every hit of the tracepoint a comparison each: past
        # GLOB_FROM of them, a prefix they share stands for them (see veth_prefixes), unless
        # it would also pass a device of the plan that this tracepoint must not sample.
        devices = _unique(devices)
        traced = set(devices)
        others = [n for n in self.devices if n is not None and n not in traced]
        veths = [c.veth for _, c in self.active]
        return Probe(tracepoint, devices=devices, prefixes=veth_prefixes(veths, others))

    def device_classes(self) -> tuple[list[int], list[int]]:
        """Per device slot: class bits and the container whose veth it is (-1)."""
        classes = [0] * len(self.devices)
        owner = [-1] * len(self.devices)
        slot = {n: i for i, n in enumerate(self.devices) if n is not None}
        C = _correlate.CLASSES
        for i, c in self.active:
            classes[slot[c.inner]] |= C["inner"]
            classes[slot[c.veth]] |= C["veth"]
            owner[slot[c.veth]] = i
            if c.bridge:
                classes[slot[c.bridge]] |= C["bridge"]
        for u in self.uplinks:
            classes[slot[u]] |= C["uplink"]
        return classes, owner

    def inner_slots(self) -> list[int]:
        """Per container index, the slot of its inner device (-1 for an unused index)."""
        return [-1 if c is None else self.devices.index(c.inner) for c in self.containers]

    def correlator(self, probes: list[Probe], *, table_size: int = 65536,
                   max_age_ns: int = 1_000_000_000, ncpu: int = 256,
                   report_cap: int = _correlate.REPORT_CAP,
                   bridge: bool | None = None) -> _correlate.Correlator:
        """A correlator reading events of `probes` (in that kind order) for this plan.

        bridge: whether bridge steps may appear (default: some container has a bridge); a
        plan that will gain containers later passes True, the steps are optional."""
        classes, owner = self.device_classes()
        kinds = [_correlate.TYPES.get(p.tracepoint, 0) for p in probes]
        return _correlate.Correlator(
            kinds, classes, owner, self.inner_slots(), table_size=table_size,
            max_age_ns=max_age_ns, hops=self.hops,
            bridge=bool(self.bridges) if bridge is None else bridge,
            end_at_queue=self.end_at_queue, ncpu=ncpu, report_cap=report_cap,
            veth_start=self.start_at_veth, route=self.route, socket=self.socket)

    def samples_per_packet(self) -> dict[str, int]:
        """By direction, the events of one reported packet's chain (see the module's table):
        what mace samples per packet it reports, at the least."""
        bridge = bool(self.bridges)
        veth_start = getattr(self, "start_at_veth", False)
        route = getattr(self, "route", False)
        socket = getattr(self, "socket", False)
        egress = (0 if veth_start else 1)                   # xmit inner
        egress += 1 if self.hops or veth_start else 0       # netif_rx veth
        egress += 1 + (self.hops and bridge)                # receive veth, receive bridge
        egress += route                                     # the routing decision
        egress += 1 + (not self.end_at_queue)               # queue uplink, xmit uplink
        # receive uplink, route, xmit bridge, xmit veth, netif_rx inner, receive inner
        ingress = 1 + route + (self.hops and bridge) + 1 + self.hops + 1
        # the socket segment: the send call's entry and exit; data_ready and the receive
        egress += 2 * socket
        ingress += 2 * socket
        return {"egress": int(egress), "ingress": int(ingress)}


def veth_prefixes(veths, exclude=(), least: int | None = None) -> tuple[str, ...]:
    """Name prefixes that stand for the host-side veths in a device filter (Probe.prefixes):
    for each group of at least `least` veths whose names begin alike (the same first
    PREFIX_KEY characters, as Docker's and Podman's veth<hex>, Calico's cali<hex>), the
    longest prefix the whole group shares, unless a name in `exclude` starts with it.
    `least` defaults to GLOB_FROM.

    Why: the kernel compares a hit's device name with each name of a filter in turn, about
    30 ns a name here, for every hit of the tracepoint on any device and in every segment
    it measures; a sample costs about 1 µs (benchmarks/sample_cost.py, name filters).  Past
    about 30 names, a prefix that passes the group's veths (one comparison), and with them
    whichever other devices share it, costs less even if every hit were on another device.
    Those others decode as DEV_OTHER, which attributes nothing: a report's container is
    still found by the exact name of its veth."""
    least = GLOB_FROM if least is None else least
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(veths):
        if len(name) > PREFIX_KEY and not any(ch in GLOB_CHARS for ch in name):
            groups.setdefault(name[:PREFIX_KEY], []).append(name)
    out = []
    for names in groups.values():
        if len(names) < least:
            continue
        prefix = os.path.commonprefix(names)
        if not any(x.startswith(prefix) for x in exclude):
            out.append(prefix)
    return tuple(out)


def _free_condition(formats: dict | None) -> str | None:
    fmt = (formats or {}).get(FREE)
    no_socket = fmt.symbol("reason", "NO_SOCKET") if fmt is not None else None
    return None if no_socket is None else f"reason != {no_socket}"


def tracepoints(hops: bool, socket: bool = False) -> list[str]:
    """Every tracepoint a plan may open."""
    calls = [f"syscalls:sys_{way}_{c}" for way in ("enter", "exit") for c in _correlate.SEND_CALLS]
    return [XMIT, RECV, QUEUE, FREE, RX, *((ROUTE,) if hops else ()),
            *((*calls, READY, RECEIVED) if socket else ())]


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
