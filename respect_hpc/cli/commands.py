"""The ``respect-hpc`` commands.

Every expected failure is a :class:`~respect_hpc.core.errors.RespectError`: the command group catches it
once, prints its one line and exits 2; anything else is a bug and shows its traceback. Commands import what
they run inside their bodies, so that ``--help``, ``validate`` and ``schema`` stay light (no torch).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from respect_hpc.cli import views
from respect_hpc.cli.options import (
    ClusterProfile,
    Executor,
    ManifestArg,
    MaxRound,
    MaxTurns,
    OptionError,
    Overrides,
    Policies,
    Quarantine,
    Resamples,
    Seed,
    Sources,
    Workdir,
    first_problem,
    manifest,
    variants_file,
)
from respect_hpc.config.loading import ManifestError, load_manifest
from respect_hpc.core.errors import RespectError
from respect_hpc.domain.multiref import DEFAULT_MAX_TURNS
from respect_hpc.domain.policies import PUBLIC_POLICIES
from respect_hpc.model.families import interfaces, model_problems
from respect_hpc.report import N_RESAMPLES

DEMO_MANIFEST = Path("manifests/demo.yaml")
DEMO_VARIANTS = Path("manifests/demo-variants.yaml")


class Commands(TyperGroup):
    """The command group: an expected failure ends with its one line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RespectError as exc:
            views.error(exc)
            raise typer.Exit(2) from None


app = typer.Typer(cls=Commands, help="Retrospective learning from interactions (ReSpect), one round at a time, "
                                     "on this machine or a SLURM cluster.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def _reading(quarantine: bool, max_turns: int, policy: list[str] | None, max_round: int | None) -> dict:
    return {"quarantine": quarantine, "max_turns": max_turns,
            "policies": tuple(PUBLIC_POLICIES) + tuple(policy or ()), "max_round": max_round}


@app.command()
def validate(manifest_path: ManifestArg, overrides: Overrides = None,
             files: Annotated[bool, typer.Option(help="Check that the files the manifest names exist "
                                                      "(--no-files to check a cluster manifest elsewhere).")] = True,
             ) -> None:
    """Check a round manifest: prints ok, or one FILE:LINE: field: problem line each (or, for a KEY=VALUE
    override, the override: field: problem) and exits 2."""
    try:
        load_manifest(manifest_path, check_files=files, overrides=overrides or (), checks=model_problems)
    except ManifestError as exc:
        for problem in exc.problems:
            views.say(problem)
        raise typer.Exit(2) from None
    print("ok")


@app.command()
def schema() -> None:
    """Print the JSON schema of round manifests (for editor completion)."""
    from respect_hpc.config.schema import Manifest

    print(json.dumps(Manifest.model_json_schema(), indent=2))


@app.command("ingest")
def ingest_command(sources: Sources,
                   out: Annotated[Path, typer.Option(help="Folder for interactions.parquet and turns.parquet.")],
                   quarantine: Quarantine = False, max_turns: MaxTurns = DEFAULT_MAX_TURNS,
                   policy: Policies = None, max_round: MaxRound = None) -> None:
    """Normalise logs into interactions.parquet and turns.parquet (one row per logged action)."""
    from respect_hpc.core.rundir import DataDir
    from respect_hpc.data.logs import ingest, write_tables

    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out}: exists and is a file; expected a folder for interactions.parquet and "
                          "turns.parquet")
    with views.err.status("ingesting"):
        result = ingest(sources, **_reading(quarantine, max_turns, policy, max_round))
        write_tables(result, DataDir(out))
    views.say(f"{result.interactions.height} games, {result.turns.height} turns -> {out}")
    if quarantine:
        views.say(result.accounting() + (f" (see {DataDir(out).quarantine})" if result.rows_quarantined else ""))


