"""The demo's verdict: a trained policy's success minus the control's on the games both played."""

import polars as pl

from respect_hpc.domain.simulator import deployed_game_id
from respect_hpc.simulation.rounds import paired_difference, verdict


def games(policy: str, ends: list[bool]) -> list[dict]:
    return [{"game_id": deployed_game_id(1, policy, 0, n), "end": "successful" if ok else "unsuccessful",
             "policy_name": policy} for n, ok in enumerate(ends)]


def curve(rates: dict[str, tuple[float, int]]) -> pl.DataFrame:
    return pl.DataFrame([{"policy": p, "round": 1, "success_rate": r, "success_ci_low": r - 0.1,
                          "success_ci_high": r + 0.1, "games": n} for p, (r, n) in rates.items()])


def test_games_are_paired_by_number_and_the_control_s_extra_games_are_left_out():
    control = games("control", [False, True, False, True, False, False, True, True, True, True])
    trained = games("b-fft", [True, True, True, False, False, True])  # games 0-5 only
    frame = pl.DataFrame(list(reversed(control)) + trained)  # row order carries no pairing
    d = paired_difference(frame).row(0, named=True)
    # per game 0-5: +1, 0, +1, -1, 0, +1 -> mean 2/6
    assert d["policy"] == "b-fft" and d["games"] == 6
    assert abs(d["difference"] - 2 / 6) < 1e-12
    assert -1 <= d["ci_low"] < d["difference"] < d["ci_high"] <= 1


def test_the_verdict_says_better_only_when_the_paired_interval_is_above_zero():
    control = games("control", [False] * 10)
    better = paired_difference(pl.DataFrame(control + games("b-fft", [True] * 10)))
    assert better.row(0, named=True)["ci_low"] == 1.0  # every pair +1: no draw can say otherwise
    lines = verdict(curve({"control": (0.0, 10), "b-fft": (1.0, 10)}), better, 1)
    assert "on the 10 games both played, +100.0 points [+100.0, +100.0]: better" in lines[0]
    assert lines[-1].startswith("simulated:")

    same = paired_difference(pl.DataFrame(control + games("b-fft", [False] * 10)))
    lines = verdict(curve({"control": (0.0, 10), "b-fft": (0.0, 10)}), same, 1)
    assert lines[0].endswith("no difference shown at this size")

    worse = paired_difference(pl.DataFrame(games("control", [True] * 10) + games("b-fft", [False] * 10)))
    lines = verdict(curve({"control": (1.0, 10), "b-fft": (0.0, 10)}), worse, 1)
    assert lines[0].endswith("worse than the control")


def test_a_round_without_control_games_says_so():
    lines = verdict(curve({"b-fft": (0.5, 10)}), paired_difference(pl.DataFrame(games("b-fft", [True]))), 1)
    assert lines[0] == "round 1 has no control games to compare with"
