"""What the command line prints: tables of round metrics, decoded labels, selections, plans and task states.

Everything that comes from data (policy names, game ids, paths, utterances) is printed as text, never as
rich markup, with control characters made visible (:func:`plain`). Log lines and pipes get unwrapped tables.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from respect_hpc.core.text import printable

console = Console(width=None if sys.stdout.isatty() else 160, highlight=False, emoji=False)  # pipes: no wrapping of tables
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, highlight=False, emoji=False, soft_wrap=True)


def plain(value: object) -> str:
    """A value as printable text: control characters (escape sequences, carriage returns) made visible."""
    return printable(value)


def say(line: object, *, to: Console = console) -> None:
    """One line of text, never read as markup."""
    to.print(Text(plain(line)), soft_wrap=True)


def rule(title: object) -> None:
    console.rule(Text(plain(title)))


def error(message: object) -> None:
    err.print(Text.assemble(("error:", "red"), " ", plain(message)), soft_wrap=True)


def _table(title: str, columns: list[str], left: tuple[str, ...] = ()) -> Table:
    table = Table(title=Text(plain(title)))
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right")
    return table


def _row(table: Table, values) -> None:
    table.add_row(*(Text(plain(v)) for v in values))


def metrics_table(metrics, title: str = "round metrics") -> None:
    table = _table(title, ["policy", "round", "games", "success", "turns", "click acc.", "vocab", "utt. len",
                           "resets", "try again", "frustrated", "lazy"], ("policy",))
    for row in metrics.iter_rows(named=True):
        _row(table, (
            row["policy"], row["round"], row["games"],
            f"{100 * row['success_rate']:.1f} [{100 * row['success_ci_low']:.1f}, {100 * row['success_ci_high']:.1f}]",
            f"{row['turns_mean']:.2f} [{row['turns_ci_low']:.2f}, {row['turns_ci_high']:.2f}]",
            f"{row['click_accuracy']:.3f}", row["vocab_size"], f"{row['utterance_len_mean']:.2f}",
            row["reset_count"], row["try_again_count"], row["frustrated_occurrences"], row["lazy_occurrences"]))
    console.print(table)


def label_counts_table(counts) -> None:
    table = _table("decoded feedback", list(counts.columns), ("kind", "policy"))
    for row in counts.iter_rows():
        _row(table, row)
    console.print(table)


def selection_table(chosen, title: str) -> None:
    columns = ["variant", "cell", "seed", "epoch", "val_exact_match", "val_loss", "seeds", "mean_val_exact_match",
               "chosen"]
    table = _table(title, columns, ("variant", "cell"))
    for row in chosen.iter_rows(named=True):
        _row(table, (f"{row[c]:.3f}" if isinstance(row[c], float) else row[c] for c in columns))
    console.print(table)


def decoder_truth_table(quality) -> None:
    table = _table("decoded feedback against the simulator's truth (neutral counts as positive)",
                   ["kind", "logged round", "windows", "precision", "false positive rate", "accuracy"], ("kind",))
    for row in quality.iter_rows(named=True):
        _row(table, (row["kind"], row["round"], row["windows"], f"{row['precision_positive']:.3f}",
                     f"{row['false_positive_rate']:.3f}", f"{row['accuracy']:.3f}"))
    console.print(table)


def lineage_table(rows: list[tuple], known: bool) -> None:
    """``rows``: (variant, lineage, policy, round, turns) each."""
    table = _table("lineage: logged turns each variant trains on" + ("" if known else
                                                                     " (known after the ingest stage)"),
                   ["variant", "policies", "policy", "round", "turns"], ("variant", "policies", "policy"))
    for row in rows:
        _row(table, row)
    console.print(table)


def source_table(counts, title: str) -> None:
    table = _table(title, ["source", "policy", "round", "examples", "positive", "negative"], ("source", "policy"))
    for row in counts.iter_rows():
        _row(table, row)
    console.print(table)


def plan_table(title: str, stages, resources) -> None:
    table = _table(title, ["stage", "tasks", "done", "to do", "GPUs", "CPUs", "memory", "time", "nodes x processes"],
                   ("stage",))
    for stage in stages:
        r = resources[stage.name]
        _row(table, (stage.name, len(stage.tasks), len(stage.done), len(stage.todo), r.gpus, r.cpus,
                     f"{r.mem_gb} GB", f"{r.time_min} min", f"{r.nodes} x {r.processes}"))
    console.print(table)


STATES = ["done", "pending", "running", "failed", "cancelled", "interrupted", "out of date", "not submitted"]


def status_table(title: str, rows) -> None:
    table = _table(title, ["stage", *STATES, "other"], ("stage",))
    for stage in dict.fromkeys(r.stage for r in rows):
        mine = [r.state for r in rows if r.stage == stage]
        _row(table, (stage, *(mine.count(s) for s in STATES), sum(s not in STATES for s in mine)))
    console.print(table)
    for r in rows:
        if r.state in ("failed", "cancelled"):
            say(f"{r.stage} {r.key}: {r.state}: {r.detail}  (log: {r.log})")
        elif r.state == "running" and r.detail:
            say(f"{r.stage} {r.key}: running: {r.detail}")


def cost_table(spent, title: str) -> None:
    """Per stage (training also per variant): tasks, attempts, wall hours and GPU-hours; then the total."""
    import polars as pl

    rows = spent.with_columns(pl.when(pl.col("stage") == "train").then(
        pl.format("train {}", pl.col("task").str.split("/").list.first())).otherwise("stage").alias("part"))
    table = _table(title, ["stage", "tasks", "attempts", "hours", "GPU-hours"], ("stage",))
    for row in rows.group_by("part", maintain_order=True).agg(pl.len().alias("tasks"), pl.col("attempts").sum(),
                                                              pl.col("elapsed_h").sum(),
                                                              pl.col("gpu_hours").sum()).iter_rows(named=True):
        _row(table, (row["part"], row["tasks"], row["attempts"], f"{row['elapsed_h']:.3f}", f"{row['gpu_hours']:.3f}"))
    _row(table, ("round", spent.height, int(spent["attempts"].sum()), f"{spent['elapsed_h'].sum():.3f}",
                 f"{spent['gpu_hours'].sum():.3f}"))
    console.print(table)
