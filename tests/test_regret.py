"""Tests for w2s_clip_lab/regret.py: tuning rules judged by the regret of the point they pick."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import w2s_clip
from w2s_clip_lab import regret as R
from conftest import cli_args, run_cli


def rows(test_accuracy, agreement, weak_kl, val_loss, at_flags):
    """Planted tuning rows: each point's D'_test accuracy and its score under each rule."""
    return [{"values": {"tau": i}, "test_accuracy": a, "at_flags": i == at_flags,
             "scores": {"agreement": g, "weak-kl": k, "val-loss": v}}
            for i, (a, g, k, v) in enumerate(zip(test_accuracy, agreement, weak_kl, val_loss))]


def test_a_rule_that_picks_the_best_point_has_regret_zero_and_a_wrong_one_shows_it():
    """Planted: agreement rewards point 0 (the imitating one, 0.60 on D'_test), weak-kl and
    val-loss point 2 (the best, 0.75), the flags' point is 1 (0.70)."""
    t = rows([0.60, 0.70, 0.75], agreement=[0.9, 0.8, 0.7], weak_kl=[-0.5, -0.4, -0.3],
             val_loss=[-2.0, -1.5, -1.0], at_flags=1)
    assert R.pick(t, "agreement") == 0 and R.regret(t, "agreement") == pytest.approx(0.15)
    assert R.regret(t, "weak-kl") == 0 and R.regret(t, "val-loss") == 0
    assert R.pick(t, "none") == 1 and R.regret(t, "none") == pytest.approx(0.05)
    assert all(R.regret(t, rule) >= 0 for rule in R.RULES)


def test_ties_go_to_the_earlier_point_as_fit_tuned_breaks_them_and_none_needs_the_flags_point():
    t = rows([0.5, 0.9], agreement=[0.8, 0.8], weak_kl=[0, 0], val_loss=[0, 0], at_flags=None)
    assert R.pick(t, "agreement") == 0 and R.regret(t, "agreement") == pytest.approx(0.4)
    assert R.pick(t, "none") is None and R.regret(t, "none") is None


def test_a_diverged_point_is_never_picked_and_a_head_that_never_learned_loses_to_one_that_did():
    t = rows([0.3, 0.6, 0.7], agreement=[0.9, 0.9, 0.5], weak_kl=[0, 0, 0], val_loss=[0, 0, 0],
             at_flags=0)
    t[0]["learned"] = False  # the tie at agreement 0.9 goes to the head that learned
    assert R.pick(t, "agreement") == 1 and R.regret(t, "agreement") == pytest.approx(0.1)
    t[2] = {"values": {"tau": 2}, "diverged": "the training loss became nan"}
    assert R.pick(t, "weak-kl") == 1 and R.regret(t, "weak-kl") == 0
    t[0] = {"values": {"tau": 0}, "diverged": "nan"}  # the flags' point diverged: none cannot pick
    assert R.pick(t, "none") is None


def test_regret_table_names_the_rule_of_lowest_mean_regret_over_methods_and_levels():
    bad_agree = rows([0.6, 0.8], agreement=[1, 0], weak_kl=[0, 1], val_loss=[0, 1], at_flags=1)
    bad_kl = rows([0.6, 0.7], agreement=[0, 1], weak_kl=[1, 0], val_loss=[0, 1], at_flags=0)
    records = [{"level": lv, "method": m, "domain": "sketch", "seed": s,
                "regret": {rule: R.regret(t, rule) for rule in R.RULES}}
               for lv in ("paper", "easy") for s in (0, 1)
               for m, t in (("cpl", bad_agree), ("kd-lp", bad_kl))]
    text, winner = R.regret_table(records)
    # agreement: (20 + 0) / 2 = 10 points; weak-kl (0 + 10) / 2 = 5; val-loss 0; none (0 + 10) / 2
    assert winner == "val-loss"
    assert "| cpl | 4 | 20.00 [20.00, 20.00] | 0.00 [0.00, 0.00] | 0.00 [0.00, 0.00] |" in text
    assert "**val-loss** (0.00 points; agreement 10.00, weak-kl 5.00, none 5.00)" in text


def test_regret_from_the_recorded_rows_equals_a_brute_force_recomputation_from_run_files(demo, tmp_path):
    """One tuned cpl run records every tau's D'_test accuracy; runs with --tune none at each tau
    (their own files) give the same accuracies, so the regret the table reports from the tuned
    run's rows is the best fixed-tau run minus the run at the tau each rule picked."""
    grid = ["0.03", "0.3", "1.0"]
    cache = tmp_path / "cache"
    tuned_out = tmp_path / "tuned"
    proc = run_cli(cli_args(demo, demo / "data", tuned_out, cache, **{"--tau-grid": grid}))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tuned_out / "sketch" / "cpl" / "seed0" / "results.json").read_text())
    tuning = result["tuning"]
    fixed = {}
    for tau in grid:
        out = tmp_path / f"tau{tau}"
        proc = run_cli(cli_args(demo, demo / "data", out, cache, **{"--tune": "none", "--tau": tau}))
        assert proc.returncode == 0, proc.stderr
        fixed[float(tau)] = json.loads((out / "sketch" / "cpl" / "seed0" / "results.json")
                                       .read_text())["test_accuracy"]
    assert [row["test_accuracy"] for row in tuning] == [fixed[float(t)] for t in grid]
    assert result["test_accuracy"] == fixed[result["tuned"]["tau"]]
    records = R.regret_records(tuned_out, "demo")
    assert len(records) == 1 and records[0]["method"] == "cpl"
    for rule in w2s_clip.TUNING_RULES:
        scores = [row["scores"][rule] for row in tuning]
        picked = float(grid[scores.index(max(scores))])
        assert records[0]["regret"][rule] == pytest.approx(max(fixed.values()) - fixed[picked])
    assert records[0]["regret"]["none"] == pytest.approx(max(fixed.values()) - fixed[1.0])


def test_the_command_writes_the_table_and_refuses_folders_without_tuned_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.regret", "--levels", f"x={tmp_path}",
                           "--output", str(tmp_path / "r.md")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no run with a tuning grid")
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.md").exists()
