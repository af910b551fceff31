"""Each submitted task's wall time, recorded by the task itself (its first process), one line per attempt
(a requeued task adds one), with the GPUs its stage allocates (core/costs.py reads them back).

:class:`Timed` wraps a task's call for submitit; a checkpointable call (training) stays checkpointable, its
requeued submission wrapped again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import submitit


def _first_process() -> bool:
    try:
        return submitit.JobEnvironment().global_rank == 0
    except RuntimeError:  # not inside a submitit job
        return int(os.environ.get("RANK", "0")) == 0


class Timed:
    """``call(*args)``, its wall time appended to ``record`` ({started, elapsed_s, gpus, ok}) by the first
    process, whether it ends well or not."""

    def __init__(self, call, record: Path, gpus: int):
        self.call, self.record, self.gpus = call, record, gpus

    def __call__(self, *args, **kwargs):
        started, ok = time.time(), False
        try:
            result = self.call(*args, **kwargs)
            ok = True
            return result
        finally:
            if _first_process():
                self.record.parent.mkdir(parents=True, exist_ok=True)
                line = {"started": started, "elapsed_s": time.time() - started, "gpus": self.gpus, "ok": ok}
                with self.record.open("a+b") as handle:  # one short line, appended whole (a+: writes go last)
                    size = handle.seek(0, os.SEEK_END)
                    cut = False
                    if size:  # a line cut short by a crash stays alone on its line
                        handle.seek(size - 1)
                        cut = handle.read(1) != b"\n"
                    handle.write((("\n" if cut else "") + json.dumps(line) + "\n").encode())


class TimedCheckpointable(Timed):
    """A :class:`Timed` checkpointable call: its requeued submission is timed too."""

    def checkpoint(self, *args, **kwargs):
        inner = self.call.checkpoint(*args, **kwargs)
        if inner is None:
            return None
        return submitit.helpers.DelayedSubmission(TimedCheckpointable(inner.function, self.record, self.gpus),
                                                  *inner.args, **inner.kwargs)


def timed(call, record: Path, gpus: int) -> Timed:
    return (TimedCheckpointable if hasattr(call, "checkpoint") else Timed)(call, record, gpus)
