"""Sink modules and their explicit registry.

A sink is pure: it declares its limits, builds HTTP requests from a batch and classifies
responses; the shared delivery layer in ``router`` does all I/O. This registry is the only place
the router learns which sinks exist: ``OUTPUTS`` (what each sink's rules may produce) and
``FACTORIES`` (how to build a sink from its settings). Plugins (the ``plugins`` setting) add
sinks with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from router.delivery.sink import Sink, tuned_limits
from router.rules.outputs import SinkOutputs
from sinks import amplitude, ga4, mixpanel, segment, slack

_BUILT_IN = (segment, mixpanel, ga4, amplitude, slack)
#: The sinks that ship with the router (plugins may register more at run time).
BUILT_IN: tuple[str, ...] = tuple(module.OUTPUTS.sink for module in _BUILT_IN)
#: sink name -> what its rules may produce.
OUTPUTS: dict[str, SinkOutputs] = {module.OUTPUTS.sink: module.OUTPUTS for module in _BUILT_IN}
#: sink name -> factory taking the sink's settings (``sinks.<name>`` in the config).
FACTORIES: dict[str, Callable[[Mapping[str, Any]], Sink]] = {
    module.OUTPUTS.sink: module.create for module in _BUILT_IN
}


def load_plugins(modules: Sequence[str]) -> None:
    """Import the ``plugins`` setting's modules; each registers its sinks on import.

    ValueError names the module that cannot be imported (a typo, an empty or relative name).
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, ValueError, TypeError) as exc:
            raise ValueError(f"plugins: cannot import {module!r}: {exc}") from None


def register(
    outputs: SinkOutputs, factory: Callable[[Mapping[str, Any]], Sink] | None = None
) -> None:
    OUTPUTS[outputs.sink] = outputs
    if factory is not None:
        FACTORIES[outputs.sink] = factory


def create(name: str, config: Mapping[str, Any]) -> Sink:
    """Build sink ``name`` from ``sinks.<name>``; its ``delivery`` section tunes the limits."""
    factory = FACTORIES.get(name)
    if factory is None:
        known = ", ".join(sorted(FACTORIES)) or "none yet"
        raise LookupError(f"no sink transport named {name!r} (sinks with a transport: {known})")
    own = {key: value for key, value in config.items() if key != "delivery"}
    sink = factory(own)
    if "delivery" in config:
        sink.limits = tuned_limits(sink.limits, config["delivery"], f"sinks.{name}.delivery")
    return sink