@app.command()
def metrics(sources: Sources,
            as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line per (policy, round).")]
            = False,
            seed: Seed = 0, resamples: Resamples = N_RESAMPLES,
            quarantine: Quarantine = False, max_turns: MaxTurns = DEFAULT_MAX_TURNS,
            policy: Policies = None, max_round: MaxRound = None) -> None:
    """Round metrics per (policy, round): success rate and turns per game with 95% bootstrap intervals,
    click accuracy, and the speakers' language."""
    from respect_hpc.data.logs import ingest
    from respect_hpc.report.round_metrics import round_metrics

    result = ingest(sources, **_reading(quarantine, max_turns, policy, max_round))
    if quarantine and result.rows_quarantined:
        views.say(result.accounting(), to=views.err)
    table = round_metrics(result.interactions, result.turns, seed=seed, n_resamples=resamples)
    if as_json:
        for row in table.iter_rows(named=True):
            sys.stdout.write(json.dumps(row) + "\n")
    else:
        views.metrics_table(table)


def _skills(specs: list[str]) -> dict[str, float]:
    policies = {}
    for spec in specs:
        name, _, skill = spec.partition("=")
        try:
            policies[name] = float(skill)
        except ValueError:
            raise OptionError(f"--policy {spec!r}: expected NAME=SKILL with SKILL a number in [0, 1]") from None
        if not 0 <= policies[name] <= 1:
            raise OptionError(f"--policy {spec!r}: SKILL must lie in [0, 1]")
    return policies


@app.command()
def synth(out: Annotated[Path, typer.Argument(help="Output file: .parquet or .jsonl (public interaction layout).")],
          games: Annotated[int, typer.Option(min=1, max=1_000_000, help="Games per (policy, round).")] = 100,
          policy: Annotated[list[str] | None, typer.Option(help="NAME=SKILL, repeatable; skill in [0, 1] is how "
                                                               "often the policy picks the described target.")]
          = None,
          rounds: Annotated[list[int] | None, typer.Option("--round", help="Rounds to generate (repeatable).")]
          = None,
          seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the games.")] = 0,
          images: Annotated[Path | None, typer.Option(help="Where to draw the procedural images when KiloGram "
                                                          "is absent.")] = None) -> None:
    """Generate seeded synthetic MultiRef logs (real KiloGram names and descriptions when present)."""
    from respect_hpc.core.io import atomic_write_parquet, atomic_write_text
    from respect_hpc.domain.synthetic import DEFAULT_KILOGRAM, draw_procedural_images, load_image_bank, synthesize

    if out.suffix not in (".parquet", ".jsonl"):
        raise OptionError(f"{out}: expected a .parquet or .jsonl file name")
    bank = load_image_bank(DEFAULT_KILOGRAM)
    if bank.source == "procedural" and images is not None:
        draw_procedural_images(bank, images)
    frame = synthesize(games, seed=seed, policies=_skills(policy or ["sft=0.45"]), rounds=rounds or [0], bank=bank)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".parquet":
            atomic_write_parquet(frame, out)
        else:
            atomic_write_text(frame.write_ndjson(), out)
    except OSError as exc:
        raise OptionError(f"{out}: cannot write ({exc.strerror or exc})") from None
    views.say(f"{frame.height} synthetic games ({bank.source} images) -> {out}")


def _ensure_turns(m) -> None:
    """Run the ingest stage for a manifest whose run directory has no current turns table yet."""
    from jobs import ingest

    if not ingest.done(m):
        with views.err.status("ingesting"):
            summary = ingest.run(m)
        views.say(f"ingest: {summary} -> {m.run_dir.data.root}")


