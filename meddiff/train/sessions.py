"""The sessions that trained a run: which steps each ran, on what device, with how many CPU threads.

A run interrupted and resumed (Ctrl-C, a killed worker, another machine) is trained by several
sessions. On a CPU the intra-op thread count moves kernels' last bits (measured: 1 vs 2 threads differ
by 7.8e-6 in the EMA weights after 30 steps), and ``meddiff.threads`` sizes it by the machine's load
unless ``--threads`` pins it, so a checkpoint's bytes depend on the thread counts that reached it.
Each checkpoint's session record (``checkpoints/step-N.json``, beside the checkpoint, never inside it)
therefore lists those sessions, and the model card keeps the final list: reproducing the weights
means re-running with the threads it names.

A session entry::

    {"steps": [first, last], "device": "cpu", "device_name": "cpu", "world_size": 1,
     "cpu_threads": 2, "threads_source": "auto", "wall_time_s": 12.3}

``cpu_threads: None`` marks steps whose session was not recorded (checkpoints from before session
lists, or a writer killed between its checkpoint and its record).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meddiff.threads import ThreadPlan
from meddiff.train.checkpoint import session_record


def _unrecorded(step: int) -> list[dict[str, Any]]:
    return [{"steps": [0, step], "cpu_threads": None}] if step else []


@dataclass
class SessionLog:
    """This session and the recorded ones before it; :meth:`record` is a checkpoint's session record."""

    first_step: int  # the step this session started from (0: a fresh run)
    this: dict[str, Any]  # device, processes and CPU threads of this session
    earlier: list[dict[str, Any]] = field(default_factory=list)  # sessions that reached ``first_step``
    wall_before: float = 0.0  # their wall time (s)
    started: float = field(default_factory=time.time)  # time.time() when this session started

    @classmethod
    def start(cls, step: int, device: torch.device, world_size: int, threads: ThreadPlan,
              checkpoint: Path | None = None, state: dict[str, Any] | None = None) -> "SessionLog":
        """This session, resuming at ``step`` from ``checkpoint`` (None: a fresh run at step 0)."""
        this = {"device": str(device), "world_size": world_size, "cpu_threads": threads.threads,
                "threads_source": threads.source,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        if checkpoint is None:
            return cls(step, this)
        record = session_record(checkpoint)
        if not record.exists():  # killed between checkpoint and record (or from before records): wall time inside
            return cls(step, this, _unrecorded(step), float((state or {}).get("wall_time_s", 0.0)))
        rec = json.loads(record.read_text())
        return cls(step, this, rec.get("sessions", _unrecorded(step)), float(rec["wall_time_s"]))

    def wall_time(self) -> float:
        """Wall time of every session up to now (s)."""
        return self.wall_before + time.time() - self.started

    def sessions(self, step: int) -> list[dict[str, Any]]:
        """The sessions that reached ``step``; this one only if it ran a step."""
        if step <= self.first_step:
            return list(self.earlier)
        now = {"steps": [self.first_step, step], **self.this,
               "wall_time_s": round(time.time() - self.started, 3)}
        return [*self.earlier, now]

    def record(self, step: int) -> dict[str, Any]:
        """The session record of a checkpoint at ``step``."""
        return {"step": step, "wall_time_s": round(self.wall_time(), 3), "sessions": self.sessions(step)}


def describe(sessions: list[dict[str, Any]]) -> str:
    """The card's ``sessions`` on one line: ``steps 0–300 on cpu, 2 CPU threads (auto); …``."""
    parts = []
    for s in sessions:
        first, last = s["steps"]
        if s.get("cpu_threads") is None:
            parts.append(f"steps {first}–{last}: not recorded")
            continue
        procs = f" × {s['world_size']} processes" if s.get("world_size", 1) > 1 else ""
        threads = f"{s['cpu_threads']} CPU thread{'s' if s['cpu_threads'] != 1 else ''} ({s['threads_source']})"
        parts.append(f"steps {first}–{last} on {s.get('device_name') or s['device']}{procs}, {threads}")
    return "; ".join(parts)


def cpu_thread_counts(sessions: list[dict[str, Any]]) -> list[int | None]:
    """Distinct thread counts of the CPU sessions (None: a stretch not recorded): more than one means the
    weights are not what one re-run with ``--threads`` would write."""
    return sorted({s.get("cpu_threads") for s in sessions if s.get("device", "cpu") == "cpu"},
                  key=lambda n: -1 if n is None else n)
