"""The ``respect-hpc`` command line.

Bad input (a manifest problem, a bad log row, a missing file) ends with a
one-line message naming the file, row or field, and exit status 2.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import polars as pl
import submitit
import typer
import yaml
from rich.console import Console
from rich.table import Table

import jobs.decode
import jobs.deploy
import jobs.ingest
import jobs.metrics
import jobs.select
import jobs.train
from respect_hpc.data.datasets import DatasetError, is_idle, source_counts
from respect_hpc.cluster import executors as launch
from respect_hpc.cluster.controller import MANIFEST_FILE, Controller, ControllerError, sbatch_script
from respect_hpc.model.scorer import DecoderError
from respect_hpc.data.feedback import MergeError
from respect_hpc.model.loading import ModelError, is_multimodal
from respect_hpc.domain.policies import PUBLIC_POLICIES
from respect_hpc.data.logs import IngestError, ingest
from respect_hpc.config.loading import ManifestError, load_manifest, manifest_json_schema
from respect_hpc.report.round_metrics import N_RESAMPLES, round_metrics
from respect_hpc.domain.multiref import DEFAULT_MAX_TURNS
from respect_hpc.model.policy_inputs import PolicyDataError
from respect_hpc.report.prompt_table import prompt_rows
from respect_hpc.model.replica import INTERFACES, ReplicaError, replica_from, replica_like, write_interface
from respect_hpc.core.rundir import RunDir
from respect_hpc.cluster.scheduler import LockError, RunLock
from respect_hpc.core.io import atomic_write_parquet, atomic_write_text
from respect_hpc.simulation.teaching import teach_decoder, teach_label_words
from respect_hpc.training.trainer import TrainingError
from respect_hpc.domain.synthetic import DEFAULT_KILOGRAM, draw_procedural_images, load_image_bank, synthesize

DEMO_MANIFEST = Path("manifests/demo.yaml")
LEARNING_CURVE_FILE = "learning_curve.parquet"  # loop: round metrics of every round's simulated deployment
SIMULATED_IMAGE_TOKENS = 4  # loop's policy base: tokens an image (IDEFICS2-8B: 64), so that it trains on a CPU

app = typer.Typer(help="Retrospective learning from interactions (ReSpect), one round at a time, "
                       "on this machine or a SLURM cluster.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes: no wrapping of tables
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

Sources = Annotated[list[Path], typer.Argument(help="Parquet or JSON-lines logs in the public interaction or "
                                                    "turn layout, or folders of them.")]
Quarantine = Annotated[bool, typer.Option("--quarantine", help="Keep bad rows aside (quarantine.parquet) "
                                                               "instead of stopping at the first.")]
MaxTurns = Annotated[int, typer.Option(help="Turn limit of a game; longer games are bad rows.")]
Policies = Annotated[list[str] | None, typer.Option("--policy", help="A policy name to accept besides the "
                                                                     "public ones (repeatable).")]
MaxRound = Annotated[int | None, typer.Option(help="Highest round to accept; later rounds are bad rows.")]


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _ingest_options(quarantine: bool, max_turns: int, policy: list[str] | None, max_round: int | None) -> dict:
    return {"quarantine": quarantine, "max_turns": max_turns,
            "policies": tuple(PUBLIC_POLICIES) + tuple(policy or ()), "max_round": max_round}


@app.command()
def validate(manifest: Annotated[Path, typer.Argument(help="Round manifest (YAML).")],
             files: Annotated[bool, typer.Option(help="Check that the files the manifest names exist "
                                                      "(--no-files to check a cluster manifest elsewhere).")] = True,
             ) -> None:
    """Check a round manifest: prints ok, or one FILE:LINE: field: problem line each and exits 2."""
    try:
        load_manifest(manifest, check_files=files)
    except ManifestError as exc:
        for problem in exc.problems:
            print(problem)
        raise typer.Exit(2) from None
    print("ok")


@app.command()
def schema() -> None:
    """Print the JSON schema of round manifests (for editor completion)."""
    print(json.dumps(manifest_json_schema(), indent=2))


@app.command("ingest")
def ingest_command(sources: Sources,
                   out: Annotated[Path, typer.Option(help="Folder for interactions.parquet and turns.parquet.")],
                   quarantine: Quarantine = False, max_turns: MaxTurns = DEFAULT_MAX_TURNS,
                   policy: Policies = None, max_round: MaxRound = None) -> None:
    """Normalise logs into interactions.parquet and turns.parquet (one row per logged action)."""
    if out.exists() and not out.is_dir():
        _fail(f"--out {out}: exists and is a file; expected a folder for interactions.parquet and turns.parquet")
    try:
        with err.status("ingesting"):
            result = jobs.ingest.run(sources, out, **_ingest_options(quarantine, max_turns, policy, max_round))
    except IngestError as exc:
        _fail(str(exc))
    console.print(f"{result.interactions.height} games, {result.turns.height} turns -> {out}")
    if quarantine:
        console.print(result.accounting() + (f" (see {out / jobs.ingest.QUARANTINE_FILE})"
                                             if result.rows_quarantined else ""))


def print_metrics(metrics, title: str = "round metrics") -> None:
    table = Table(title=title)
    for name in ("policy", "round", "games", "success", "turns", "click acc.", "vocab", "utt. len",
                 "resets", "try again"):
        table.add_column(name, justify="left" if name == "policy" else "right")
    for row in metrics.iter_rows(named=True):
        table.add_row(
            row["policy"], str(row["round"]), str(row["games"]),
            f"{100 * row['success_rate']:.1f} [{100 * row['success_ci_low']:.1f}, {100 * row['success_ci_high']:.1f}]",
            f"{row['turns_mean']:.2f} [{row['turns_ci_low']:.2f}, {row['turns_ci_high']:.2f}]",
            f"{row['click_accuracy']:.3f}", str(row["vocab_size"]), f"{row['utterance_len_mean']:.2f}",
            str(row["reset_count"]), str(row["try_again_count"]))
    console.print(table)


@app.command()
def metrics(sources: Sources,
            as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line per (policy, round).")]
            = False,
            seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the bootstrap.")] = 0,
            resamples: Annotated[int, typer.Option(min=1, max=10_000_000,
                                                   help="Bootstrap resamples per interval.")] = N_RESAMPLES,
            quarantine: Quarantine = False, max_turns: MaxTurns = DEFAULT_MAX_TURNS,
            policy: Policies = None, max_round: MaxRound = None) -> None:
    """Round metrics per (policy, round): success rate and turns per game with 95% bootstrap intervals,
    click accuracy, and the speakers' language."""
    try:
        result = ingest(sources, **_ingest_options(quarantine, max_turns, policy, max_round))
    except IngestError as exc:
        _fail(str(exc))
    if quarantine and result.rows_quarantined:
        err.print(result.accounting())
    table = round_metrics(result.interactions, result.turns, seed=seed, n_resamples=resamples)
    if as_json:
        for row in table.iter_rows(named=True):
            sys.stdout.write(json.dumps(row) + "\n")
    else:
        print_metrics(table)