@app.command()
def decode(manifest_path: ManifestArg, overrides: Overrides = None,
           shard: Annotated[int | None, typer.Option(help="Decode only this shard (one array task).")] = None,
           num_shards: Annotated[int | None, typer.Option(help="Shards in all (default: decoder.shards).")] = None,
           merge: Annotated[bool, typer.Option("--merge", help="Only check the parts and merge them.")] = False,
           check: Annotated[int, typer.Option(help="Also greedy-generate N sampled windows per kind and report "
                                                    "agreement with scoring.")] = 0,
           submit: Annotated[bool, typer.Option("--submit", help="Run the shards as one array job of the "
                                                                 "manifest's executor, then merge.")] = False,
           executor: Executor = None) -> None:
    """Decode implicit feedback of every logged action with a follow-up, with the original base model.

    Without --shard: every shard in turn, then the merge, then a summary of label counts. A shard whose
    part is current is skipped; windows decoded in earlier rounds are reused."""
    import jobs.decode
    import jobs.merge
    from respect_hpc.cluster.executors import run_jobs
    from respect_hpc.data.feedback import label_counts

    m = manifest(manifest_path, executor, overrides=overrides)
    n = num_shards or m.decoder.shards
    _ensure_turns(m)
    if shard is not None:
        jobs.decode.run(m, shard, n)
        return
    if submit:
        run_jobs(m, "decode", executor, jobs.decode.run, [(m, s, n) for s in range(n)],
                 report=lambda line: views.say(line, to=views.err))
    elif not merge:
        for index in range(n):
            jobs.decode.run(m, index, n)
    feedback = jobs.merge.run(m, n)
    views.label_counts_table(label_counts(feedback))
    if check:
        agree, checked = jobs.decode.check_generation(m, feedback, check)
        views.say(f"greedy generation agrees with scoring on {agree}/{checked} windows "
                  f"({100 * agree / max(checked, 1):.1f}%)")


DATASET_COLUMNS = ("source", "policy", "round", "game_turn_id", "label", "reward", "weight", "action", "prob_action")


@app.command()
def dataset(manifest_path: ManifestArg, overrides: Overrides = None, *,
            variant: Annotated[str, typer.Option(help="Variant name from the manifest, e.g. b-fft.")],
            seed: Annotated[int, typer.Option(help="Seed of the task (its draw of negatives each epoch).")],
            out: Annotated[Path, typer.Option(help="Parquet file for the examples.")]) -> None:
    """Write the exact examples a training task will use, one row each (source: log, d0 or augmented; the
    policy and round that logged it; label, reward, weight; the action in the official format; p), and
    print where they come from. Needs the round's ingest and decode stages done."""
    import polars as pl

    import jobs.train
    from respect_hpc.core.io import atomic_write_parquet
    from respect_hpc.data.datasets import negative_draws, source_counts

    m = manifest(manifest_path, overrides=overrides)
    prepared = jobs.train.prepare(m, variant, seed)
    examples = prepared.examples.select(DATASET_COLUMNS)
    atomic_write_parquet(examples, out)
    views.source_table(source_counts(examples), f"{variant} seed {seed}: {examples.height} examples -> {out}")
    drawn = negative_draws(prepared.examples, prepared.spec.hp, prepared.spec.objective, seed)
    if drawn is not None:
        negatives = examples.filter((pl.col("source") == "log") & (pl.col("label") == -1)).height
        kept = len(drawn(0)) - (examples.height - negatives)
        views.say(f"negatives: {kept} of the {negatives} are trained each epoch, drawn afresh per epoch "
                  f"(training.{prepared.spec.objective}.negatives: per_epoch)")


