"""Test support that ships (mace demo builds a testbed): throwaway topologies, synthetic
ring images, the pure-Python reference model and tracepoint formats captured on a kernel."""