def _parse_policies(specs: list[str]) -> dict[str, float]:
    policies = {}
    for spec in specs:
        name, _, skill = spec.partition("=")
        try:
            policies[name] = float(skill)
        except ValueError:
            _fail(f"--policy {spec!r}: expected NAME=SKILL with SKILL a number in [0, 1]")
        if not 0 <= policies[name] <= 1:
            _fail(f"--policy {spec!r}: SKILL must lie in [0, 1]")
    return policies


@app.command()
def synth(out: Annotated[Path, typer.Argument(help="Output file: .parquet or .jsonl (public interaction layout).")],
          games: Annotated[int, typer.Option(help="Games per (policy, round).")] = 100,
          policy: Annotated[list[str] | None, typer.Option(help="NAME=SKILL, repeatable; skill in [0, 1] is how "
                                                               "often the policy picks the described target.")]
          = None,
          rounds: Annotated[list[int] | None, typer.Option("--round", help="Rounds to generate (repeatable).")]
          = None,
          seed: int = 0,
          images: Annotated[Path | None, typer.Option(help="Where to draw the procedural images when KiloGram "
                                                          "is absent.")] = None) -> None:
    """Generate seeded synthetic MultiRef logs (real KiloGram names and descriptions when present)."""
    bank = load_image_bank(DEFAULT_KILOGRAM)
    if bank.source == "procedural" and images is not None:
        draw_procedural_images(bank, images)
    if out.suffix not in (".parquet", ".jsonl"):
        _fail(f"{out}: expected a .parquet or .jsonl file name")
    frame = synthesize(games, seed=seed, policies=_parse_policies(policy or ["sft=0.45"]),
                       rounds=rounds or [0], bank=bank)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.write_parquet(out)
    else:
        frame.write_ndjson(out)
    console.print(f"{frame.height} synthetic games ({bank.source} images) -> {out}")


def _manifest(path: Path, executor: str | None = None):
    """Load a manifest, or end with its first problem in one line."""
    try:
        m = load_manifest(path)
    except ManifestError as exc:
        _fail(exc.problems[0] + (f" (and {len(exc.problems) - 1} more: respect-hpc validate)"
                                 if len(exc.problems) > 1 else ""))
    if executor not in (None, "local", "slurm", "debug"):
        _fail(f"--executor {executor!r}: expected local, slurm or debug")
    return m


