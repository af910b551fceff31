"""The README's first command, `make demo` (`respect-hpc demo manifests/demo.yaml`), from nothing in a fresh run
directory: its wall time split into building the inputs, the seed round and round 1 (from the time each of its
"round N:" lines appears), each stage's task time, and what it ends with (the success table, the decoder
against the truth, the verdict)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]


def main() -> str:
    from respect_hpc.core.costs import costs

    root = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    manifests = root / "manifests"  # next-round writes demo-round1.yaml beside the manifest
    manifests.mkdir()
    kilogram = REPO.parent / "shared" / "data" / "kilogram"
    (manifests / "demo.yaml").write_text((REPO / "manifests" / "demo.yaml").read_text()
                                         .replace("../../shared/data/kilogram", str(kilogram))
                                         .replace("../runs", str(root / "runs")))
    command = [sys.executable, "-m", "respect_hpc.cli", "demo", str(manifests / "demo.yaml"),
               "--variants", str(REPO / "manifests" / "demo-variants.yaml")]
    began, marks, lines = time.perf_counter(), {}, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        for line in run.stdout:
            lines.append(line)
            for r in (0, 1):
                if line.startswith(f"round {r}: ") and r not in marks:
                    marks[r] = time.perf_counter() - began
    wall = time.perf_counter() - began
    if run.returncode or len(marks) < 2:
        raise RuntimeError("".join(lines)[-3000:])
    out = "".join(lines)
    tasks = pl.concat([costs(root / "runs" / "demo" / f"round-{r}" / "timings", r) for r in (0, 1)])
    stages = "\n".join(f"| {r['round']} | {r['stage']} | {r['task']} | {3600 * r['elapsed_h']:.1f} |"
                       for r in tasks.filter(pl.col("elapsed_h") * 3600 >= 1).sort("round", "stage").iter_rows(named=True))
    table = out[out.find("simulated deployments of demo"):out.find("round 1: b-fft")]
    ending = [line for line in lines if line.startswith(("round 1: b-fft", "simulated: "))]
    return f"""## The demo from nothing (issue: what researchers expect around a run)

`respect-hpc demo manifests/demo.yaml` (what `make demo` runs) in a fresh run directory: **{wall / 60:.1f}
minutes** wall time: {marks[0]:.0f} s building the inputs (simulated D_0 and validation; the policy base and
the decoder, tiny IDEFICS2-8B replicas taught side by side), {marks[1] - marks[0]:.0f} s the seed round (train
the seed policy, deploy it), {wall - marks[1]:.0f} s round 1 (ingest, decode, merge, train B-FFT, select, deploy
B-FFT beside the control, collect, metrics).

| round | stage | task | task time (s) |
|---|---|---|---|
{stages}

What it ends with:

```
{table.strip()}
{"".join(ending).strip()}
```
"""
