"""Targets: what to trace, from a user's TARGET to the devices on the host."""
