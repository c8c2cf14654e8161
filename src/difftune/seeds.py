"""Seeds derived from a run's seed and a position, so any step, image or epoch can be replayed alone."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the SHA-256 of ``parts`` joined by ``/`` (e.g. ``derived_seed(seed, step, rank)``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
