"""The quick simulated setting end to end: `respect-hpc loop manifests/sim.yaml --rounds 3 --variants
manifests/sim-variants.yaml` from nothing (inputs, seed round, three rounds of deploy -> decode -> train ->
select), in a fresh run directory: its wall time, the success of each policy per round with 95% intervals
(the learning curve), and the decoder against the simulator's truth."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    kilogram = REPO.parent / "shared" / "data" / "kilogram"
    manifest = root / "sim.yaml"
    manifest.write_text((REPO / "manifests" / "sim.yaml").read_text()
                        .replace("../../shared/data/kilogram", str(kilogram)).replace("../runs", str(root / "runs")))
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "loop", str(manifest), "--rounds", str(ROUNDS),
                           "--variants", str(REPO / "manifests" / "sim-variants.yaml")],
                          capture_output=True, text=True)
    wall = time.perf_counter() - began
    sim = yaml.safe_load(manifest.read_text())["simulation"]
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    curve = pl.read_parquet(root / "runs" / "sim" / "learning_curve.parquet")
    rows = "\n".join(
        f"| {r['policy']} | {r['round']} | {r['games']} | {100 * r['success_rate']:.1f} "
        f"[{100 * r['success_ci_low']:.1f}, {100 * r['success_ci_high']:.1f}] | {r['turns_mean']:.2f} "
        f"[{r['turns_ci_low']:.2f}, {r['turns_ci_high']:.2f}] | {r['click_accuracy']:.3f} |"
        for r in curve.sort("round", "policy").iter_rows(named=True))
    decoder = done.stdout[done.stdout.find("decoded feedback against"):].strip()
    return f"""## The quick simulated setting: seed round + {ROUNDS} rounds (issue: the whole loop without people)

`respect-hpc loop manifests/sim.yaml --rounds {ROUNDS} --variants manifests/sim-variants.yaml` from nothing:
{wall / 60:.1f} minutes wall time (inputs, the seed round and {ROUNDS} rounds of deploy -> decode -> train ->
select; B-FFT and B-RL play {sim['games']} simulated games a round, the seed policy, in round 0 and as the
control, {sim.get('control_games') or sim['games']}).

| policy | round | games | success % [95% interval] | turns [95% interval] | click accuracy |
|---|---|---|---|---|---|
{rows}

```
{decoder}
```

The setting (manifests/sim.yaml): {sim['tangrams']} tangrams in a {sim['order']} order,
{sim.get('descriptions') or 'all'} descriptions each; D_0 and validation speak the seed half of the descriptions, deployments the {sim['pool']}
pool; the speaker's credit: {sim.get('credit', 'target')}. The policy base is the IDEFICS2-8B replica (text
hidden 64, 2 layers, 4 tokens an image) taught the listener's turns for {sim['teach_steps']:,} steps before
the seed round; the decoder is a second replica taught the label words on a weaker person's games.

{verdict(curve)}"""


def verdict(curve: pl.DataFrame) -> str:
    """Whether B-FFT's last round beats round 0 with non-overlapping 95% intervals and the control stays
    within round 0's interval, with the rounds where it does not and the control's success over all its
    games."""
    def row(policy: str, round_: int) -> dict:
        return curve.filter((pl.col("policy") == policy) & (pl.col("round") == round_)).row(0, named=True)

    first, fft = row("sft", 0), row("b-fft", ROUNDS)
    control = curve.filter(pl.col("policy") == "control")
    beats = fft["success_ci_low"] > first["success_ci_high"]
    out = control.filter(~pl.col("success_rate").is_between(first["success_ci_low"], first["success_ci_high"]))
    pooled = (control["success_rate"] * control["games"]).sum() / control["games"].sum()
    steady = ("stays within round 0's interval in every round" if out.is_empty() else
              "leaves round 0's interval in " + " and ".join(
                  f"round {r['round']} ({100 * r['success_rate']:.1f}%)" for r in out.iter_rows(named=True)))
    return (f"B-FFT after round {ROUNDS}: {100 * fft['success_rate']:.1f}% "
            f"[{100 * fft['success_ci_low']:.1f}, {100 * fft['success_ci_high']:.1f}] against round 0's "
            f"{100 * first['success_rate']:.1f}% [{100 * first['success_ci_low']:.1f}, "
            f"{100 * first['success_ci_high']:.1f}]: intervals {'apart' if beats else 'overlapping'}; the control "
            f"{steady}; over all its {control['games'].sum():,} games the control succeeds {100 * pooled:.1f}% "
            f"of the time.")