def _ensure_turns(m) -> None:
    """Run the ingest stage for a manifest whose run directory has no turns table yet."""
    if not jobs.ingest.is_done(m):
        with err.status("ingesting"):
            summary = jobs.ingest.stage(m)
        console.print(f"ingest: {summary} -> {RunDir.of(m).data}")


def print_label_counts(feedback) -> None:
    table = Table(title="decoded feedback")
    counts = jobs.decode.label_counts(feedback)
    for name in counts.columns:
        table.add_column(name, justify="left" if name in ("kind", "policy") else "right")
    for row in counts.iter_rows():
        table.add_row(*map(str, row))
    console.print(table)


def _decode(m, shard: int | None, num_shards: int, merge_only: bool, check: int, submit: bool = False,
            executor: str | None = None) -> None:
    try:
        _ensure_turns(m)
        if shard is not None:
            jobs.decode.run_shard(m, shard, num_shards)
            return
        if submit:
            jobs.decode.submit_shards(m, num_shards, executor)
        elif not merge_only:
            for index in range(num_shards):
                jobs.decode.run_shard(m, index, num_shards)
        feedback = jobs.decode.merge(m, num_shards)
        print_label_counts(feedback)
        if check:
            agree, checked = jobs.decode.check_generation(m, feedback, check)
            console.print(f"greedy generation agrees with scoring on {agree}/{checked} windows "
                          f"({100 * agree / max(checked, 1):.1f}%)")
    except (IngestError, ModelError, DecoderError, MergeError, FileNotFoundError, ValueError,
            submitit.core.utils.FailedJobError) as exc:
        _fail(str(exc).strip().splitlines()[-1] if isinstance(exc, submitit.core.utils.FailedJobError) else str(exc))


@app.command()
def decode(manifest: Annotated[Path, typer.Argument(help="Round manifest (YAML).")],
           shard: Annotated[int | None, typer.Option(help="Decode only this shard (one array task).")] = None,
           num_shards: Annotated[int | None, typer.Option(help="Shards in all (default: decoder.shards).")] = None,
           merge: Annotated[bool, typer.Option("--merge", help="Only check the parts and merge them.")] = False,
           check: Annotated[int, typer.Option(help="Also greedy-generate N sampled windows per kind and report "
                                                    "agreement with scoring.")] = 0,
           submit: Annotated[bool, typer.Option("--submit", help="Run the shards as one array job of the "
                                                                 "manifest's executor, then merge.")] = False,
           executor: Annotated[str | None, typer.Option(help="Override cluster.executor: local, slurm or debug.")]
           = None) -> None:
    """Decode implicit feedback of every logged action with a follow-up, with the original base model.

    Without --shard: every shard in turn, then the merge, then a summary of label counts. A shard whose
    part is current is skipped; windows decoded in earlier rounds are reused."""
    m = _manifest(manifest, executor)
    _decode(m, shard, num_shards or m.decoder.shards, merge, check, submit, executor)


DATASET_COLUMNS = ("source", "policy", "round", "game_turn_id", "label", "reward", "weight", "action", "prob_action")


@app.command()
def dataset(manifest: Annotated[Path, typer.Argument(help="Round manifest (YAML).")],
            variant: Annotated[str, typer.Option(help="Variant name from the manifest, e.g. b-fft.")],
            seed: Annotated[int, typer.Option(help="Seed of the task (negative subsampling, augmentation).")],
            out: Annotated[Path, typer.Option(help="Parquet file for the examples.")]) -> None:
    """Write the exact examples a training task will use, one row each (source: log, d0 or augmented; the
    policy and round that logged it; label, reward, weight; the action in the official format; p), and
    print where they come from. Needs the round's ingest and decode stages done."""
    m = _manifest(manifest)
    try:
        prepared = jobs.train.prepare(m, variant, seed)
    except (TrainingError, DatasetError, ModelError, IngestError, PolicyDataError) as exc:
        _fail(str(exc))
    examples = prepared.examples.select(DATASET_COLUMNS)
    atomic_write_parquet(examples, out)
    table = Table(title=f"{variant} seed {seed}: {examples.height} examples -> {out}")
    for name in ("source", "policy", "round", "examples", "positive", "negative"):
        table.add_column(name, justify="left" if name in ("source", "policy") else "right")
    for row in source_counts(examples).iter_rows():
        table.add_row(*map(str, row))
    console.print(table)


