"""Sink modules and their explicit registry.

A sink is pure: it declares its limits, builds HTTP requests from a batch and classifies
responses; the shared delivery layer in ``router`` does all I/O. This registry is the only place
the router learns which sinks exist. So far each sink module declares what its rules may produce
(``OUTPUTS``); transport arrives with the sink issues.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.rules.outputs import SinkOutputs
from sinks import amplitude, ga4, mixpanel, segment, slack

#: sink name -> what its rules may produce.
OUTPUTS: Mapping[str, SinkOutputs] = {
    module.OUTPUTS.sink: module.OUTPUTS for module in (segment, mixpanel, ga4, amplitude, slack)
}
