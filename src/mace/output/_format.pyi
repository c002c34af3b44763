"""Type stubs for the compiled report formatter (mace/output/_format.pyx)."""

from collections.abc import Sequence

from typing_extensions import Buffer

DEBUG: bool
"""Built with MACE_DEBUG=1: invariant checks abort the process on a fault."""
FORMATS: dict[str, int]
"""The formats a Formatter writes: "mace", "jsonl", "csv"."""
DIRECTIONS: tuple[str, str]
REPORT_SIZE: int
"""Bytes of one packed report (mace.output.report.REPORT_FORMAT)."""

class Formatter:
    def __init__(self, fmt: str, wall_offset_ns: int, *, hops: bool = False,
                 hop_names: tuple[Sequence[bytes], Sequence[bytes]] = ((), ())) -> None: ...
    @property
    def targets(self) -> int: ...
    def add_target(self, text: bytes) -> int: ...
    def format(self, data: Buffer, out: bytearray, target: int = -1) -> int: ...