@app.command()
def train(manifest: Annotated[Path, typer.Argument(help="Round manifest (YAML).")],
          variant: Annotated[str, typer.Option(help="Variant name from the manifest, e.g. b-fft.")],
          seed: Annotated[int, typer.Option(help="Seed: LoRA initialisation, data order, subsampling.")],
          submit: Annotated[bool, typer.Option("--submit", help="Run the task as a job of the manifest's executor "
                                                                "(one process per GPU) and wait.")] = False,
          executor: Annotated[str | None, typer.Option(help="Override cluster.executor: local, slurm or debug.")]
          = None) -> None:
    """Train one task of the round: LoRA on the policy for one variant and seed.

    Writes round-R/train/<variant>/seed-<s>/: a checkpoint and the validation exact match every epoch
    (epochs/epoch-EEE/ adapters, metrics.parquet), done.json at the end. A rerun resumes from the newest
    checkpoint, or does nothing when the task is done with the same inputs. SIGUSR2 or SIGTERM stops
    it at the next optimizer step with a checkpoint saved."""
    m = _manifest(manifest, executor)
    try:
        if submit:
            job = launch.executor(m, "train", executor).submit(jobs.train.TrainTask(m, variant, seed))
            console.print(f"train {variant} seed {seed}: job {job.job_id}; log {job.paths.stderr}")
            result = job.results()[0]  # one result per process; the first process's is the task's
        else:
            result = jobs.train.run_task(m, variant, seed)
    except (TrainingError, DatasetError, ModelError, IngestError, PolicyDataError) as exc:
        _fail(str(exc))
    except submitit.core.utils.FailedJobError as exc:
        _fail(str(exc).strip().splitlines()[-1])
    console.print(f"{variant} seed {seed}: best epoch {result['best_epoch']}, validation exact match "
                  f"{result['val_exact_match']:.3f} (loss {result['val_loss']:.4f}) -> "
                  f"{jobs.train.task_dir(m, variant, seed)}")


@app.command()
def report(sources: Annotated[list[Path], typer.Argument(help="Run directories, and files or folders of public "
                                                               "tables (interaction, turn, human_eval, "
                                                               "feedback_decoder_*, turn evaluations).")],
           out: Annotated[Path, typer.Option(help="Folder for tables/, plots/ and report.html.")] = Path("report"),
           embeddings: Annotated[Path | None, typer.Option(help="Parquet table image -> embedding (list of "
                                                                "floats) for the similarity Sim(a, a*).")] = None,
           seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
           resamples: Annotated[int, typer.Option(help="Bootstrap resamples per interval.")] = N_RESAMPLES) -> None:
    """Aggregate rounds, variants and sweeps into tables (Parquet, CSV), plots (PNG) and one HTML page."""
    from respect_hpc.report import build as reporting

    with err.status("aggregating"):
        built = reporting.build(sources, embeddings, seed=seed, n_resamples=resamples)
        page = reporting.write(built, out)
    for line in built.missing:
        err.print(f"[yellow]missing:[/yellow] {line}", highlight=False, soft_wrap=True)
    console.print(f"{len(built.tables)} tables -> {out / 'tables'}; report -> {page}")


Executor = Annotated[str | None, typer.Option(help="Override cluster.executor: local, slurm or debug.")]
Workdir = Annotated[Path | None, typer.Option(help="Override the manifest's workdir (where run directories go).")]
ClusterProfile = Annotated[Path | None, typer.Option("--cluster", help="A cluster profile (YAML with a cluster "
                                                                       "section, see slurm/profiles/) replacing "
                                                                       "the manifest's.")]


def _cluster_profile(path: Path):
    from pydantic import ValidationError

    from respect_hpc.config.schema import ClusterSection

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"{path}: not a readable YAML file ({exc})")
    if not isinstance(data, dict) or not isinstance(data.get("cluster"), dict):
        _fail(f"{path}: expected a mapping with a 'cluster' section")
    try:
        return ClusterSection.model_validate(data["cluster"])
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"{path}: cluster.{'.'.join(map(str, first['loc']))}: {first['msg']}")


def _controller(manifest: Path, executor: str | None, workdir: Path | None,
                cluster: Path | None = None) -> Controller:
    m = _manifest(manifest, executor)
    if workdir is not None:
        m = m.model_copy(update={"workdir": workdir})
    if cluster is not None:
        m = m.model_copy(update={"cluster": _cluster_profile(cluster)})
    return Controller(m, executor, report=lambda line: err.print(line, highlight=False, soft_wrap=True))


def print_lineage(m) -> None:
    """Each variant's lineage: the logged turns (not idle) it trains on per policy and round, once ingested."""
    if m.seed_round:
        return
    turns_path = jobs.train.inputs(m)[0]
    turns = pl.read_parquet(turns_path).filter(~is_idle()) if turns_path.is_file() else None
    table = Table(title="lineage: logged turns each variant trains on" + ("" if turns is not None else
                                                                         " (known after the ingest stage)"))
    for name in ("variant", "policies", "policy", "round", "turns"):
        table.add_column(name, justify="right" if name in ("round", "turns") else "left")
    for v in m.variants:
        mine = None if turns is None else turns.filter(pl.col("policy").is_in(v.policies)) if v.policies else turns
        lineage = ", ".join(v.policies) if v.policies else "every policy"
        if mine is None or mine.is_empty():
            table.add_row(v.name, lineage, "-" if mine is None else "none: refused at training", "", "")
            continue
        for policy, round_, n in mine.group_by("policy", "round").len().sort("policy", "round").rows():
            table.add_row(v.name, lineage, policy, str(round_), str(n))
    console.print(table)


