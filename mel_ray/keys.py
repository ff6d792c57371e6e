"""Stable keys and seeds shared by the resumable stages (synthesize, extract-features, ...).

Python's `hash()` is salted per process, so everything here goes through sha256: the same inputs give the
same key and seed on every machine, worker and run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def settings_key(settings: dict[str, Any], length: int = 16) -> str:
    """Hex key of every setting that changes a stage's output; different settings never share a folder."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, e.g. stable_seed(global_seed, mention_id, view)."""
    blob = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "big") >> 1


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
