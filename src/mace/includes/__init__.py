# C declarations (.pxd) and headers the compiled modules share: the perf ABI, the decoded
# event and the correlator's records.  Nothing to import from Python.
