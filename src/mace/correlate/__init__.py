"""Correlation: the compiled correlator that pairs a packet's events into latency reports."""
