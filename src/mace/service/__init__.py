"""`mace serve` and its clients.

Kept empty on purpose: the client (`mace on|off|status|read`, inside containers) imports
`mace.service.client` and `mace.service.protocol` only, never the engine.
"""