@app.command()
def train(manifest_path: ManifestArg, overrides: Overrides = None, *,
          variant: Annotated[str, typer.Option(help="Variant name from the manifest, e.g. b-fft.")],
          seed: Annotated[int, typer.Option(help="Seed: LoRA initialisation, data order, subsampling.")],
          submit: Annotated[bool, typer.Option("--submit", help="Run the task as a job of the manifest's executor "
                                                                "(one process per GPU) and wait.")] = False,
          executor: Executor = None) -> None:
    """Train one task of the round: LoRA on the policy for one variant and seed.

    Writes round-R/train/<variant>/seed-<s>/: a checkpoint and the validation exact match every epoch
    (epochs/epoch-EEE/ adapters, metrics.parquet), done.json at the end. A rerun resumes from the newest
    checkpoint, or does nothing when the task is done with the same inputs. SIGUSR2 or SIGTERM stops
    it at the next optimizer step with a checkpoint saved."""
    import jobs.train
    from respect_hpc.cluster.executors import run_jobs

    m = manifest(manifest_path, executor, overrides=overrides)
    if submit:
        jobs.train.variant_of(m, variant)
        result, = run_jobs(m, "train", executor, jobs.train.TrainTask(m, variant, seed), [()],
                           report=lambda line: views.say(line, to=views.err))
    else:
        result = jobs.train.run(m, variant, seed)
    views.say(f"{variant} seed {seed}: best epoch {result['best_epoch']}, validation exact match "
              f"{result['val_exact_match']:.3f} (loss {result['val_loss']:.4f}) -> "
              f"{jobs.train.task_dir(m, variant, seed).root}")


@app.command("export")
def export_command(run_dir: Annotated[Path, typer.Argument(help="Run directory (<workdir>/<experiment>).")],
                   out: Annotated[Path, typer.Option(help="Folder for adapters/ and dataset/.")] = Path("export")
                   ) -> None:
    """Write a run in the public release's layout: each round's selected adapter as a PEFT folder with a model
    card (base model, round, variant, preset, validation score, lineage), and the games and decoded feedback
    as a dataset whose card's configs name them (interaction, feedback_decoder_binary/ternary)."""
    from respect_hpc.report.export import export

    done = export(run_dir, out)
    views.say(f"{len(done.adapters)} adapters -> {out / 'adapters'}; dataset configs "
              f"{', '.join(sorted(done.configs)) or 'none'} -> {out / 'dataset'}")
    views.say(f"publish: huggingface-cli upload USER/NAME {out / 'dataset'} --repo-type dataset; "
              f"huggingface-cli upload USER/NAME-ADAPTER {out / 'adapters'}/VARIANT-round-R")


@app.command()
def report(sources: Annotated[list[Path], typer.Argument(help="Run directories, and files or folders of public "
                                                               "tables (interaction, turn, human_eval, "
                                                               "feedback_decoder_*, turn evaluations).")],
           out: Annotated[Path, typer.Option(help="Folder for tables/, plots/ and report.html.")] = Path("report"),
           embeddings: Annotated[Path | None, typer.Option(help="Parquet table image -> embedding (list of "
                                                                "floats) for the similarity Sim(a, a*).")] = None,
           seed: Seed = 0, resamples: Resamples = N_RESAMPLES) -> None:
    """Aggregate rounds, variants and sweeps into tables (Parquet, CSV), plots (PNG) and one HTML page."""
    from respect_hpc.report import build

    with views.err.status("aggregating"):
        built = build.build(sources, embeddings, seed=seed, n_resamples=resamples)
        page = build.write(built, out)
    for line in built.missing:
        views.say(f"missing: {line}", to=views.err)
    views.say(f"{len(built.tables)} tables -> {out / 'tables'}; report -> {page}")


def _controller(manifest_path: Path, executor: str | None, workdir: Path | None, cluster: Path | None = None,
                overrides: list[str] | None = None):
    from respect_hpc.cluster.controller import Controller

    m = manifest(manifest_path, executor, workdir=workdir, cluster=cluster, overrides=overrides)
    return Controller(m, executor, report=lambda line: views.say(line, to=views.err), source=manifest_path,
                      overrides=overrides)


def _lineage(m) -> None:
    """Each variant's lineage: the logged turns (not idle) it trains on per policy and round, once ingested."""
    import polars as pl

    from respect_hpc.data.datasets import is_idle

    if m.seed_round:
        return
    path = m.run_dir.data.turns
    turns = pl.read_parquet(path).filter(~is_idle()) if path.is_file() else None
    rows = []
    for v in m.variants:
        mine = None if turns is None else turns.filter(pl.col("policy").is_in(v.policies)) if v.policies else turns
        lineage = ", ".join(v.policies) if v.policies else "every policy"
        if mine is None or mine.is_empty():
            rows.append((v.name, lineage, "-" if mine is None else "none: refused at training", "", ""))
            continue
        rows += [(v.name, lineage, policy, round_, n)
                 for policy, round_, n in mine.group_by("policy", "round").len().sort("policy", "round").rows()]
    views.lineage_table(rows, turns is not None)


