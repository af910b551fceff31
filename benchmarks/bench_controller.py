"""Controller time: planning and submitting a round of 1,000 decode shards and 18 training tasks to the
real single-node Slurm (slurm/cluster.sh), and a rerun of that round once it is finished.

The round: synthetic logs (6 games), the six paper variants x 3 seeds, decoder.shards = 1000, a tiny
Idefics2. Step 1 times Controller.run(detach=True) against Slurm (every stage submitted, chained with
afterok) and counts sbatch calls through a PATH shim that logs each call and runs the real sbatch;
the submitted jobs are then cancelled. Step 2 finishes the same round by calling each stage's task
functions in this process (what the array tasks would run). Step 3 times the rerun, which must
submit nothing. Needs root (to start Slurm) or a running cluster from slurm/cluster.sh.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARDS = 1000


def ensure_slurm() -> None:
    conf = Path(os.environ.get("RESPECT_SLURM_ROOT", "/tmp/respect-slurm")) / "etc" / "slurm.conf"
    os.environ["SLURM_CONF"] = str(conf)
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        subprocess.run([str(REPO / "slurm" / "cluster.sh"), "start"], check=True)


def sbatch_shim(folder: Path) -> Path:
    """A folder with an `sbatch` that logs each call and runs the real one; put it first on PATH."""
    real = shutil.which("sbatch")
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "sbatch"
    shim.write_text(f'#!/bin/sh\necho call >> "{folder}/calls"\nexec {real} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return folder / "calls"


def write_round(root: Path) -> Path:
    from respect_hpc.domain.synthetic import DEFAULT_KILOGRAM, draw_procedural_images, load_image_bank, synthesize
    from respect_hpc.model.replica import replica_like

    bank = load_image_bank(DEFAULT_KILOGRAM)
    images = DEFAULT_KILOGRAM / "tangram_pngs"
    if bank.source == "procedural":
        images = root / "images"
        draw_procedural_images(bank, images)
    for name, n, policies, seed in (("logs", 6, {"sft": 0.5}, 0), ("d0", 6, {"human": 0.95}, 1),
                                    ("validation", 2, {"human": 0.9}, 2)):
        synthesize(n, seed=seed, policies=policies, rounds=[0], bank=bank).write_parquet(root / f"{name}.parquet")
    model = replica_like("idefics2-8b", root / "model")
    variants = "\n".join(f"  - {{name: {f[0]}-{o}, feedback: {f}, objective: {o}, init: base}}"
                         for o in ("fft", "rl", "kto") for f in ("binary", "ternary"))
    manifest = root / "round.yaml"
    manifest.write_text(f"""experiment: bench
round: 1
workdir: {root / 'runs'}
data: {{interactions: [{root / 'logs.parquet'}], seed_data: {root / 'd0.parquet'},
       validation: {root / 'validation.parquet'}, images: {images}}}
model: {{path: {model}, dtype: fp32}}
decoder: {{shards: {SHARDS}}}
variants:
{variants}
seeds: [1, 2, 3]
training:
  fft: {{epochs: 1, effective_batch: 8, micro_batch: 8}}
  rl: {{epochs: 1, effective_batch: 8, micro_batch: 8}}
  kto: {{epochs: 1, effective_batch: 8, micro_batch: 8}}
  zero_stage: null
cluster: {{executor: slurm, partition: debug}}
""")
    return manifest


def finish_in_process(manifest) -> None:
    """Run every task of the round here, one after the other: the functions the array tasks call."""
    from respect_hpc.cluster.plan import build

    for stage in build(manifest):
        for task in stage.tasks:
            task.call(*task.args)
        print(f"{stage.name}: {len(stage.tasks)} tasks run", flush=True)


def main() -> str:
    ensure_slurm()
    root = Path(tempfile.mkdtemp(prefix="bench-controller-"))
    calls = sbatch_shim(root / "bin")
    os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"
    from respect_hpc.cluster.controller import Controller, max_array_size
    from respect_hpc.config.loading import load_manifest

    manifest = load_manifest(write_round(root))
    report = []
    began = time.perf_counter()
    counts = Controller(manifest, report=report.append).run(detach=True)
    submit_s = time.perf_counter() - began
    submitted_calls = len(calls.read_text().splitlines())
    jobs = sorted({line.split(" as ")[1].split(" ")[0] for line in report if " as " in line})
    subprocess.run(["scancel", *",".join(jobs).split(",")], check=True)
    print(f"submitted {counts} in {submit_s:.2f} s with {submitted_calls} sbatch calls; cancelled", flush=True)

    manifest.run_dir.jobs_record(1).unlink()  # the cancelled submission
    finish_in_process(manifest)
    calls.write_text("")
    began = time.perf_counter()
    rerun = Controller(manifest, report=report.append).run()
    rerun_s = time.perf_counter() - began
    rerun_calls = len(calls.read_text().splitlines())
    assert rerun == {} and rerun_calls == 0, (rerun, rerun_calls)
    shutil.rmtree(root, ignore_errors=True)
    return f"""## Round controller on the real single-node Slurm (issue: round controller)

A round of {SHARDS:,} decode shards and 18 training tasks (6 variants x 3 seeds), 1,022 tasks in 6 stage
arrays; MaxArraySize {max_array_size()}. Controller time in-process (Python start-up and imports not
counted); sbatch calls counted by a PATH shim in front of the real sbatch.

| step | controller time (s) | sbatch calls | submitted |
|---|---|---|---|
| plan and submit (detached, stages chained with afterok) | {submit_s:.2f} | {submitted_calls} | {sum(counts.values()):,} tasks |
| rerun of the finished round | {rerun_s:.2f} | {rerun_calls} | nothing |

Targets: under 5 s with at most one sbatch call per stage array (plus MaxArraySize splits); a rerun
under 2 s that submits nothing. The finished round was produced by running every task's function in
this process (the code the array tasks run), not through Slurm: 1,000 tiny shard jobs would take the
2-core node most of an hour."""


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(main())