@app.command()
def plan(manifest: Annotated[Path, typer.Argument(help="Round manifest (YAML).")], executor: Executor = None,
         workdir: Workdir = None, cluster: ClusterProfile = None) -> None:
    """Show the round's stages, their tasks (done and to do), resources, and the sbatch script of each
    array; submits nothing."""
    controller = _controller(manifest, executor, workdir, cluster)
    m = controller.manifest
    table = Table(title=f"round {m.round} of {m.experiment} ({controller.kind} executor)")
    for name in ("stage", "tasks", "done", "to do", "GPUs", "CPUs", "memory", "time", "nodes x processes"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    try:
        stages = controller.plan()
    except (TrainingError, ModelError, IngestError, FileNotFoundError) as exc:
        _fail(str(exc))
    for stage in stages:
        r = m.cluster.stages[stage.name]
        table.add_row(stage.name, str(len(stage.tasks)), str(len(stage.done)), str(len(stage.todo)), str(r.gpus),
                      str(r.cpus), f"{r.mem_gb} GB", f"{r.time_min} min", f"{r.nodes} x {r.processes}")
    console.print(table)
    print_lineage(m)
    if not any(stage.todo for stage in stages):
        console.print("every task is done: run would submit nothing")
    for stage in stages:
        if stage.todo:
            console.rule(f"{stage.name}: sbatch script of its array ({len(stage.todo)} tasks)")
            console.print(sbatch_script(m, stage.name, len(stage.todo)), highlight=False, markup=False)


@app.command()
def run(manifest: Annotated[Path, typer.Argument(help="Round manifest (YAML).")], executor: Executor = None,
        workdir: Workdir = None, cluster: ClusterProfile = None,
        detach: Annotated[bool, typer.Option("--detach", help="Submit every stage (chained with afterok) and "
                                                              "return; Slurm only.")] = False,
        retry: Annotated[bool, typer.Option("--retry", help="Resubmit the tasks that failed (and what depends on "
                                                            "them).")] = False) -> None:
    """Run a whole round: ingest -> decode (array of shards) -> merge -> train (array of variants x seeds)
    -> select -> round metrics. Done tasks are skipped; a rerun of a finished round submits nothing."""
    controller = _controller(manifest, executor, workdir, cluster)
    try:
        with RunLock(controller.run_dir.root, report=controller.report):
            controller.run(detach=detach, retry=retry)
    except (ControllerError, LockError, TrainingError, ModelError, IngestError) as exc:
        _fail(str(exc))
    if not detach:
        round_summary(controller.manifest)


def round_summary(m) -> None:
    """Decoded label counts, the selected checkpoint of each variant, and the round metrics."""
    run_dir = RunDir.of(m)
    feedback = run_dir.round(m.round) / jobs.decode.FEEDBACK_FILE
    if feedback.is_file():
        print_label_counts(pl.read_parquet(feedback).filter(pl.col("round") < m.round))
    selection = run_dir.round(m.round) / jobs.select.SELECTION_FILE
    if selection.is_file():
        chosen = pl.read_parquet(selection)
        table = Table(title=f"selected checkpoints -> {run_dir.round(m.round) / 'policies'}")
        columns = ("variant", "cell", "seed", "epoch", "val_exact_match", "val_loss", "seeds", "mean_val_exact_match",
                   "chosen")
        for name in columns:
            table.add_column(name, justify="left" if name in ("variant", "cell") else "right")
        for row in chosen.iter_rows(named=True):
            table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
        console.print(table)
    metrics = run_dir.metrics(m.round) / jobs.metrics.METRICS_FILE
    if metrics.is_file():
        print_metrics(pl.read_parquet(metrics), title=f"round metrics ({metrics})")


def _variants_file(path: Path | None) -> list[dict] | None:
    """A YAML list of variants (as a manifest's ``variants``), checked; None without a file."""
    if path is None:
        return None
    from pydantic import TypeAdapter, ValidationError

    from respect_hpc.config.schema import Variant

    try:
        data = yaml.safe_load(path.read_text())
        TypeAdapter(list[Variant]).validate_python(data)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        _fail(f"{path}: not a readable YAML file ({exc})")
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}")
    return data