@app.command()
def plan(manifest_path: ManifestArg, overrides: Overrides = None, executor: Executor = None,
         workdir: Workdir = None, cluster: ClusterProfile = None) -> None:
    """Show the round's stages, their tasks (done and to do), resources, and the sbatch script of each
    array; submits nothing."""
    from respect_hpc.cluster.executors import sbatch_script

    controller = _controller(manifest_path, executor, workdir, cluster, overrides)
    m = controller.manifest
    stages = controller.plan()
    views.plan_table(f"round {m.round} of {m.experiment} ({controller.kind} executor)", stages, m.cluster.stages)
    _lineage(m)
    for objective in sorted({"seed"} if m.seed_round else {v.objective for v in m.variants}):
        views.say(f"training.{objective}: {m.training.in_force(objective)}")
    views.say(estimate(m, stages))
    if not any(stage.todo for stage in stages):
        views.say("every task is done: run would submit nothing")
    for stage in stages:
        if stage.todo:
            views.rule(f"{stage.name}: sbatch script of its array ({len(stage.todo)} tasks)")
            views.say(sbatch_script(m, stage.name, len(stage.todo)))


@app.command()
def run(manifest_path: ManifestArg, overrides: Overrides = None, executor: Executor = None,
        workdir: Workdir = None, cluster: ClusterProfile = None,
        detach: Annotated[bool, typer.Option("--detach", help="Submit every stage (chained with afterok) and "
                                                              "return; Slurm only.")] = False,
        retry: Annotated[bool, typer.Option("--retry", help="Resubmit the tasks that failed (and what depends on "
                                                            "them).")] = False) -> None:
    """Run a whole round: ingest -> decode (array of shards) -> merge -> train (array of variants x seeds)
    -> select -> round metrics. Done tasks are skipped; a rerun of a finished round submits nothing."""
    from respect_hpc.cluster.scheduler import RunLock

    controller = _controller(manifest_path, executor, workdir, cluster, overrides)
    with RunLock(controller.run_dir.controller_lock, report=controller.report):
        controller.run(detach=detach, retry=retry)
    if not detach:
        round_summary(controller.manifest)


def estimate(m, stages) -> str:
    """The round's GPU-hours from the previous round's measured cost per task of each stage, or why none."""
    import polars as pl

    from respect_hpc.core.costs import costs

    if m.round == 0:
        return "GPU-hours: no estimate (no earlier round measured)"
    before = costs(m.run_dir.timings(m.round - 1), m.round - 1)
    per_task = {row["stage"]: row["gpu_hours"] / row["tasks"] for row in before.group_by("stage").agg(
        pl.col("gpu_hours").sum(), pl.len().alias("tasks")).iter_rows(named=True)}
    todo = {stage.name: len(stage.todo) for stage in stages if stage.todo}
    if not todo:
        return "GPU-hours: nothing to run"
    missing = sorted(set(todo) - set(per_task))
    if missing:
        return f"GPU-hours: no estimate (round {m.round - 1} has no measured {', '.join(missing)} tasks)"
    total = sum(per_task[name] * n for name, n in todo.items())
    return (f"GPU-hours: about {total:.2f} for the {sum(todo.values())} tasks to run (round {m.round - 1}'s "
            "measured cost per task of each stage)")


