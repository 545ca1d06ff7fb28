"""Turning msgspec validation errors into (message, JSON path) pairs that name the field."""

from __future__ import annotations

import msgspec

_FIELD_LEADS = ("Object contains unknown field `", "Object missing required field `")


def validation_error_parts(exc: msgspec.ValidationError, prefix: str = "$") -> tuple[str, str]:
    """Split msgspec's ``"<message> - at `$.a.b`"`` into a plain message and a JSON path.

    msgspec reports a missing or unknown field at the enclosing object; the path returned points
    at the field itself (``$.ingest.prot``). ``prefix`` re-roots the path, for values decoded out
    of a larger document (``$[3]``).
    """
    message, _, where = str(exc).partition(" - at `")
    path = where.rstrip("`") if where else "$"
    if path.startswith("key` in `"):
        # msgspec's form for a bad mapping key: "... - at `key` in `$.a.b`".
        path = path.removeprefix("key` in `")
        message = f"{message} (a key)"
    for lead in _FIELD_LEADS:
        if message.startswith(lead):
            path = f"{path}.{message[len(lead) :].rstrip('`')}"
    if prefix != "$":
        path = prefix + path[1:]
    return message.replace("`", ""), path