def write_next_round(manifest: Path, logs: list[Path], variants: list[dict] | None) -> Path:
    """Write the next round's manifest beside ``manifest`` (chain.py), checked; returns its path."""
    from respect_hpc.config.chain import next_path, next_round

    m = _manifest(manifest)
    missing = [str(p) for p in logs if not p.is_file()]
    if missing:
        _fail(f"--logs: no file {missing[0]}")
    raw = yaml.safe_load(manifest.read_text())
    out = next_path(manifest, m.round + 1)
    text = yaml.safe_dump(next_round(raw, [p.absolute() for p in logs], variants), sort_keys=False)
    atomic_write_text(f"# round {m.round + 1}, written by respect-hpc next-round from {manifest.name}\n{text}", out)
    _manifest(out)
    return out


@app.command("next-round")
def next_round_command(
        manifest: Annotated[Path, typer.Argument(help="This round's manifest (YAML).")],
        logs: Annotated[list[Path], typer.Option("--logs", help="Logs of this round's deployment (public "
                                                                "interaction or turn layout; repeatable).")],
        variants: Annotated[Path | None, typer.Option(
            "--variants", help="YAML list of the variants to train from now on (default: this manifest's; "
                               "from the seed round, the paper's six).")] = None) -> None:
    """Write the next round's manifest beside this one (<name>-round<R+1>.yaml): round + 1, the logs added to
    data.interactions and to each variant's lineage (under the variant's own name, the policy name its
    deployment logs), KTO continuing from this round's selected policies. Everything else stays as written."""
    out = write_next_round(manifest, logs, _variants_file(variants))
    console.print(f"round {_manifest(out).round}: {out}")


