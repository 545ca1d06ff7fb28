"""Sink modules and their explicit registry.

A sink is pure: it declares its limits, builds HTTP requests from a batch and classifies
responses; the shared delivery layer in ``router`` does all I/O. The registry below is the only
place the router learns which sinks exist (none are implemented yet; see sinks/README.md).
"""

from __future__ import annotations

#: name -> sink module path; filled as sinks land (segment, mixpanel, ga4, amplitude, slack).
REGISTRY: dict[str, str] = {}
