"""A minimal sink for testing the delivery layer: JSON arrays POSTed to a URL.

Loaded as a plugin (``plugins: [tests.fakes.fake_sink]``), it registers the sinks ``fake`` and
``fake2`` (two independent destinations, for isolation tests). Each item carries its idempotency
key; a 200 body ``{"rejected": {"<index>": "<reason>"}, "retry": [<index>...]}`` is a partial
success, as Mixpanel and Amplitude answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

import sinks
from router.delivery.sink import (
    HttpRequest,
    HttpResponse,
    Outcome,
    Partial,
    Prepared,
    SinkLimits,
    classify_by_status,
    json_items,
)
from router.events import Event
from router.rules.engine import Routed
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, nonempty

_encoder = msgspec.json.Encoder()


class FakeSink:
    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name = name
        self.url = str(config["url"])
        self.token = str(config.get("token", "fake-token"))
        self.limits = SinkLimits(
            max_events=int(config.get("max_events", 50)),
            max_bytes=int(config.get("max_bytes", 64 * 1024)),
            max_event_bytes=int(config.get("max_event_bytes", 16 * 1024)),
            linger_s=float(config.get("linger_s", 0.1)),
            rate_per_s=config.get("rate_per_s"),
            timeout_s=float(config.get("timeout_s", 2.0)),
            concurrency=int(config.get("concurrency", 2)),
        )

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared:
        if output.payload.get("name") == "unencodable":
            raise ValueError("the fake sink refuses this payload")
        if output.payload.get("name") == "crashing":  # a sink bug meeting an odd value
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        body = {"key": idempotency_key, "event_id": event.id, "rule": output.rule_id}
        return Prepared(_encoder.encode({**body, **output.payload}))

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        return [HttpRequest("POST", self.url, headers, json_items(items), tuple(range(len(items))))]

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        if response.body == b"classify-bug":  # a sink bug meeting an odd answer
            raise KeyError("validationMessages")
        if response.status == 200 and response.body.startswith(b"{"):
            answer = msgspec.json.decode(response.body)
            if answer.get("rejected") or answer.get("retry"):
                return Partial(
                    rejected={int(k): str(v) for k, v in answer.get("rejected", {}).items()},
                    retry=tuple(int(i) for i in answer.get("retry", [])),
                    reason="partial",
                )
        return classify_by_status(response)


def _outputs(name: str) -> SinkOutputs:
    return SinkOutputs(
        name,
        {
            "event": OutputKind(
                "event",
                {
                    "name": FieldSpec("string", nonempty),
                    "visitor": FieldSpec("string"),
                    "properties": FieldSpec("object"),
                },
                (("name",),),
            )
        },
    )


for _name in ("fake", "fake2"):
    sinks.register(_outputs(_name), lambda config, n=_name: FakeSink(n, config))
