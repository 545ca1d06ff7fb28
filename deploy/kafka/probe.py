#!/usr/bin/env python3
"""Readiness probe for the local Kafka broker: one real Metadata round trip, stdlib only.

An open TCP port is not readiness: a KRaft broker accepts connections before it has registered
with its controller and been unfenced, and until then clients get empty metadata. This probe
speaks just enough of the Kafka wire protocol to ask the broker itself:

1. ``ApiVersions`` v0 -- every broker accepts v0 (and a broker that does not support the version
   asked for still answers in v0 with its ranges), so it tells us which ``Metadata`` versions
   this broker serves without guessing. Kafka 4.0 removed old protocol versions (KIP-896), so a
   fixed old version could stop working on a later broker.
2. ``Metadata`` at the highest version both sides support (this file implements v1-v13), with an
   empty topic list so the answer stays small.

The broker counts as ready when the Metadata response lists at least one broker (only registered,
unfenced brokers are listed) and names a controller id >= 0.

Usage::

    probe.py [--host 127.0.0.1] [--port PORT] [--wait SECONDS] [--timeout SECONDS] [-q]

``--port`` defaults to ``$KAFKA_PORT`` or 19092. Without ``--wait`` the probe tries once; with it,
it retries until the broker is ready or the time is up. Exit status: 0 ready, 1 not ready,
2 usage error. On success one summary line goes to stdout (unless ``-q``); reasons for failure go
to stderr.

Used by ``kafkactl`` (start/status); runs with the system ``python3``, so no third-party imports.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass

API_METADATA = 3
API_VERSIONS = 18

# Metadata versions this probe can encode and decode. v9+ use the "flexible" encoding (compact
# strings/arrays, tagged fields, request header v2, response header v1).
METADATA_MIN_IMPL = 1  # v0 cannot express "no topics" (an empty list means all topics)
METADATA_MAX_IMPL = 13
METADATA_FIRST_FLEXIBLE = 9

CLIENT_ID = "kafkactl-probe"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # guard against reading garbage from a non-Kafka listener


class ProbeError(Exception):
    """The broker did not give a usable answer; the message says why."""


@dataclass
class Broker:
    node_id: int
    host: str
    port: int


@dataclass
class MetadataResult:
    version: int
    brokers: list[Broker]
    cluster_id: str | None
    controller_id: int


# --- encoding ------------------------------------------------------------------------------------


def _uvarint(value: int) -> bytes:
    """Unsigned varint (protobuf style), used by the flexible encoding for lengths and tags."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _request_header(api_key: int, api_version: int, correlation_id: int, flexible: bool) -> bytes:
    # Header v1: api_key, api_version, correlation_id, client_id (nullable int16-length string;
    # the client id stays a classic string even in header v2). Header v2 adds empty tagged fields.
    client_id = CLIENT_ID.encode()
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    if flexible:
        header += _uvarint(0)
    return header


def _metadata_body(version: int) -> bytes:
    flexible = version >= METADATA_FIRST_FLEXIBLE
    # Topics: an empty (non-null) array = "no topics": we only need the broker list and controller.
    body = _uvarint(0 + 1) if flexible else struct.pack(">i", 0)
    if version >= 4:
        body += b"\x00"  # allow_auto_topic_creation = false
    if 8 <= version <= 10:
        body += b"\x00"  # include_cluster_authorized_operations = false
    if version >= 8:
        body += b"\x00"  # include_topic_authorized_operations = false
    if flexible:
        body += _uvarint(0)  # no tagged fields
    return body


# --- decoding ------------------------------------------------------------------------------------


