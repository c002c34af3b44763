"""Pieces of the live view that need no terminal."""

from mace.output.live import EGRESS_SEGMENTS, INGRESS_SEGMENTS, segment_names, segments, sparkline
from mace.plan import ContainerPath, Plan


def test_sparkline_scales_between_min_and_max_and_leaves_gaps():
    assert sparkline([1, 2, 3, None, 8]) == "▁▂▃ █"
    assert sparkline([None, None]) == "  "
    assert sparkline([5, 5]) == "▁▁"


def test_segments_follow_the_hops_and_merge_unseen_steps():
    # egress with every hop: six segments that add up to the latency
    segs = segments(0, (1000, 3000, 6000, 8000, 10000), 12000)
    assert segs == [1000, 2000, 3000, 2000, 2000, 2000] and len(segs) == len(EGRESS_SEGMENTS)
    # without --hops the unseen steps' time lands in the next segment
    assert segments(0, (None, 3000, None, None, 10000), 12000) == [None, 3000, None, None, 7000, 2000]
    assert segments(1, (None, None, 4000, None), 9000) == [None, None, 4000, None, 5000]
    # the socket segment goes on to the socket
    assert segments(1, (500, 1000, 4000, 4200, 5000), 9000) == [500, 500, 3000, 200, 800, 4000]
    assert len(INGRESS_SEGMENTS) == 6


def test_the_segments_shown_are_the_plans():
    web = ContainerPath("web", "eth0", "veth1a", "br0", "/sys/fs/cgroup/unified/web")
    device = segment_names(Plan([web], "up0"))
    assert device == (EGRESS_SEGMENTS[:-1], INGRESS_SEGMENTS[:-1])
    eg, ing = segment_names(Plan([web], "up0", end_at_queue=False, segment="socket"))
    assert eg[0] == "container stack" and eg[1:] == EGRESS_SEGMENTS[1:] and ing == INGRESS_SEGMENTS
