"""mace's benchmark and evaluation suite: `python -m benchmarks [NAME ...] [--quick]`."""
