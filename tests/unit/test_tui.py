"""Pieces of the live view that need no terminal."""

from mace.output.live import EGRESS_SEGMENTS, INGRESS_SEGMENTS, segments, sparkline


def test_sparkline_scales_between_min_and_max_and_leaves_gaps():
    assert sparkline([1, 2, 3, None, 8]) == "▁▂▃ █"
    assert sparkline([None, None]) == "  "
    assert sparkline([5, 5]) == "▁▁"


def test_segments_follow_the_hops_and_merge_unseen_steps():
    # egress with every hop: five segments that add up to the latency
    segs = segments(0, (1000, 3000, 6000, 10000), 12000)
    assert segs == [1000, 2000, 3000, 4000, 2000] and len(segs) == len(EGRESS_SEGMENTS)
    # without --hops the unseen steps' time lands in the next segment
    assert segments(0, (None, 3000, None, 10000), 12000) == [None, 3000, None, 7000, 2000]
    assert segments(1, (None, 4000, None), 9000) == [None, 4000, None, 5000]
    assert len(INGRESS_SEGMENTS) == 4