@app.command()
def loop(manifest: Annotated[Path, typer.Argument(help="Manifest of the first round to run (usually the seed "
                                                       "round) with a simulation section.")],
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
    chosen = _variants_file(variants)
    try:
        simulation_inputs(load_manifest(manifest, check_files=False))
    except ManifestError as exc:
        _fail(exc.problems[0])
    path = manifest
    while True:
        controller = _controller(path, executor, None)
        m = controller.manifest
        if m.simulation is None:
            _fail(f"{path}: loop deploys every round to a simulated speaker: the manifest needs a simulation section")
        if m.round > rounds:
            _fail(f"{path}: round {m.round} is past --rounds {rounds}")
        err.print(f"round {m.round}: {path}", highlight=False)
        try:
            with RunLock(controller.run_dir.root, report=controller.report):
                controller.run()
        except (ControllerError, LockError, TrainingError, ModelError, IngestError) as exc:
            _fail(str(exc))
        if m.round == rounds:
            break
        path = write_next_round(path, [RunDir.of(m).round(m.round) / jobs.deploy.DEPLOYED_FILE],
                                chosen if m.seed_round else None)
    curve = learning_curve(m)
    atomic_write_parquet(curve, RunDir.of(m).root / LEARNING_CURVE_FILE)
    print_metrics(curve, title=f"simulated deployments of {m.experiment}, rounds 0 to {m.round} "
                               f"(-> {RunDir.of(m).root / LEARNING_CURVE_FILE})")
    print_decoder_truth(m)


def simulation_inputs(m) -> None:
    """Write what a simulated experiment's manifest names and lacks: D_0 (the successful games of
    ``simulation.games`` simulated human-human games) and validation games (a quarter as many), spoken from
    the seed half of each tangram's descriptions; the decoder, a tiny IDEFICS2-8B replica taught to answer
    decoder prompts (:func:`~respect_hpc.simulation.teaching.teach_decoder`); the policy base, a tiny IDEFICS2-8B replica
    with ``SIMULATED_IMAGE_TOKENS`` tokens an image, taught the listener's turns for ``simulation.teach_steps``
    steps (the same replica taught both where the manifest names no decoder model)."""
    from respect_hpc.domain.simulator import description_pool, human_games
    from respect_hpc.simulation.teaching import teach_listener

    sim = m.simulation
    if sim is None:
        return
    bank = load_image_bank(sim.kilogram, dense="dense.json")
    if bank.source != "kilogram":
        _fail(f"simulation.kilogram: no dense.json in '{sim.kilogram}'")
    settings = sim.speaker_settings(pool="seed")
    try:
        descriptions = description_pool(bank.descriptions, "seed", sim.tangrams, sim.descriptions)
    except ValueError as e:
        _fail(str(e))
    made = {m.data.seed_data: (sim.games, 1), m.data.validation: (max(sim.games // 4, 4), 2)}
    for path, (n, seed) in made.items():
        if path is not None and not path.exists():
            frame = pl.DataFrame(human_games(n, descriptions, settings, seed=seed)).drop("truth")
            if path == m.data.seed_data:
                frame = frame.filter(pl.col("end") == "successful")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_parquet(frame, path)
            console.print(f"{frame.height} simulated human-human games -> {path}")
    decoder = (m.decoder.model or m.model).path

    def decoder_lessons(folder: Path) -> None:
        with err.status("teaching the replica the decoder's answers"):
            teach_decoder(folder, descriptions, settings, sim.games)

    def policy_base(folder: Path) -> None:
        replica_like("idefics2-8b", folder, image_tokens=SIMULATED_IMAGE_TOKENS)
        if sim.teach_steps:
            losses = teach_listener(folder, m.data.images, descriptions, settings, template=m.policy_template,
                                    image_size=m.model.image_size, steps=sim.teach_steps)
            console.print(f"policy base taught the listener in {sim.teach_steps} steps (loss "
                          f"{sum(losses[:20]) / len(losses[:20]):.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f})")
        if decoder == m.model.path:
            decoder_lessons(folder)

    if not m.model.path.exists():
        build_model(m.model.path, policy_base)
        console.print(f"tiny IDEFICS2-8B replica, policy base -> {m.model.path}")
    if not decoder.exists():
        build_model(decoder, lambda folder: decoder_lessons(replica_like("idefics2-8b", folder)))
        console.print(f"tiny IDEFICS2-8B replica taught to answer decoder prompts -> {decoder}")


def build_model(folder: Path, build) -> None:
    """Run ``build`` on a partial folder beside ``folder`` and rename it into place once done, so that a run
    killed while building or teaching a model builds it again instead of going on with a half-taught one."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    partial.rename(folder)


def print_decoder_truth(m) -> None:
    """Each round's decoded labels against the simulator's truth of the turns they label."""
    from respect_hpc.report.audit import decoder_quality, simulated_truth_pairs

    run_dir = RunDir.of(m)
    truth = [run_dir.round(r) / jobs.deploy.TRUTH_FILE for r in range(m.round + 1)]
    truth = pl.concat([pl.read_parquet(p) for p in truth if p.is_file()])
    rows = []
    for r in range(1, m.round + 1):
        feedback = run_dir.round(r) / jobs.decode.FEEDBACK_FILE
        if feedback.is_file():
            quality = decoder_quality(simulated_truth_pairs(pl.read_parquet(feedback), truth))
            rows.append(quality.filter(pl.col("round") == r - 1).with_columns(decoded_in=pl.lit(r)))
    if not rows:
        return
    table = Table(title="decoded feedback against the simulator's truth (neutral counts as positive)")
    for name in ("kind", "logged round", "windows", "precision", "false positive rate", "accuracy"):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for row in pl.concat(rows).iter_rows(named=True):
        table.add_row(row["kind"], str(row["round"]), str(row["windows"]), f"{row['precision_positive']:.3f}",
                      f"{row['false_positive_rate']:.3f}", f"{row['accuracy']:.3f}")
    console.print(table)


def learning_curve(m) -> pl.DataFrame:
    """Round metrics (success and turns with intervals) of every round's simulated deployment so far."""
    run_dir = RunDir.of(m)
    games = [run_dir.round(r) / jobs.deploy.DEPLOYED_FILE for r in range(m.round + 1)]
    result = ingest([p for p in games if p.is_file()], policies=None)
    return round_metrics(result.interactions, result.turns)


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="Run directory (<workdir>/<experiment>).")],
           round_: Annotated[int | None, typer.Option("--round", help="Round (default: the latest submitted).")]
           = None) -> None:
    """Tasks per stage (done, pending, running, failed, cancelled) from the scheduler, with each failed
    task's last error line and log."""
    lock = run_dir / MANIFEST_FILE
    if not lock.is_file():
        _fail(f"{run_dir}: no {MANIFEST_FILE}; nothing was submitted from this run directory")
    from pydantic import ValidationError

    from respect_hpc.config.schema import Manifest

    try:
        m = Manifest.model_validate_json(lock.read_text())
    except (ValidationError, UnicodeDecodeError):
        _fail(f"{lock}: damaged or written by another version; `respect-hpc run MANIFEST` writes it again")
    # the state of this run directory, wherever it was made or moved to
    m = m.model_copy(update={"workdir": run_dir.absolute().parent, "experiment": run_dir.absolute().name,
                             **({} if round_ is None else {"round": round_})})
    rows = Controller(m).status()
    table = Table(title=f"{run_dir} round {m.round}")
    states = ["done", "pending", "running", "failed", "cancelled", "out of date", "not submitted"]
    for name in ["stage", *states, "other"]:
        table.add_column(name, justify="left" if name == "stage" else "right")
    for stage in dict.fromkeys(r.stage for r in rows):
        mine = [r.state for r in rows if r.stage == stage]
        table.add_row(stage, *(str(mine.count(s)) for s in states), str(sum(s not in states for s in mine)))
    console.print(table)
    for r in rows:
        if r.state in ("failed", "cancelled"):
            console.print(f"{r.stage} {r.key}: {r.state}: {r.detail}  (log: {r.log})", highlight=False)


@app.command("tiny-model")
def tiny_model(out: Annotated[Path, typer.Argument(help="Folder to write the replica to (new or empty).")],
               like: Annotated[str | None, typer.Option(help=f"A known model: {', '.join(INTERFACES)}.")] = None,
               source: Annotated[Path | None, typer.Option("--from", help="A local checkpoint folder to scale "
                                                                          "down.")] = None,
               seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0) -> None:
    """A tiny random-weight model with a real model's interface: its tokenizer, special tokens, chat template,
    processor and generation settings, architecture family and vocabulary, at a width and depth a CPU runs in
    seconds. Use it to dry-run a manifest (model.path) on a login node before spending GPU hours."""
    if (like is None) == (source is None):
        _fail("tiny-model: give exactly one of --like NAME or --from MODEL_DIR")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"tiny-model: '{out}' exists and is not an empty folder")
    try:
        folder = replica_like(like, out, seed=seed) if like else replica_from(source, out, seed=seed)
    except (ReplicaError, OSError) as exc:
        _fail(str(exc))
    console.print(f"tiny replica of {like or source} (random weights) -> {folder}")


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
    from transformers import AutoConfig

    from respect_hpc.config.schema import ModelSection
    from respect_hpc.model.loading import load_tokenizer

    try:
        turns = ingest(sources, policies=None).turns  # any policy name
        with tempfile.TemporaryDirectory() as tmp:
            folder = model or write_interface("idefics2-8b", tmp)
            tokenizer = load_tokenizer(ModelSection(path=folder))
            rows = prompt_rows(turns, tokenizer, images=is_multimodal(AutoConfig.from_pretrained(folder)), limit=limit)
    except (IngestError, ModelError, ReplicaError, PolicyDataError, ValueError) as exc:
        _fail(str(exc))
    for row in rows:
        if as_json:
            print(json.dumps(row, ensure_ascii=False))
            continue
        console.rule(row["game_turn_id"])
        for key in ("policy", "policy_target", "decoder_binary", "decoder_ternary"):
            console.print(f"[bold]{key}[/bold]")
            print(repr(row[key]) if key == "policy_target" else row[key])  # exact text, never wrapped