class _Reader:
    """Cursor over one response frame; every read checks bounds so a short frame is an error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProbeError(f"truncated response (need {n} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int16(self) -> int:
        return int.from_bytes(self._take(2), "big", signed=True)

    def int32(self) -> int:
        return int.from_bytes(self._take(4), "big", signed=True)

    def uvarint(self) -> int:
        shift = result = 0
        while True:
            byte = self._take(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 28:
                raise ProbeError("malformed varint")

    def string(self, flexible: bool) -> str | None:
        # Classic: int16 length, -1 = null. Compact: uvarint length+1, 0 = null.
        length = self.uvarint() - 1 if flexible else self.int16()
        return None if length < 0 else self._take(length).decode("utf-8", "replace")

    def array_len(self, flexible: bool) -> int:
        # Classic: int32 count, -1 = null. Compact: uvarint count+1, 0 = null.
        return self.uvarint() - 1 if flexible else self.int32()

    def skip_tagged_fields(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self._take(self.uvarint())  # size, then the value we do not need


# --- transport -----------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _round_trip(sock: socket.socket, header: bytes, body: bytes, correlation_id: int) -> bytes:
    """Send one size-prefixed request; return the response frame after its correlation id."""
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    if not 4 <= size <= MAX_RESPONSE_BYTES:
        raise ProbeError(f"implausible response size {size} (not a Kafka listener?)")
    frame = _recv_exact(sock, size)
    (got,) = struct.unpack(">i", frame[:4])
    if got != correlation_id:
        raise ProbeError(f"correlation id mismatch: sent {correlation_id}, got {got}")
    return frame[4:]


def _metadata_range(sock: socket.socket) -> tuple[int, int]:
    """ApiVersions v0 -> (min, max) Metadata version supported by the broker."""
    frame = _round_trip(sock, _request_header(API_VERSIONS, 0, 1, flexible=False), b"", 1)
    r = _Reader(frame)
    error = r.int16()
    if error != 0:
        raise ProbeError(f"ApiVersions error code {error}")
    for _ in range(r.int32()):
        key, lo, hi = r.int16(), r.int16(), r.int16()
        if key == API_METADATA:
            return lo, hi
    raise ProbeError("broker does not advertise the Metadata API")


def fetch_metadata(host: str, port: int, timeout: float) -> MetadataResult:
    """Connect, negotiate a Metadata version, and decode brokers / cluster id / controller id."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        lo, hi = _metadata_range(sock)
        version = min(hi, METADATA_MAX_IMPL)
        if version < max(lo, METADATA_MIN_IMPL):
            raise ProbeError(
                f"no common Metadata version (broker {lo}-{hi}, probe "
                f"{METADATA_MIN_IMPL}-{METADATA_MAX_IMPL})"
            )
        flexible = version >= METADATA_FIRST_FLEXIBLE
        header = _request_header(API_METADATA, version, 2, flexible)
        frame = _round_trip(sock, header, _metadata_body(version), 2)

    r = _Reader(frame)
    if flexible:
        r.skip_tagged_fields()  # response header v1 carries tagged fields after the correlation id
    if version >= 3:
        r.int32()  # throttle_time_ms
    brokers = []
    for _ in range(max(r.array_len(flexible), 0)):
        node_id = r.int32()
        broker_host = r.string(flexible) or ""
        broker_port = r.int32()
        r.string(flexible)  # rack (v1+)
        if flexible:
            r.skip_tagged_fields()
        brokers.append(Broker(node_id, broker_host, broker_port))
    cluster_id = r.string(flexible) if version >= 2 else None
    controller_id = r.int32()
    # The rest (topics, authorized operations, top-level error) is not needed for readiness.
    return MetadataResult(version, brokers, cluster_id, controller_id)


def probe_once(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """(ready, human-readable detail) for a single attempt; never raises for broker trouble."""
    try:
        md = fetch_metadata(host, port, timeout)
    except (OSError, ProbeError) as exc:
        return False, f"{host}:{port}: {exc}"
    if not md.brokers:
        return (
            False,
            f"{host}:{port}: metadata lists no brokers yet (broker not registered/unfenced)",
        )
    if md.controller_id < 0:
        return False, f"{host}:{port}: metadata has no controller id yet"
    listed = ",".join(f"{b.node_id}@{b.host}:{b.port}" for b in md.brokers)
    return True, (
        f"ready {host}:{port} brokers=[{listed}] controller={md.controller_id} "
        f"cluster_id={md.cluster_id} metadata_v={md.version}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KAFKA_PORT", "19092")))
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="retry until ready or this many seconds have passed (default: try once)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="socket timeout per attempt (default 3)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="pause between attempts with --wait (default 0.5)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing, just set the exit status"
    )
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.wait
    while True:
        ready, detail = probe_once(args.host, args.port, args.timeout)
        if ready:
            if not args.quiet:
                print(detail)
            return 0
        if time.monotonic() + args.interval > deadline:
            if not args.quiet:
                print(f"not ready: {detail}", file=sys.stderr)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
