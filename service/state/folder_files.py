"""Durable state of the dropped files being worked on (CONTRACT §7), one directory per
file under ``<state_dir>/folders/<key>/``:

* ``meta.json``: what the file is (inbox path, handler, claimed source) and its state:
  ``reading`` (claimed: being moved into ``inbox/.processing/`` and read) → ``prepared``
  (read and validated, items maybe partly published) → ``accepted`` (every item PubAck'ed
  by intake). Written atomically.
* ``manifest.tsv``: one line per record in input order, ``<n>\\t<key>\\t<item JSON>``;
  ``key`` is the item id, or ``!<n>`` for a record that failed locally.
* ``spool.tsv``: ``<key>\\t<result event JSON>``, appended (and fsynced) as results arrive;
  the first line for a key wins.
* ``dlq.jsonl``: DLQ entries of the records that failed locally (each bounded, see
  :func:`service.core.events.fitted_entry`).
* ``intake.tsv``: ``<key>\t<intake stream seq>``, appended (and fsynced) as intake
  PubAcks arrive: results are matched to the intake message they answer.

State files are 0600 and state folders 0700; results files 0640 in 0750 folders, created
without following symbolic links (:mod:`service.state.safe_paths`). The manifest is
written by :func:`service.sources.folders.read.prepare`.

The folder feature is local by nature (inbox and outbox are local directories), so its
bookkeeping lives beside them rather than in JetStream; every file here is either
written atomically or append-only with duplicates ignored, so a SIGKILL at any point
leaves something the next start can finish (docs/folders.md)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from service.state.safe_paths import (
    RESULTS_FILE_MODE,
    STATE_DIR_MODE,
    atomic_write,
    display,
    open_dir,
    private_open,
    replace_at,
)

READING = "reading"
PREPARED = "prepared"
ACCEPTED = "accepted"


@dataclass
class FileMeta:
    key: str
    rel: str  # path relative to the inbox, as dropped
    handler: str
    source: str  # where the claimed file waits: inbox/.processing/<key>/<name>
    received_at: str
    state: str = READING
    records: int = 0
    errors: int = 0
    moved_to: str | None = None  # where the source went in inbox/.done/


class FileState:
    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key
        self.meta_path = self.dir / "meta.json"
        self.manifest = self.dir / "manifest.tsv"
        self.spool = self.dir / "spool.tsv"
        self.dlq = self.dir / "dlq.jsonl"
        self.intake = self.dir / "intake.tsv"

    def make(self) -> None:
        self.dir.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        self.dir.mkdir(mode=STATE_DIR_MODE, exist_ok=True)

    def save(self, meta: FileMeta) -> None:
        atomic_write(self.meta_path, json.dumps(asdict(meta)).encode())

    def record_intake(self, seqs: list[tuple[str, int]]) -> None:
        """Remember the intake message of each published item; durable when this returns."""
        if not seqs:
            return
        with private_open(self.intake, "ab") as f:
            f.write(b"".join(f"{key}\t{seq}\n".encode() for key, seq in seqs))
            f.flush()
            os.fsync(f.fileno())

    def intake_seqs(self) -> dict[str, int] | None:
        """Item id → the intake seq its result must answer (the last one recorded); None
        for a state written before intake seqs were recorded (results match by id)."""
        try:
            f = self.intake.open("rb")
        except FileNotFoundError:
            return None
        with f:
            out: dict[str, int] = {}
            for line in f:
                key, _, seq = line.rstrip(b"\n").partition(b"\t")
                if line.endswith(b"\n") and seq.isdigit():
                    out[key.decode()] = int(seq)
            return out

    def load(self) -> FileMeta | None:
        try:
            return FileMeta(**json.loads(self.meta_path.read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def append(self, lines: list[tuple[str, bytes]]) -> None:
        """Append results to the spool; durable when this returns."""
        with private_open(self.spool, "ab") as f:
            for key, event in lines:
                f.write(key.encode() + b"\t" + event.replace(b"\n", b" ") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def spooled(self) -> set[str]:
        if not self.spool.exists():
            return set()
        with self.spool.open("rb") as f:
            return {line.split(b"\t", 1)[0].decode() for line in f if line.endswith(b"\n")}

    def waiting(self) -> list[str]:
        """Item ids of the manifest whose result is not spooled yet."""
        done = self.spooled()
        with self.manifest.open("rb") as f:
            keys = (line.split(b"\t", 2)[1].decode() for line in f)
            return [key for key in keys if not key.startswith("!") and key not in done]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_chunk(f: BinaryIO, limit: int) -> list[tuple[int, str, bytes]]:
    """Up to ``limit`` manifest lines that carry an item: (n, id, item JSON)."""
    out: list[tuple[int, str, bytes]] = []
    for line in f:
        n, key, payload = line.rstrip(b"\n").split(b"\t", 2)
        if payload:
            out.append((int(n), key.decode(), payload))
        if len(out) >= limit:
            break
    return out


def write_results(state: FileState, root: Path, parts: tuple[str, ...], name: str) -> dict[str, int]:
    """Write the results file ``root/<parts...>/name`` in input order, atomically;
    returns counts by outcome. The folders below ``root`` are created (0750) and never
    followed when they are symbolic links (:class:`UnsafePathError`)."""
    index: dict[bytes, tuple[int, int]] = {}
    with state.spool.open("rb") as spool:
        offset = 0
        for line in spool:
            key, _, rest = line.partition(b"\t")
            if line.endswith(b"\n") and key not in index:
                index[key] = (offset + len(key) + 1, len(rest))
            offset += len(line)
    counts = {"items": 0, "ok": 0, "error": 0, "cached": 0}
    with open_dir(root, parts) as folder:

        def lines(out: IO[bytes]) -> None:
            with state.manifest.open("rb") as manifest, state.spool.open("rb") as spool:
                for line in manifest:
                    key = line.split(b"\t", 2)[1]
                    if key not in index:
                        raise RuntimeError(f"no result for {key.decode()} in {state.dir}")
                    spool.seek(index[key][0])
                    data = spool.read(index[key][1])
                    out.write(data)
                    event = json.loads(data)
                    counts["items"] += 1
                    counts["ok" if event.get("status") == "ok" else "error"] += 1
                    counts["cached"] += bool(event.get("cached"))

        replace_at(folder, name, lines, RESULTS_FILE_MODE)
    return counts


def progress(root: Path) -> list[dict[str, Any]]:
    """Every file still in the daemon's hands, from its durable state under ``root``
    (``state_dir/folders``): name, handler, state, total records and results in. Read
    without a daemon, so ``enrichd status`` on the same host shows it."""
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        state = FileState(root, entry.name)
        meta = state.load()
        if meta is None:
            continue
        done = len(state.spooled()) if meta.state == ACCEPTED else 0
        out.append(
            {
                "file": display(meta.rel),
                "handler": meta.handler,
                "state": meta.state,
                "total": meta.records,
                "done": min(done, meta.records),
                "received_at": meta.received_at,
            }
        )
    return out
