"""HMAC-SHA256 webhook signatures: parsing, rotation, raw-bytes semantics."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from router.signature import parse_signature, sign, verify

BODY = b'{"event_type": "guide.viewed", "timestamp": "2024-01-15T14:30:00Z", "data": {}}'


def test_sign_matches_a_plain_hmac() -> None:
    assert sign(b"k", BODY) == "sha256=" + hmac.new(b"k", BODY, hashlib.sha256).hexdigest()


def test_verify_accepts_any_configured_secret() -> None:
    digest = parse_signature(sign(b"new", BODY))
    assert digest is not None
    assert verify([b"old", b"new"], BODY, digest)
    assert verify([b"new"], BODY, digest)
    assert not verify([b"old"], BODY, digest)
    assert not verify([], BODY, digest)


def test_tampered_or_reserialised_body_fails() -> None:
    digest = parse_signature(sign(b"k", BODY))
    assert digest is not None
    assert not verify([b"k"], BODY.replace(b"viewed", b"viewer"), digest)
    assert not verify([b"k"], BODY.replace(b", ", b","), digest)  # same JSON, other spacing
    assert not verify([b"k"], BODY + b"\n", digest)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha1=" + "0" * 40,
        "sha256=" + "0" * 63,
        "sha256=" + "0" * 65,
        "sha256=" + "g" * 64,
        "sha256=" + "é" * 64,
        "v1," + "0" * 64,
        "0" * 64,
    ],
)
def test_malformed_headers_parse_to_none(header: str | None) -> None:
    assert parse_signature(header) is None


def test_prefix_and_hex_are_case_insensitive() -> None:
    value = sign(b"k", BODY)
    digest = parse_signature("SHA256=" + value[7:].upper())
    assert digest is not None
    assert verify([b"k"], BODY, digest)
