"""Host isolation for containers: cgroups (v2 and v1), and the other per-container
sandboxes (network namespaces, segments, volumes) as they land.

Each part lives in its own subpackage; import what you use, e.g.
`from agent.isolation.cgroups import Cgroups`. Nothing here runs at import time.
"""
