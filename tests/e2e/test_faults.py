"""Faults at every stage of a round: the controller and its jobs are SIGKILLed while a stage runs, the newest file
the round wrote is truncated, and `respect-hpc run` is started again; after a kill at each of the eight stages
(a simulated deployment included) the round ends with the same tables, the same selected adapter and the same
simulated games as a run that was never disturbed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import KILOGRAM, write_logged_round

from jobs.registry import ORDER as STAGES
from respect_hpc.cluster.controller import Controller
from respect_hpc.config.loading import load_manifest

TABLES = ("data/interactions.parquet", "data/turns.parquet", "round-1/feedback.parquet", "round-1/selection.parquet",
          "round-1/metrics/round_metrics.parquet", "round-1/train/b-fft/seed-1/metrics.parquet",
          "round-1/train/b-fft/seed-2/metrics.parquet", "round-1/deployed.parquet", "round-1/deployed_truth.parquet")
POLICY = "round-1/policies/b-fft/adapter_model.safetensors"
TIMINGS = ("seconds", "wall", "time", "elapsed")  # measured durations: the only columns a rerun may change


def _outcome(run: Path) -> dict[str, object]:
    found: dict[str, object] = {POLICY: (run / POLICY).read_bytes()}
    for name in TABLES:
        table = pl.read_parquet(run / name)
        found[name] = table.drop([c for c in table.columns if any(t in c for t in TIMINGS)])
    return found


def _start(manifest: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "respect_hpc.cli", "run", str(manifest)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _submitted(run: Path) -> list[str]:
    try:
        return [r["stage"] for r in json.loads((run / "round-1" / "jobs.json").read_text())]
    except (OSError, ValueError):
        return []


def _kill_during(manifest: Path, run: Path, stage: str, timeout: float = 600) -> str | None:
    """Start a run, SIGKILL its whole process group once ``stage`` has been submitted; the run's output if it
    ended first."""
    before = _submitted(run).count(stage)
    process = _start(manifest)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if _submitted(run).count(stage) > before:
            time.sleep(0.5)  # inside the stage's job
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
        time.sleep(0.05)
    process.wait(timeout=max(1.0, deadline - time.monotonic()))
    return process.stdout.read()


def _truncate_newest(run: Path) -> Path | None:
    """Cut the most recently written output of the round (not the job logs or the controller's records, tested
    below) to half its size; None when the kill came before the round wrote any."""
    files = [p for p in run.rglob("*") if p.is_file() and "logs" not in p.relative_to(run).parts
             and p.name not in ("jobs.json", "manifest.lock.json", "controller.lock")]
    if not files:
        return None
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    with newest.open("r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    return newest


@pytest.mark.slow
def test_a_round_killed_and_truncated_at_every_stage_ends_as_if_undisturbed(tmp_path, taught_decoder):
    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: the simulated deployment speaks its descriptions")
    manifest = write_logged_round(tmp_path, taught_decoder[0])
    manifest.write_text(manifest.read_text() + f"simulation: {{kilogram: {KILOGRAM}, games: 4, max_turns: 3, "
                                               "control: false}\n")
    run = tmp_path / "runs" / "tiny"
    done = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "run", str(manifest)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    undisturbed = _outcome(run)
    shutil.rmtree(run)

    truncated = []
    for stage in STAGES:
        ended = _kill_during(manifest, run, stage)
        assert ended is None, f"the run ended before {stage} (after truncating {truncated}): {ended}"
        damaged = _truncate_newest(run)
        truncated.append(str(damaged.relative_to(run)) if damaged else "(nothing written yet)")
    final = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "run", str(manifest)], capture_output=True,
                           text=True)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "Traceback" not in final.stdout + final.stderr
    outcome = _outcome(run)
    for name, value in undisturbed.items():
        if isinstance(value, bytes):
            assert outcome[name] == value, name
        else:
            assert outcome[name].equals(value), (name, truncated, outcome[name], value)
    assert {r.state for r in Controller(load_manifest(manifest)).status()} == {"done"}
    print("killed in every stage; truncated afterwards:", ", ".join(truncated))

    # the controller's own records, damaged: set aside with a warning, or refused in one line
    jobs = run / "round-1" / "jobs.json"
    jobs.write_text(jobs.read_text()[:50])
    status = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "status", str(run)], capture_output=True,
                            text=True)
    assert status.returncode == 0 and f"warning: {jobs} is damaged" in " ".join(status.stderr.split()), status.stderr
    assert (run / "round-1" / "jobs.json.damaged").is_file()
    lock = run / "manifest.lock.json"
    lock.write_text(lock.read_text()[:50])
    status = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "status", str(run)], capture_output=True,
                            text=True)
    assert status.returncode == 2 and " ".join(status.stderr.split()) == (
        f"error: {lock}: damaged or written by another version; `respect-hpc run MANIFEST` writes it again")
