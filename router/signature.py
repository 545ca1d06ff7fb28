"""Webhook signature verification: HMAC-SHA256 over the exact request bytes.

Pendo's header is ``X-Pendo-Signature: sha256=<hex>``. The MAC is computed over the body bytes as
received (after transport decompression), never over re-serialised JSON: a parse-then-re-encode
changes spacing and key order and would either reject genuine webhooks or, worse, let a different
body verify. Every configured secret is tried (rotation) with constant-time comparison.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

_PREFIX = "sha256="
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGEST_HEX_LEN = hashlib.sha256().digest_size * 2


def parse_signature(header: str | None) -> bytes | None:
    """Return the digest of ``sha256=<64 hex>``; None when the header is absent or malformed."""
    if header is None:
        return None
    value = header.strip()
    if value[: len(_PREFIX)].lower() != _PREFIX:
        return None
    hex_part = value[len(_PREFIX) :]
    if len(hex_part) != _DIGEST_HEX_LEN or not _HEX.issuperset(hex_part):
        return None
    return bytes.fromhex(hex_part)


def sign(secret: bytes, body: bytes) -> str:
    """The header value a sender computes; used by tests, the README example and the benchmark."""
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secrets: Sequence[bytes], body: bytes, digest: bytes) -> bool:
    """True when ``digest`` is HMAC-SHA256(secret, body) for any of ``secrets``."""
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).digest()
        # No early exit: the time taken does not reveal which secret matched.
        matched |= hmac.compare_digest(expected, digest)
    return matched
