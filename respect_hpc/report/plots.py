"""Report figures like the paper's: per-round curves with interval bands, confusion matrices, curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import polars as pl  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from respect_hpc.core.text import printable  # noqa: E402

LABELS = [1, 0, -1]
NAMES = {1: "pos", 0: "neu", -1: "neg"}


def _per_round(ax, table: pl.DataFrame, value: str, low: str | None, high: str | None, title: str) -> None:
    for (policy,), rows in sorted(table.partition_by("policy", as_dict=True).items()):
        rows = rows.sort("round")
        ax.plot(rows["round"], rows[value], marker="o", label=printable(policy))
        if low and high and rows[low].null_count() < rows.height:
            ax.fill_between(rows["round"], rows[low].fill_null(rows[value]), rows[high].fill_null(rows[value]),
                            alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(tables: dict[str, pl.DataFrame], folder: Path) -> dict[str, Path]:
    """Draw every figure the tables allow; returns figure name -> PNG path. Labels come from data (policy and
    variant names): drawn as plain text, never as mathtext (a ``$`` in a name would be parsed as TeX)."""
    with matplotlib.rc_context({"text.parse_math": False}):
        return _render(tables, folder)


def _render(tables: dict[str, pl.DataFrame], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if (m := tables.get("round_metrics")) is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        _per_round(axes[0], m, "success_rate", "success_ci_low", "success_ci_high", "success rate (95% CI)")
        _per_round(axes[1], m, "turns_mean", "turns_ci_low", "turns_ci_high", "turns per interaction (95% CI)")
        axes[0].legend(fontsize=8)
        plots["success_and_turns"] = _save(fig, folder / "success_and_turns.png")
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, (column, title) in zip(axes, [("vocab_size", "vocabulary size"),
                                              ("utterance_len_mean", "utterance length (words)"),
                                              ("reset_count", "reset utterances"),
                                              ("try_again_count", "try-again utterances")]):
            _per_round(ax, m, column, None, None, title)
        axes[0].legend(fontsize=8)
        plots["language"] = _save(fig, folder / "language.png")
    if (t := tables.get("turn_metrics")) is not None:
        fig, axes = plt.subplots(1, 4, figsize=(20, 4))
        for ax, name, title in zip(axes, ("exact_match", "similarity", "similarity_notebook", "positive_feedback"),
                                   ("exact match", "similarity Sim(a, a*), eq. 3",
                                    "similarity, as the official notebook", "positive feedback rate")):
            value = "positive_feedback_rate" if name == "positive_feedback" else name
            _per_round(ax, t, value, f"{name}_ci_low", f"{name}_ci_high", title)
        axes[0].legend(fontsize=8)
        plots["turn_metrics"] = _save(fig, folder / "turn_metrics.png")
    if (c := tables.get("decoder_confusion")) is not None:
        for (kind,), rows in sorted(c.partition_by("kind", as_dict=True).items()):
            rounds = sorted(rows["round"].unique().to_list(), key=lambda r: (r is None, r))
            fig, axes = plt.subplots(1, len(rounds), figsize=(3.4 * len(rounds), 3.2), squeeze=False)
            for ax, round_ in zip(axes[0], rounds):
                cell = rows.filter(pl.col("round").is_null() if round_ is None else pl.col("round") == round_)
                counts = {(h, d): n for h, d, n in cell.select("human", "decoded", "count").iter_rows()}
                grid = [[counts.get((h, d), 0) for d in LABELS] for h in LABELS]
                ax.imshow(grid, cmap="Blues")
                for i, row in enumerate(grid):
                    for j, n in enumerate(row):
                        ax.text(j, i, str(n), ha="center", va="center", fontsize=9)
                ax.set_xticks(range(3), [NAMES[x] for x in LABELS])
                ax.set_yticks(range(3), [NAMES[x] for x in LABELS])
                ax.set_xlabel("decoded")
                ax.set_ylabel("human")
                ax.set_title(f"{kind}, round {'?' if round_ is None else round_}")
            plots[f"confusion_{kind}"] = _save(fig, folder / f"confusion_{kind}.png")
    if (v := tables.get("validation_curves")) is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for (round_, variant, cell, seed), rows in sorted(
                v.partition_by("round", "variant", "cell", "seed", as_dict=True).items()):
            ax.plot(rows["epoch"], rows["val_exact_match"], marker=".",
                    label=printable(f"r{round_} {variant} {'' if cell == 'default' else cell + ' '}s{seed}"))
        ax.set_xlabel("epoch")
        ax.set_title("validation exact match")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        plots["validation_curves"] = _save(fig, folder / "validation_curves.png")
    return plots
