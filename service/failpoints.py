"""Named crash points for the crash tests: when ``ENRICHD_FAILPOINT`` names a point, the
process kills itself with SIGKILL on reaching it (after ``ENRICHD_FAILPOINT_AFTER``
earlier hits). Unset in production, where :func:`hit` is a dictionary lookup."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def hit(name: str) -> None:
    if os.environ.get("ENRICHD_FAILPOINT") != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] > int(os.environ.get("ENRICHD_FAILPOINT_AFTER", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