def round_summary(m) -> None:
    """Decoded label counts, the selected checkpoint of each variant, and the round metrics."""
    import polars as pl

    from respect_hpc.data.feedback import label_counts

    run_dir = m.run_dir
    feedback = run_dir.round_feedback(m.round)
    if feedback.is_file():
        views.label_counts_table(label_counts(pl.read_parquet(feedback).filter(pl.col("round") < m.round)))
    selection = run_dir.selection(m.round)
    if selection.is_file():
        views.selection_table(pl.read_parquet(selection),
                              f"selected checkpoints -> {run_dir.round(m.round) / 'policies'}")
    metrics_path = run_dir.round_metrics(m.round)
    if metrics_path.is_file():
        views.metrics_table(pl.read_parquet(metrics_path), title=f"round metrics ({metrics_path})")


def write_next_round(manifest_path: Path, logs: list[Path], variants: list[dict] | None,
                     overrides: list[str] | None = None) -> Path:
    """Write the next round's manifest beside ``manifest_path`` (config/chain.py), ``KEY=VALUE`` overrides
    written into it, checked; returns its path."""
    import yaml

    from respect_hpc.config.chain import next_path, next_round
    from respect_hpc.config.loading import apply_overrides
    from respect_hpc.core.io import atomic_write_text

    m = manifest(manifest_path, overrides=overrides)
    missing = [str(p) for p in logs if not p.is_file()]
    if missing:
        raise OptionError(f"--logs: no file {missing[0]}")
    raw, _ = apply_overrides(yaml.safe_load(manifest_path.read_text()), overrides or (), Path.cwd())
    out = next_path(manifest_path, m.round + 1)
    text = yaml.safe_dump(next_round(raw, [p.absolute() for p in logs], variants), sort_keys=False)
    atomic_write_text(f"# round {m.round + 1}, written by respect-hpc next-round from {manifest_path.name}\n{text}",
                      out)
    manifest(out)
    return out


@app.command("next-round")
def next_round_command(
        manifest_path: ManifestArg, overrides: Overrides = None, *,
        logs: Annotated[list[Path], typer.Option("--logs", help="Logs of this round's deployment (public "
                                                                "interaction or turn layout; repeatable).")],
        variants: Annotated[Path | None, typer.Option(
            "--variants", help="YAML list of the variants to train from now on (default: this manifest's; "
                               "from the seed round, the paper's six).")] = None) -> None:
    """Write the next round's manifest beside this one (<name>-round<R+1>.yaml): round + 1, the logs added to
    data.interactions and to each variant's lineage (under the variant's own name, the policy name its
    deployment logs), KTO continuing from this round's selected policies. Everything else stays as written,
    KEY=VALUE overrides written in."""
    out = write_next_round(manifest_path, logs, variants_file(variants), overrides)
    views.say(f"round {manifest(out).round}: {out}")


@app.command()
def loop(manifest_path: Annotated[Path, typer.Argument(help="Manifest of the first round to run (usually the seed "
                                                            "round) with a simulation section.")],
         overrides: Overrides = None, *,
         rounds: Annotated[int, typer.Option("--rounds", min=0, help="Run up to this round (0: the seed round "
                                                                     "alone).")],
         variants: Annotated[Path | None, typer.Option(
             "--variants", help="YAML list of the variants of the rounds after the seed round (default: the "
                                "paper's six).")] = None,
         executor: Executor = None) -> None:
    """Run rounds back to back with a simulated deployment: each round runs every stage (its selected policies
    and the control play simulated games), then the next round's manifest is written from those games
    (next-round) and run, up to round R; ends with success and turns per round and policy. A rerun resumes:
    done tasks are skipped and the manifests are written again the same."""
    _chain(manifest_path, overrides, rounds, variants_file(variants), executor)


