"""`mace serve` and its clients, a module per job.

- protocol: the wire format, shared by both sides;
- client: `mace on|off|status|read`, inside containers;
- queue: an enabled namespace's report queue;
- identity: who is calling (the socket's peer and its network namespace);
- engine: the thread that owns the tracer and changes its plan;
- server: the socket, the connections and the state kept across restarts.

Kept empty on purpose: the client imports `mace.service.client` and `mace.service.protocol`
only, never the engine (the compiled modules, pyroute2).
"""
