"""Stages that remember they are done: a rerun reuses them, a settings change redoes them.

Each stage of the demo is a function run through :meth:`StageRunner.run` with the settings it
depends on. Its *key* hashes those settings and the keys of the stages it builds on, so a
changed setting invalidates that stage and everything downstream. The runner keeps one marker
per stage, ``<out>/stages/<name>.json``: written with ``"done": false`` when the stage starts,
rewritten with its summary, wall time, CPU time and load average when it ends. On a rerun:

* marker done, same key, outputs present → *reused* (the stage is skipped, and says so);
* same key, not done (the run was killed) → the stage runs again; a *resumable* stage keeps its
  partial outputs (the tracks build and mining resume), any other stage starts clean;
* another key → the stage's outputs are deleted and it runs from scratch.

CPU time counts this process and its finished children (``getrusage``), so a stage whose CPU
time is well below ``threads × wall`` waited for a busy machine.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quari.errors import DataError
from quari.fileio import atomic_write, read_json

__all__ = ["StageRecord", "StageRunner", "stage_key"]

MARKERS = "stages"


def stage_key(settings: dict[str, Any], parents: Sequence[str] = ()) -> str:
    """sha256 of a stage's settings and its parents' keys (the order of ``parents`` counts)."""
    text = json.dumps({"settings": settings, "parents": list(parents)}, sort_keys=True,
                      default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class StageRecord:
    """What one stage did in this run.

    Attributes:
        name: Stage name (``tracks``, ``index`` …).
        title: What it does, for people.
        key: Its settings key.
        reused: Skipped because an earlier run finished it with the same key.
        wall_s: Wall-clock seconds (of the run that computed it, when reused).
        cpu_s: CPU seconds of this process and its children (likewise).
        load: 1-minute load average at its start and end (likewise).
        summary: The stage's own account (counts, metrics, files).
        finished: When it finished (UTC, ISO 8601).
    """

    name: str
    title: str
    key: str
    reused: bool
    wall_s: float
    cpu_s: float
    load: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: str = ""


class StageRunner:
    """Runs stages in one output folder, reusing what is done (module docstring).

    Args:
        out: The output folder (the markers go to ``<out>/stages``).
        echo: Prints one line for people.
        total: Number of stages (for ``[i/n]`` in the messages).
    """

    def __init__(self, out: Path, echo: Callable[[str], None], total: int) -> None:
        self.out = Path(out)
        self.echo = echo
        self.total = total
        self.records: list[StageRecord] = []
        self.keys: dict[str, str] = {}

    def _marker(self, name: str) -> Path:
        return self.out / MARKERS / f"{name}.json"

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self._marker(name)
        return read_json(path, DataError) if path.is_file() else None

    def _write(self, name: str, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, indent=1, default=str) + "\n"
        atomic_write(self._marker(name), lambda f: f.write(text.encode()))

    def run(
        self,
        name: str,
        title: str,
        settings: dict[str, Any],
        fn: Callable[[], dict[str, Any]],
        *,
        parents: Sequence[str] = (),
        outputs: Sequence[Path] = (),
        resumable: bool = False,
    ) -> dict[str, Any]:
        """Runs (or reuses) one stage.

        Args:
            name: Stage name (its marker file).
            title: What it does, for the messages.
            settings: JSON-ready values the stage's result depends on.
            fn: Does the work; returns the stage's summary (JSON-ready).
            parents: Names of the stages it builds on (run before, in this runner).
            outputs: Files and folders the stage writes (deleted when its settings change).
            resumable: Keep partial outputs of an interrupted run with the same key.

        Returns:
            The stage's summary (this run's, or the reused one).
        """
        key = stage_key(settings, [self.keys[p] for p in parents])
        self.keys[name] = key
        step = f"[{len(self.records) + 1}/{self.total}]"
        found = self._read(name)
        if (
            found is not None
            and found.get("key") == key
            and found.get("done")
            and all(Path(p).exists() for p in outputs)
        ):
            record = StageRecord(**{**found["record"], "reused": True})
            self.records.append(record)
            self.echo(
                f"{step} reused: {title} (done {record.finished}, took {record.wall_s:.0f} s)"
            )
            return record.summary
        if found is not None and (found.get("key") != key or not resumable):
            if found.get("key") != key:
                self.echo(f"{step} settings changed since the last run: redoing {title}")
            for path in outputs:
                _remove(Path(path))
        self.echo(f"{step} {title} …")
        self._write(name, {"key": key, "done": False, "settings": settings})
        load0 = os.getloadavg()[0]
        wall0, cpu0 = time.perf_counter(), _cpu_seconds()
        summary = fn()
        record = StageRecord(
            name=name,
            title=title,
            key=key,
            reused=False,
            wall_s=round(time.perf_counter() - wall0, 2),
            cpu_s=round(_cpu_seconds() - cpu0, 2),
            load=[round(load0, 2), round(os.getloadavg()[0], 2)],
            summary=summary,
            finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        payload = {"key": key, "done": True, "settings": settings, "record": asdict(record)}
        self._write(name, payload)
        self.records.append(record)
        self.echo(f"{step} done: {title} in {record.wall_s:.0f} s (CPU {record.cpu_s:.0f} s)")
        return json.loads(json.dumps(summary, default=str))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