def _chain(manifest_path: Path, overrides: list[str] | None, rounds: int, chosen: list[dict] | None,
           executor: str | None):
    """loop's work: the simulated setting's inputs, then every round up to ``rounds`` (next-round between
    them), and the learning curve and the decoder's quality against the truth; returns the last round's
    manifest and its learning curve."""
    from respect_hpc.cluster.scheduler import RunLock
    from respect_hpc.core.io import atomic_write_parquet
    from respect_hpc.simulation.inputs import simulation_inputs
    from respect_hpc.simulation.rounds import decoder_truth, learning_curve

    try:
        simulation_inputs(load_manifest(manifest_path, check_files=False, overrides=overrides or ()),
                          report=views.say)
    except ManifestError as exc:
        raise OptionError(first_problem(exc)) from None
    path = manifest_path
    while True:
        first = path == manifest_path  # later rounds' manifests have the overrides written in
        controller = _controller(path, executor, None, overrides=overrides if first else None)
        m = controller.manifest
        if m.simulation is None:
            raise OptionError(f"{path}: loop deploys every round to a simulated speaker: the manifest needs a "
                              "simulation section")
        if m.round > rounds:
            raise OptionError(f"{path}: round {m.round} is past --rounds {rounds}")
        views.say(f"round {m.round}: {path}", to=views.err)
        with RunLock(controller.run_dir.controller_lock, report=controller.report):
            controller.run()
        if m.round == rounds:
            break
        path = write_next_round(path, [m.run_dir.deployed(m.round)], chosen if m.seed_round else None,
                                overrides if first else None)
    curve = learning_curve(m)
    atomic_write_parquet(curve, m.run_dir.learning_curve)
    views.metrics_table(curve, title=f"simulated deployments of {m.experiment}, rounds 0 to {m.round} "
                                     f"(-> {m.run_dir.learning_curve})")
    quality = decoder_truth(m)
    if quality is not None:
        views.decoder_truth_table(quality)
    return m, curve


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="Run directory (<workdir>/<experiment>).")],
           round_: Annotated[int | None, typer.Option("--round", help="Round (default: the latest submitted).")]
           = None) -> None:
    """Tasks per stage (done, pending, running, failed, cancelled) from the scheduler, with each failed
    task's last error line and log; then the round's wall time and GPU-hours per stage and variant (from sacct
    on Slurm, from the tasks' own timings elsewhere)."""
    from pydantic import ValidationError

    from respect_hpc.cluster.controller import Controller, read_manifest_lock
    from respect_hpc.cluster.scheduler import slurm_costs
    from respect_hpc.config.schema import Manifest
    from respect_hpc.core.costs import costs
    from respect_hpc.core.rundir import RunDir

    lock = RunDir(run_dir).manifest_lock
    if not lock.is_file():
        raise OptionError(f"{run_dir}: no {lock.name}; nothing was submitted from this run directory")
    recorded = read_manifest_lock(lock)
    try:
        m = Manifest.model_validate(recorded["manifest"] if recorded else None)
    except ValidationError:
        raise OptionError(f"{lock}: damaged or written by another version; `respect-hpc run MANIFEST` writes it "
                          "again") from None
    # the state of this run directory, wherever it was made or moved to
    m = m.model_copy(update={"workdir": run_dir.absolute().parent, "experiment": run_dir.absolute().name,
                             **({} if round_ is None else {"round": round_})})
    views.status_table(f"{run_dir} round {m.round}", Controller(m).status())
    spent, source = slurm_costs(m.run_dir.jobs_record(m.round), m.round), "sacct's Elapsed and AllocTRES"
    if spent is None:
        spent, source = costs(m.run_dir.timings(m.round), m.round), "the tasks' own timings"
    if spent.height:
        views.cost_table(spent, f"round {m.round}: wall time and GPU-hours of the tasks that ran (every attempt; "
                                f"{source})")