@app.command()
def demo(manifest: Annotated[Path, typer.Argument(help="Round manifest of the demo.")] = DEMO_MANIFEST,
         games: Annotated[int, typer.Option(help="Synthetic games of the logged round.")] = 40) -> None:
    """The embedded default: writes the synthetic logs, D_0, validation games, images and the tiny model the
    demo manifest names (once), then runs the whole round on this machine and prints its summary."""
    try:
        m = load_manifest(manifest, check_files=False)
    except ManifestError as exc:
        _fail(exc.problems[0])
    bank = load_image_bank(DEFAULT_KILOGRAM)
    if m.data.images is not None and not m.data.images.exists():
        m.data.images.parent.mkdir(parents=True, exist_ok=True)
        if bank.source == "kilogram":
            m.data.images.symlink_to((DEFAULT_KILOGRAM / "tangram_pngs").resolve(), target_is_directory=True)
        else:
            draw_procedural_images(bank, m.data.images)
    files = {m.data.seed_data: (games // 3, {"human": 0.9}, 1), m.data.validation: (games // 4, {"human": 0.9}, 2)}
    if m.data.interactions:  # none in the seed round
        files[m.data.interactions[0]] = (games, {"sft": 0.45}, 0)
    for path, (n, policies, seed) in files.items():
        if path is not None and not path.exists():
            frame = synthesize(n, seed=seed, policies=policies, rounds=range(max(m.round, 1)), bank=bank,
                               max_turns=m.data.max_turns)
            if path == m.data.seed_data:  # D_0: successful games only
                frame = frame.filter(pl.col("end") == "successful")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_parquet(frame, path)
            console.print(f"{frame.height} synthetic games ({bank.source} images) -> {path}")
    if not m.model.path.exists():  # the same base in every round: taught on the logs, or on D_0 in the seed round
        turns = ingest(m.data.interactions or [m.data.seed_data], policies=None).turns
        with err.status("building a tiny IDEFICS2-8B replica offline and teaching it the decoder's answers"):
            build_model(m.model.path, lambda folder: teach_label_words(replica_like("idefics2-8b", folder), turns))
        console.print(f"tiny IDEFICS2-8B replica (random weights, taught to answer decoder prompts) -> {m.model.path}")
    run(manifest, None, None, None, False, False)


if __name__ == "__main__":
    app()
