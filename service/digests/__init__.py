"""Digests (CONTRACT §15, docs/digests.md): at each window's end, the source's ok results
of that window (and group) become one item for the digest's handler, reduced
hierarchically when they do not fit one call, and one event on ``enrich.out.<digest>``."""