@app.command("tiny-model")
def tiny_model(out: Annotated[Path, typer.Argument(help="Folder to write the replica to (new or empty).")],
               like: Annotated[str | None, typer.Option(help=f"A known model: {', '.join(interfaces())}.")] = None,
               source: Annotated[Path | None, typer.Option("--from", help="A local checkpoint folder to scale "
                                                                          "down.")] = None,
               seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0) -> None:
    """A tiny random-weight model with a real model's interface: its tokenizer, special tokens, chat template,
    processor and generation settings, architecture family and vocabulary, at a width and depth a CPU runs in
    seconds. Use it to dry-run a manifest (model.path) on a login node before spending GPU hours."""
    from respect_hpc.model.replica import ReplicaError, replica_from, replica_like

    if (like is None) == (source is None):
        raise OptionError("tiny-model: give exactly one of --like NAME or --from MODEL_DIR")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError(f"tiny-model: '{out}' exists and is not an empty folder")
    try:
        folder = replica_like(like, out, seed=seed) if like else replica_from(source, out, seed=seed)
    except OSError as exc:
        raise ReplicaError(str(exc)) from None
    views.say(f"tiny replica of {like or source} (random weights) -> {folder}")


@app.command()
def prompts(sources: Sources,
            model: Annotated[Path | None, typer.Option(help="Checkpoint folder whose tokenizer and chat template "
                                                            "render the prompts (default: IDEFICS2-8B's, rebuilt "
                                                            "offline).")] = None,
            limit: Annotated[int | None, typer.Option(min=1, help="Show the first N turns only.")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line: game_turn_id, policy, "
                                                                  "policy_target, decoder_binary, "
                                                                  "decoder_ternary.")] = False) -> None:
    """The exact texts the model will see for each logged turn: the policy prompt (images in the logged order,
    <image> not yet expanded), its training target, and the binary and ternary decoder prompts (none on a
    game's last turn). Read these before spending GPU hours."""
    from respect_hpc.config.schema import ModelSection
    from respect_hpc.data.logs import ingest
    from respect_hpc.model.loading import is_multimodal_model, load_tokenizer
    from respect_hpc.model.replica import write_interface
    from respect_hpc.report.prompt_table import prompt_rows

    turns = ingest(sources, policies=None).turns  # any policy name
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSection(path=model or write_interface("idefics2-8b", tmp))
        rows = prompt_rows(turns, load_tokenizer(spec), images=is_multimodal_model(spec), limit=limit)
    for row in rows:
        if as_json:
            print(json.dumps(row, ensure_ascii=False))
            continue
        views.rule(row["game_turn_id"])
        for key in ("policy", "policy_target", "decoder_binary", "decoder_ternary"):
            views.console.print(f"[bold]{key}[/bold]")
            views.say(repr(row[key]) if key == "policy_target" else row[key])  # exact text, never wrapped


@app.command()
def demo(manifest_path: Annotated[Path, typer.Argument(help="Seed-round manifest of the demo (a simulated "
                                                            "setting).")] = DEMO_MANIFEST,
         overrides: Overrides = None, *,
         rounds: Annotated[int, typer.Option("--rounds", min=1, max=10, help="Rounds after the seed round.")] = 1,
         variants: Annotated[Path, typer.Option("--variants", help="YAML list of the variants trained from round "
                                                                   "1 on.")] = DEMO_VARIANTS,
         executor: Executor = None) -> None:
    """The embedded default: the quick simulated setting, scaled to minutes on a CPU. Builds its inputs once
    (simulated D_0 and validation games, a policy base and a feedback decoder: tiny IDEFICS2-8B replicas
    taught offline), trains the seed policy, deploys it to a simulated speaker, decodes the speaker's
    follow-ups, trains on that feedback, selects and deploys again; ends with each policy's success with 95%
    intervals, the decoder against the simulator's truth, and whether the trained policy beat the control."""
    from respect_hpc.simulation.rounds import round_differences, verdict

    if "=" in manifest_path.name and not manifest_path.exists():  # `demo KEY=VALUE...`: the shipped manifest
        manifest_path, overrides = DEMO_MANIFEST, [str(manifest_path), *(overrides or [])]
    m, curve = _chain(manifest_path, overrides, rounds, variants_file(variants), executor)
    for line in verdict(curve, round_differences(m), m.round):
        views.say(line)
