"""Capture: tracefs layouts, perf events (one ring per CPU) and the compiled ring reader."""
