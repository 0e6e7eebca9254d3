"""Tests for w2s_clip_lab/report.py: tables, figures, the box, the differences and the ablation table; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

import w2s_clip
from w2s_clip_lab import files, miniature, report, run, store
from conftest import (DEMO_NAMES, cli_args, good_result, main_error, put, run_cli, table_row,
                      temp_files, tree_state, write_result, write_result_with_settings)


def test_pgr_closed_form():
    assert w2s_clip.pgr(0.5, 0.6, 0.9) == pytest.approx(0.25)
    assert w2s_clip.pgr(0.5, 0.9, 0.9) == pytest.approx(1.0)
    assert math.isnan(w2s_clip.pgr(0.5, 0.6, 0.5))
    assert report.pgr_text(0.5, 0.6, 0.9) == "0.25"
    assert [report.pgr_text(0.5, s, c) for s, c in ((0.6, 0.5), (0.3, 0.4))] == ["n/a", "n/a"]


def test_split_count_note_names_both_counts_only_when_they_differ():
    """Table 1's counts: silent on a match or on data that is not DomainNet (not 345 classes)."""
    assert report.split_count_note("clipart", 33525, 14604, 345) is None
    assert report.split_count_note("clipart", 100, 200, 10) is None
    note = report.split_count_note("sketch", 48837, 21850, 345)
    assert "\n" not in note and "uncleaned" in note
    assert all(str(n) in note for n in (48837, 21850, 48212, 20916))


def test_tables_of_another_data_set_show_no_paper_numbers(demo, officehome, tmp_path):
    """Office-Home runs: Table 2's column is its domain, and neither the tables nor paper_gap.md
    print the paper's DomainNet numbers."""
    out = tmp_path / "out"
    proc = run_cli(cli_args(demo, officehome, out, tmp_path / "cache", **{
        "--dataset": "officehome", "--domain": "Real_World", "--method": ["weak", "cpl"]}))
    assert proc.returncode == 0, proc.stderr
    report.build_tables(out, tmp_path / "tables")
    table2 = (tmp_path / "tables" / "table2.md").read_text()
    assert "Real_World" in table2 and "[" not in table2.split("Worst-10")[0]  # no [paper] cells
    gap = (tmp_path / "tables" / "paper_gap.md").read_text()
    assert "officehome runs" in gap and "| method |" not in gap


def test_bootstrap_interval_covers_a_known_difference_about_95_percent():
    """Two seeds of 400 paired images with P(A right) = 0.7, P(B right) = 0.6 (true difference
    10 points): over 200 draws the 95% interval holds 10 in 88-99% of them; identical methods
    give 0 [0, 0]."""
    g = torch.Generator().manual_seed(0)
    hits = 0
    for draw in range(200):
        u = [torch.rand(400, generator=g) for _ in range(2)]  # one latent per image: paired
        pairs = {"d": [(x < 0.7, x < 0.6) for x in u]}
        diff, low, high = report.bootstrap_difference(pairs, n_boot=500, seed=draw)
        hits += low <= 10 <= high
    assert 0.88 <= hits / 200 <= 0.99, hits
    same = torch.rand(300, generator=g) < 0.5
    assert report.bootstrap_difference({"d": [(same, same)]}) == (0.0, 0.0, 0.0)


def test_tables_group_a_sweep_by_the_setting_that_differs(demo, tmp_path):
    """Runs of one cell made with three τ (one out-dir each, under one folder): three rows of
    Table 2 named by τ, runs.csv with a tau column; CPL − weak with an interval in differences.md."""
    for tau in ("0.1", "0.3", "1"):
        run.main([str(a) for a in cli_args(
            demo, demo / "data", tmp_path / "sweep" / tau, tmp_path / "cache",
            **{"--method": ["weak", "cpl"], "--tune": "none", "--tau": tau})])
    report.build_tables(tmp_path / "sweep", tmp_path / "tables")
    table2 = (tmp_path / "tables" / "table2.md").read_text()
    labels = [line.split(" | ")[0][2:] for line in table2.split("Worst-10")[0].splitlines()
              if line.startswith("| cpl")]
    assert len(labels) == 3 and "cpl" in labels  # the most common settings (a tie: the first)
    assert {label for label in labels if label != "cpl"} in (
        {f"cpl (tau={a})", f"cpl (tau={b})"} for a, b in (("0.3", "1"), ("0.1", "1"), ("0.1", "0.3")))
    assert table2.split("Worst-10")[0].count("| weak |") == 1 and "weak (" not in table2  # counted once
    with open(tmp_path / "tables" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["tau"] for r in rows if r["method"] == "cpl"}) == ["0.1", "0.3", "1.0"]
    diff = (tmp_path / "tables" / "differences.md").read_text()
    assert re.search(r"\| weak \| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", diff), diff


def test_build_tables_mean_std_avg_delta_pgr_worst10(tmp_path):
    """Cells, Avg., Δ, the paper's values in brackets, and the PGR of the Avg. column: gaps of 40
    (clipart) and 20 (sketch) points make it differ from a mean of per-column PGRs."""
    runs = {("sketch", "weak"): [0.40, 0.42], ("sketch", "ce-lp"): [0.45, 0.45],
            ("sketch", "cpl"): [0.50, 0.54], ("sketch", "ceiling"): [0.60, 0.62],
            ("clipart", "weak"): [0.30], ("clipart", "ce-lp"): [0.50], ("clipart", "cpl"): [0.35],
            ("clipart", "ceiling"): [0.70]}
    for (domain, method), accs in runs.items():
        for seed, acc in enumerate(accs):
            write_result(tmp_path / "runs", domain, method, seed, acc, worst=acc / 2,
                         n_classes=round(10 * acc) + seed)
    write_result(tmp_path / "runs" / "t3", "clipart", "cpl", 0, 0.33, 0.1, weak_model="resnet34")
    write_result(tmp_path / "runs" / "ens", "sketch", "cpl", 0, 0.55, 0.2, init="ensemble")
    report.build_tables(tmp_path / "runs", tmp_path / "tables")
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    # columns: clipart, sketch (DomainNet order), Avg., PGR; the paper's value in brackets
    # a cell over fewer seeds than most says so
    assert table_row(t2, "weak")[:4] == ["30.00 ± 0.00 (n=1) [67.15]", "41.00 ± 1.41 [52.26]",
                                         "35.50", "—"]
    # Avg.: weak 35.5, ceiling 65.5. PGR (43.5 - 35.5) / 30; the mean of .125 and .55 would be .34
    # (the paper's Avg. is over six domains: not shown beside an Avg. over two)
    assert table_row(t2, "cpl")[:4] == ["35.00 ± 0.00 (n=1) [73.10]", "52.00 ± 2.83 [64.01]", "43.50",
                                        "0.27"]
    assert table_row(t2, "ce-lp")[2:4] == ["47.50", "0.40"]  # not the mean of .5 and .2
    assert table_row(t2, "Δ (CPL − best baseline)")[:3] == ["-15.00 [2.41]", "+7.00 [3.83]", "-4.00"]
    assert table_row(t2, "kd-tp")[:4] == ["— [69.57]", "— [59.93]", "—", "—"]
    worst = t2[t2.index("Worst-10"):]
    assert table_row(worst, "cpl")[:3] == ["17.50 ± 0.00 (n=1)", "26.00 ± 1.41", "21.75"]
    classes = t2[t2.index("Distinct classes"):]  # round(10 acc) + seed: cpl 4; 5 and 6
    assert table_row(classes, "cpl")[:3] == ["4.00 ± 0.00 (n=1)", "5.50 ± 0.71", "4.75"]
    t3 = (tmp_path / "tables" / "table3.md").read_text()  # clipart by weak model
    assert table_row(t3, "cpl")[:2] == ["35.00 ± 0.00", "33.00 ± 0.00"]
    t4 = (tmp_path / "tables" / "table4.md").read_text()
    assert table_row(t4, "cpl (ensemble init)")[:2] == ["—", "55.00 ± 0.00"]
    csv_rows = (tmp_path / "tables" / "runs.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + sum(map(len, runs.values())) + 2
    fig = (tmp_path / "tables" / "figure2.csv").read_text().splitlines()
    assert fig[0] == ("domain,method,epoch,step,seeds,train_true_acc,train_true_std,"
                      "train_agreement,train_agreement_std,test_acc,test_std")
    assert fig[1].startswith("clipart,cpl,1,3,1,")  # one seed: std 0
    assert fig[1].split(",")[5] != "" and fig[1].split(",")[7] == ""  # older curves: no agreement


def test_pgr_column_and_paper_gap_on_the_papers_own_table2(tmp_path):
    """PAPER's Table 2 cells fed in as results: CPL's PGR is (64.74 - 58.47) / (66.54 - 58.47)
    ≈ 0.78 (a mean of per-domain PGRs says 0.83: real's gap is 0.24 points), every bracket equals
    its cell, and paper_gap.md reads 0 up to the paper's own rounding of Avg. and Δ."""
    paper = report.PAPER
    for (table, row, col), value in paper.items():
        if table == "table2" and col in w2s_clip.DOMAINS and row != report.DELTA:
            write_result(tmp_path / "runs", col, row, 0, value / 100, worst=0.1)
    report.build_tables(tmp_path / "runs", tmp_path / "tables")
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    mean = lambda row: sum(paper[("table2", row, d)] for d in w2s_clip.DOMAINS) / 6
    for row in [r for r in report.TABLE2_ROWS[1:-1] if r != "zero-shot"]:  # the paper has no zero-shot row
        expected = (mean(row) - mean("weak")) / (mean("ceiling") - mean("weak"))
        assert table_row(t2, row)[7] == f"{expected:.2f}", row
    assert table_row(t2, "cpl")[7] == "0.78" and table_row(t2, "kd-lp")[7] == "0.32"
    for cell in table_row(t2, "cpl")[:6]:
        ours, ref = cell.split(" ± 0.00 ")
        assert f"[{ours}]" == ref
    gap = (tmp_path / "tables" / "paper_gap.md").read_text()
    gap2 = gap[gap.index("### Table 2"):gap.index("### Table 3")]
    for row in [r for r in report.TABLE2_ROWS if r != "zero-shot"] + [report.DELTA]:
        cells = table_row(gap2, row)
        assert len(cells) == 7 and all(abs(float(c.split()[0])) <= 0.011 for c in cells if c != "—")
        assert all(c == "+0.00" or c.startswith("+0.00 ± ") for c in cells[:6])
    assert table_row(gap2, "cpl")[0] == "+0.00 ± 0.00" and table_row(gap2, "weak")[6] == "—"
    assert table_row(t2, "cpl")[6] == "64.74 [64.74]"  # six domains: the paper's Avg. beside ours


def test_table3_columns_are_the_papers_five_weak_models_when_run(tmp_path):
    """With hf: runs on clipart, Table 3 is exactly the paper's five columns (resnet18's Table 2
    clipart run left out), each published cell and the Avg. beside ours."""
    out = tmp_path / "runs"
    for method, acc in (("weak", 0.5), ("cpl", 0.7), ("ceiling", 0.8)):
        write_result(out, "clipart", method, 0, acc, worst=0.1)  # Table 2's resnet18
        for i, w in enumerate(report.PAPER_WEAK_MODELS):
            write_result(out / f"weak-{i}", "clipart", method, 0, acc + i / 100, worst=0.1,
                         weak_model=w)
    report.build_tables(out, tmp_path / "tables")
    t3 = (tmp_path / "tables" / "table3.md").read_text()
    header = next(line for line in t3.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[1:6] == list(report.PAPER_WEAK_MODELS)
    assert table_row(t3, "cpl")[:7] == ["70.00 ± 0.00 [72.25]", "71.00 ± 0.00 [71.84]",
                                        "72.00 ± 0.00 [72.06]", "73.00 ± 0.00 [71.91]",
                                        "74.00 ± 0.00 [72.47]", "72.00 [72.11]", "0.67"]


def test_pgr_is_na_when_ceiling_is_not_above_weak_in_box_and_table(tmp_path):
    out = tmp_path / "runs"
    for method, acc in (("weak", 0.60), ("ce-lp", 0.40), ("cpl", 0.55), ("ceiling", 0.50)):
        write_result(out, "sketch", method, 0, acc, worst=0.1)
    box = report.summary_box(out, "sketch", 0, ["ce-lp", "cpl"])
    for method in ("ce-lp", "cpl"):
        line = next(line for line in box.splitlines() if f"| {method} " in line)
        assert line.split()[-2:] == ["n/a", "|"], box
    report.build_tables(out, tmp_path / "tables")
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    assert table_row(t2, "ce-lp")[2] == "n/a" and table_row(t2, "cpl")[2] == "n/a"
    write_result(out, "sketch", "ceiling", 0, 0.80, worst=0.1)  # a gap again: numbers again
    assert "n/a" not in report.summary_box(out, "sketch", 0, ["ce-lp", "cpl"])


def test_paper_gap_on_a_hand_made_grid():
    """ours − paper ± std over seeds; Avg.'s std over the per-seed row averages; Δ on means."""
    rows = [{"method": m, "domain": d, "seed": s, "test_accuracy": a / 100}
            for m, d, accs in (("weak", "sketch", (40, 42)), ("weak", "clipart", (30, 30)),
                               ("cpl", "sketch", (50, 54)), ("cpl", "clipart", (35, 37)),
                               ("ce-lp", "sketch", (45, 45)), ("ce-lp", "clipart", (36, 36)))
            for s, a in enumerate(accs)]
    paper = {("t", "cpl", "sketch"): 50.0, ("t", "cpl", "Avg."): 40.0, ("t", "weak", "sketch"): 45.0,
             ("t", report.DELTA, "sketch"): 1.0, ("other", "ce-lp", "sketch"): 1.0}
    text = report.paper_gap("T", "t", ("weak", "ce-lp", "cpl", "ceiling"), ["clipart", "sketch"],
                              rows, "domain", paper)
    # cpl Avg.: (36 + 52) / 2 = 44; per seed (35 + 50) / 2 = 42.5 and (37 + 54) / 2 = 45.5
    assert table_row(text, "cpl") == ["—", "+2.00 ± 2.83", f"+4.00 ± {math.sqrt(4.5):.2f}"]
    assert table_row(text, "weak") == ["—", "-4.00 ± 1.41", "—"]
    assert table_row(text, report.DELTA) == ["—", "+6.00", "—"]  # (52 - 45) - 1
    with pytest.raises(AssertionError):  # rows without a published cell are left out
        table_row(text, "ce-lp")


def test_demo_tables_small_version_end_to_end(demo, tmp_path):
    """`make demo-tables` in small: every method on one generated domain, a second weak model,
    the ensemble init; then --build-tables writes every row and column from the results alone."""
    data = tmp_path / "data"
    miniature.make_synthetic_domainnet(data, domains=("clipart",), classes=DEMO_NAMES[:3],
                                           n_train=6, n_test=15, size=32,
                                           regime="paper-10class")
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = {"--data-root": data, "--domain": "clipart", "--cache-dir": cache}
    for out, extra in ((runs / "t2", {"--method": "all"}),
                       (runs / "t3", {"--method": "cpl", "--weak-model": "test_efficientnet"}),
                       (runs / "ens", {"--method": "cpl"})):
        args = cli_args(demo, data, out, cache, **common, **extra)
        args += ["--prototype-init", "ensemble"] if out.name == "ens" else []
        proc = run_cli(args)
        assert proc.returncode == 0, proc.stderr
    proc = run_cli(["--build-tables", "--out-dir", str(runs), "--tables-dir", str(tmp_path / "tables")])
    assert proc.returncode == 0, proc.stderr
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    for method in report.TABLE2_ROWS:
        assert "±" in table_row(t2, method)[0], method  # a clipart cell with mean ± std
    for method in report.TABLE2_ROWS[1:-1]:  # a PGR for every weak-to-strong row
        pgr = table_row(t2, method)[2]
        assert pgr == "n/a" or float(pgr) == float(pgr), pgr
    float(table_row(t2, "Δ (CPL − best baseline)")[0].split()[0])
    classes = t2[t2.index("Distinct classes"):]
    assert 1 <= float(table_row(classes, "cpl")[0].split()[0]) <= 3
    assert (tmp_path / "tables" / "paper_gap.md").exists()
    t3 = (tmp_path / "tables" / "table3.md").read_text()
    assert "test_resnet" in t3 and "test_efficientnet" in t3
    assert all("±" in cell for cell in table_row(t3, "cpl")[:2])
    t4 = (tmp_path / "tables" / "table4.md").read_text()
    for method in ("cpl", "cpl (ensemble init)", "cpl-text"):
        assert "±" in table_row(t4, method)[0], method
    figure = (tmp_path / "tables" / "figure2.csv").read_text()
    assert all(f"\nclipart,{m},2," in figure for m in ("auxconf-tp", "cpl", "auxconf-lp"))


def test_ablation_table_groups_runs_by_the_one_changed_flag(tmp_path, capsys):
    """Hand-made results: a run's variant is every setting (any flag, --lr too) in which it
    differs from the settings most runs share; cells are mean ± std over seeds with the
    difference from the reference cell; a damaged file is named and skipped."""
    from w2s_clip_lab import ablations
    defaults = json.loads(json.dumps(vars(w2s_clip.parse_args([]))))
    runs = {("paper", "cpl"): [0.50, 0.54], ("paper", "kd-lp"): [0.40, 0.40],
            ("paper", "adaptconf-lp"): [0.2, 0.2], ("clip", "cpl"): [0.30, 0.34],
            ("norm", "kd-lp"): [0.10, 0.20], ("lr", "kd-lp"): [0.3, 0.3]}
    changes = {"paper": {}, "clip": {"cpl_logit_scale": 100.0}, "norm": {"lp_input": "normalized"},
               "lr": {"lr": 0.1}}
    for (variant, method), accs in runs.items():
        for seed, acc in enumerate(accs):
            settings = {**defaults, **changes[variant], "data_root": f"/data/{variant}"}
            files.atomic_save({"domain": "clipart", "method": method, "seed": seed,
                                  "test_accuracy": acc, "worst10_accuracy": acc,
                                  "config": settings, "settings": settings},
                                 tmp_path / variant / "clipart" / method / f"seed{seed}" / "results.json")
    damaged = tmp_path / "lr" / "clipart" / "cpl" / "seed0" / "results.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"domain": "clipart", "method": "cpl", "seed": 0, "test_accuracy": "0.9"')
    text = ablations.ablation_table(tmp_path)
    assert str(damaged) in capsys.readouterr().err
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:] \
        == ["paper defaults", "--cpl-logit-scale 100.0", "--lp-input normalized", "--lr 0.1"]
    assert table_row(text, "variant") == ["kd-lp", "adaptconf-lp", "cpl"]  # Table 2's order
    assert table_row(text, "paper defaults") == ["40.00 ± 0.00", "20.00 ± 0.00", "52.00 ± 2.83"]
    assert table_row(text, "--cpl-logit-scale 100.0") == ["—", "—", "32.00 ± 2.83 (-20.00)"]
    assert table_row(text, "--lp-input normalized") == ["15.00 ± 7.07 (-25.00)", "—", "—"]
    assert table_row(text, "--lr 0.1") == ["30.00 ± 0.00 (-10.00)", "—", "—"]
    with pytest.raises(w2s_clip.UserError, match="no readable results.json"):
        ablations.ablation_table(tmp_path / "empty")


def test_cli_error_unwritable_tables_dir_and_make_demo_target(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    write_result(tmp_path / "runs", "sketch", "cpl", 0, 0.5, 0.2)
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", blocker / "t"],
               "--tables-dir", str(blocker / "t"))
    main_error(["--make-demo", blocker / "demo"], "--make-demo", str(blocker / "demo"))
    assert blocker.read_text() == "mine"


def test_cli_truncated_results_json_is_named_and_redone(demo, tmp_path, capsys):
    """A truncated results.json: the same command names it and redoes the run (equal to the first
    result); --build-tables names and skips such a file; another setting is named when it differs."""
    args = cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache")
    run.main(args)
    path = tmp_path / "out" / "sketch" / "cpl" / "seed0" / "results.json"
    first = json.loads(path.read_text())
    assert first["settings"]["tau"] == 1.0 and first["settings_key"] == store.settings_key(
        first["settings"])
    path.write_text(path.read_text()[:200])
    capsys.readouterr()
    run.main(args)
    assert f"warning: {path} cannot be read" in capsys.readouterr().err
    redone = json.loads(path.read_text())
    for key in ("test_accuracy", "per_class_accuracy", "curves", "settings"):
        assert redone[key] == first[key], key
    msg = main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                              **{"--tau": "0.5", "--lr": "0.1"}), str(path), "other settings")
    assert "other settings (lr: 0.01 -> 0.1, tau: 1.0 -> 0.5);" in msg  # those two, nothing else
    weak = tmp_path / "out" / "sketch" / "weak" / "seed0" / "results.json"
    weak.parent.mkdir(parents=True)
    weak.write_text('{"domain": "sketch", "meth')
    run.main(["--build-tables", "--out-dir", str(tmp_path / "out"),
                   "--tables-dir", str(tmp_path / "tables")])
    assert f"warning: {weak} cannot be read" in capsys.readouterr().err
    assert table_row((tmp_path / "tables" / "table2.md").read_text(), "cpl")[0].startswith(
        f"{100 * first['test_accuracy']:.2f} ± ")


def test_tables_list_every_method_found_in_the_results(tmp_path):
    """A method w2s_clip.py does not know (a loss added in a copy of it) is a row of Table 2 after
    the paper's rows and before the ceiling; its results are read like any other."""
    for method, acc in (("weak", 0.4), ("cpl", 0.5), ("skl-lp", 0.55), ("ceiling", 0.7)):
        write_result(tmp_path / "runs", "sketch", method, 0, acc, acc / 2)
    run.main(["--build-tables", "--out-dir", str(tmp_path / "runs"), "--tables-dir",
                   str(tmp_path / "t")])
    text = (tmp_path / "t" / "table2.md").read_text()
    names = [line.split("|")[1].strip() for line in text.split("\n\n")[1].splitlines()[2:]]
    assert names.index("cpl") < names.index("skl-lp") < names.index("ceiling")
    assert table_row(text, "skl-lp")[0].startswith("55.00")


def test_summary_box_and_tables_use_only_runs_with_matching_settings(tmp_path, capsys):
    """A folder with runs of two settings: the box and each table cell use only those that
    match (the most common, for the tables) and say how many were left out and which settings
    differ; a different domain or weak model is a table axis, not a different setting, and a
    setting the run does not depend on (CPL's tau for ce-lp) is no difference at all."""
    a = {"tau": 1.0, "lr": 0.01, "domain": "sketch", "weak_model": "resnet18", "splits": "s1"}
    b = {**a, "lr": 0.02}
    out = tmp_path / "runs"
    for seed in (0, 1):
        write_result_with_settings(out, "sketch", "weak", seed, 0.40, a)
        write_result_with_settings(out, "sketch", "ceiling", seed, 0.60, a)
        write_result_with_settings(out, "sketch", "cpl", seed, 0.50, a)
        write_result_with_settings(out, "clipart", "cpl", seed, 0.30,
                                   {**a, "domain": "clipart", "splits": "s2"})
    write_result_with_settings(out, "sketch", "cpl", 2, 0.99, b)
    write_result_with_settings(out, "sketch", "ce-lp", 0, 0.45, b)
    write_result_with_settings(out, "sketch", "ce-lp", 1, 0.55, {**a, "tau": 0.5})
    box = report.summary_box(out, "sketch", 0, ["ce-lp", "cpl"], a)
    assert "ce-lp" not in box.split("left out")[0] and "cpl" in box and "weak" in box
    assert "left out of the box" in box and "ce-lp (lr: 0.02 -> 0.01)" in box
    box = report.summary_box(out, "sketch", 1, ["ce-lp", "cpl"], a)
    assert "| ce-lp            55.00" in box and "left out" not in box
    capsys.readouterr()
    report.build_tables(out, tmp_path / "tables")
    note = capsys.readouterr().out
    assert "2 runs made with other settings" in note and "without a label have lr=0.01" in note
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    cells = [c.split(" [")[0] for c in table_row(t2, "cpl")[:2]]  # without the paper's value
    assert cells == ["30.00 ± 0.00", "50.00 ± 0.00"]  # not 0.99: that run is a row of its own
    assert [c.split(" [")[0] for c in table_row(t2, "ce-lp")[:2]] == ["—", "55.00 ± 0.00 (n=1)"]
    assert table_row(t2, "cpl (lr=0.02)")[:2] == ["—", "99.00 ± 0.00 (n=1)"]
    assert table_row(t2, "ce-lp (lr=0.02)")[:2] == ["—", "45.00 ± 0.00 (n=1)"]


def test_cli_build_tables_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    write_result(tmp_path / "runs", "sketch", "cpl", 0, 0.5, 0.2)

    import builtins
    real_open = builtins.open

    def full_open(path, mode="r", *a, **k):  # the folder's write probe passes, the tables fail
        if "w" in mode and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", full_open)
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", tmp_path / "t"],
               f"no space left on {tmp_path / 't'}")
    monkeypatch.undo()
    assert not temp_files(tmp_path) and not list((tmp_path / "t").iterdir())  # nothing half-written

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)  # now the probe fails too
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", tmp_path / "u"],
               "--tables-dir", f"no space left on {tmp_path / 'u'}")


def test_tables_are_written_as_a_set_or_not_at_all(tmp_path, monkeypatch):
    """A failure while the tables are written replaces none of the earlier ones and leaves no
    temporary file; a figure the new build does not make is removed rather than left stale; a
    user's own file in the folder is left alone."""
    out, tables = tmp_path / "runs", tmp_path / "tables"
    write_result(out, "sketch", "cpl", 0, 0.5, 0.2)
    run.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tables)])
    assert (tables / "figure2.csv").exists()
    (tables / "mine.md").write_text("a user's file")
    before = tree_state(tables)
    write_result(out, "sketch", "kd-lp", 0, 0.25, 0.1)
    real, calls = files.atomic_save, []

    def fail_third(obj, path):
        calls.append(path)
        if len(calls) == 3:
            raise w2s_clip.UserError(f"no space left on {tables}")
        return real(obj, path)
    monkeypatch.setattr(report, "atomic_save", fail_third)  # as save_together calls it
    main_error(["--build-tables", "--out-dir", out, "--tables-dir", tables], "no space left")
    assert tree_state(tables) == before and not temp_files(tables)
    monkeypatch.undo()
    for path in out.rglob("results.json"):  # results without curves: no Figure 2
        r = json.loads(path.read_text())
        files.atomic_save({**r, "curves": []}, path)
    run.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tables)])
    assert "kd-lp" in (tables / "table2.md").read_text()
    assert not (tables / "figure2.csv").exists() and not (tables / "figure2.png").exists()
    assert (tables / "mine.md").read_text() == "a user's file"


def test_weak_runs_of_other_weak_models_and_cpe_runs_are_table_axes_not_variants(tmp_path, capsys):
    """Table 3's layout (one folder per weak model) and Table 4's CPE runs (with --cpe-k): every
    weak model keeps its weak row, and CPE's flags make no variant rows."""
    out = tmp_path / "runs"
    for seed in (0, 1):
        for weak_model, acc in (("resnet18", 0.4), ("resnet34", 0.6)):
            sub = "" if weak_model == "resnet18" else f"weak-{weak_model}"
            put(out, good_result("weak", seed, acc, domain="clipart", weak_model=weak_model), sub)
            put(out, good_result("cpl", seed, acc + 0.1, domain="clipart", weak_model=weak_model), sub)
        put(out, good_result("cpl", seed, 0.8, domain="clipart", prototype_init="cpe", cpe_k=10),
            "cpe-init")
    report.build_tables(out, tmp_path / "t")
    printed = capsys.readouterr().out
    assert "rows of their own" not in printed and "counted once" not in printed
    t3 = (tmp_path / "t" / "table3.md").read_text()
    assert table_row(t3, "weak")[:2] == ["40.00 ± 0.00", "60.00 ± 0.00"]
    assert table_row((tmp_path / "t" / "table4.md").read_text(), "cpl (cpe init)")[0] == "80.00 ± 0.00"


@pytest.mark.parametrize("edit", [
    {"test_accuracy": "0.5"}, {"test_accuracy": None}, {"test_accuracy": 50.0},
    {"test_accuracy": float("nan")}, {"seed": "0"}, {"seed": -1}, {"method": ""}, {"method": 3},
    {"domain": ""}, {"curves": {"epoch": 1}}, {"curves": [1, 2]}, {"curves": [{"epoch": 1}]},
    {"curves": None}, {"config": "flags"}, {"settings": 3}, {"n_predicted_classes": "ten"},
    {"worst10_accuracy": True}, {"agreement_with_weak": 2.0}, {"predictions": "0 1"},
    {"predictions": [0, 1], "d_test_index": [3], "d_test_labels": [1]}])
def test_a_hand_edited_results_json_is_named_and_skipped_by_tables_and_box(tmp_path, capsys, edit):
    """Each damaged file is named with its reason and left out of the tables and the box; the
    good runs beside it are still combined; no traceback."""
    out = tmp_path / "runs"
    put(out, good_result("weak", acc=0.4))
    put(out, good_result("ceiling", acc=0.8))
    bad = store.result_path(out, "sketch", "cpl", 0)  # where the box looks for it
    files.atomic_save({**good_result("cpl"), **edit}, bad)
    run.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert f"warning: {bad} cannot be read as a results file" in err, err
    assert table_row((tmp_path / "t" / "table2.md").read_text(), "cpl")[0] == "— [64.01]"
    box = report.summary_box(out, "sketch", 0, ["cpl"])
    assert "cpl" not in box.split("PGR", 1)[1] and "weak" in box and str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'{"a": 1}'])
def test_unreadable_results_files_are_skipped(tmp_path, capsys, content):
    out = tmp_path / "runs"
    put(out, good_result("weak", acc=0.4))
    bad = store.result_path(out, "sketch", "cpl", 0)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    rows = report.load_results(out)
    assert [r["method"] for r in rows] == ["weak"] and str(bad) in capsys.readouterr().err


def test_split_files_changed_between_seeds_are_not_averaged_in_one_cell(tmp_path, capsys):
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5 + seed / 10))
    put(out, good_result("cpl", 2, 0.9, splits="edited"))
    report.build_tables(out, tmp_path / "t")
    printed = capsys.readouterr().out
    assert "left out 1 runs of sketch made with other split files" in printed, printed
    assert table_row((tmp_path / "t" / "table2.md").read_text(), "cpl")[0] == "55.00 ± 7.07 [64.01]"


def test_one_clip_config_typed_two_ways_is_one_setting_to_the_tables(tmp_path):
    """The settings hold the real path; the tables group on it, not on the typed string."""
    out = tmp_path / "runs"
    real = str(tmp_path / "cfg" / "tiny.json")
    for seed, typed in ((0, "cfg/tiny.json"), (1, "tiny.json")):
        r = good_result("cpl", seed, 0.5 + seed / 10, clip_model=real)
        r["config"] = {**r["config"], "clip_model": typed}
        put(out, r)
    rows = report.load_results(out)
    assert {r["clip_model"] for r in rows} == {real}
    report.build_tables(out, tmp_path / "t")
    text = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(text, "cpl")[0] == "55.00 ± 7.07 [64.01]" and "tiny.json with weak model" in text
    assert str(tmp_path) not in text.splitlines()[0]  # the title names the file, not the path


@pytest.mark.parametrize("other, note", [
    ({"clip_model": "ViT-L-14"}, "left out 1 runs of other CLIP models than the 2 of ViT-B-32 (ViT-L-14)"),
    ({"tune": "none"}, "rows of their own, named by what differs (the rows without a label have "
                       "tune=hold-val)")])
def test_runs_left_out_of_the_tables_are_named_with_what_differs(tmp_path, capsys, other, note):
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed))
    put(out, good_result("kd-lp", 0, **other), "other")
    report.build_tables(out, tmp_path / "t")
    assert note in capsys.readouterr().out


def test_make_tables_over_a_folder_that_holds_the_ablations(tmp_path, capsys):
    """After `make ablations` into OUT: OUT/ablations/paper repeats the main grid's runs (same
    settings: counted once, named) and the variants differ in a flag (left out, named); Table 2
    is built from the main grid."""
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5))
        put(out, good_result("kd-lp", seed, 0.4))
        put(out, good_result("cpl", seed, 0.5), "ablations/paper")
        put(out, good_result("cpl", seed, 0.9, cpl_kl="printed"), "ablations/cpl-kl=printed")
        put(out, good_result("kd-lp", seed, 0.4, cpl_kl="printed"), "ablations/cpl-kl=printed")
    run.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    printed = capsys.readouterr().out
    assert printed.count("(same settings); counted once") == 2  # the paper folder: the same files
    assert "2 runs repeat another with all the settings they depend on" in printed  # kd-lp
    assert "2 runs made with other settings" in printed and "cpl_kl=summand" in printed
    t2 = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(t2, "cpl")[0] == "50.00 ± 0.00 [64.01]"
    assert table_row(t2, "kd-lp")[0] == "40.00 ± 0.00 [59.88]"  # each seed once, not twice
    assert table_row(t2, "cpl (cpl_kl=printed)")[0] == "90.00 ± 0.00"


def test_prototype_init_rows_keep_cpls_settings_apart_and_stay_out_of_table_2(tmp_path):
    """`cpl (ensemble init)` depends on tau as cpl does: a run of another tau is a row of its own;
    the ceiling of an init is no row of Table 2 (nor one it does not know)."""
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5))
        put(out, good_result("ceiling", seed, 0.8))
        put(out, good_result("cpl", seed, 0.6, prototype_init="ensemble"), "ensemble-init")
        put(out, good_result("ceiling", seed, 0.8, prototype_init="ensemble"), "ensemble-init")
    put(out, good_result("cpl", 0, 0.9, prototype_init="ensemble", tau=0.1), "sweep")
    report.build_tables(out, tmp_path / "t")
    t4 = (tmp_path / "t" / "table4.md").read_text()
    assert table_row(t4, "cpl (ensemble init)")[0].startswith("60.00 ± 0.00")
    assert table_row(t4, "cpl (ensemble init) (tau=0.1)")[0].startswith("90.00")
    assert "ceiling (ensemble init)" not in (tmp_path / "t" / "table2.md").read_text()


def test_ablation_reference_other_than_the_papers_defaults_is_said(tmp_path):
    from w2s_clip_lab import ablations
    out = tmp_path / "abl"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5, batch_size=32), "paper")
        put(out, good_result("cpl", seed, 0.7, batch_size=32, tune="none"), "tune=none")
        put(out, good_result("cpl", seed, 0.6, batch_size=32, domain="clipart"), "paper")
    text = ablations.ablation_table(out)
    assert "reference: the paper's defaults but --batch-size 32" in text
    assert table_row(text, "--tune none") == ["70.00 ± 0.00 (+20.00)"]
    assert text.index("### clipart") < text.index("### sketch")  # DomainNet's order, two sections


def test_pretraining_table_rows_per_domain_and_settings(tmp_path, capsys):
    """Two domains under one label are two rows, never averaged; runs of other settings in a
    folder are named and kept out of the row (a better variant of kd-lp does not become the best
    baseline)."""
    out = tmp_path / "pt"
    for domain, acc in (("sketch", 0.6), ("clipart", 0.2)):
        for method, a in (("weak", 0.4), ("ceiling", 0.9), ("cpl", acc), ("kd-lp", 0.5)):
            put(out, good_result(method, 0, a, domain=domain))
    put(out, good_result("cpl", 1, 0.99, lr=0.5))
    put(out, good_result("kd-lp", 1, 0.95, lr=0.5))
    text = miniature.pretraining_table([("300 steps", out)], tmp_path / "t")
    assert table_row(text, "300 steps (clipart)")[3:5] == ["kd-lp 50.00", "20.00"]
    assert table_row(text, "300 steps (sketch)")[3:5] == ["kd-lp 50.00", "60.00"]
    assert "rows of their own" in capsys.readouterr().out


def test_cli_error_build_tables_paths_that_are_files(tmp_path):
    f = tmp_path / "results.json"
    files.atomic_save(good_result(), f)
    main_error(["--build-tables", "--out-dir", f, "--tables-dir", tmp_path / "t"],
               "--out-dir", "is a file, not a folder")
    put(tmp_path / "runs", good_result())
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", f],
               "--tables-dir", "is a file, not a folder")
    main_error(["--build-tables", "--out-dir", tmp_path / "nothing-here", "--tables-dir",
                tmp_path / "t"], "no readable results.json")


def test_stale_temporary_table_files_of_a_killed_build_are_removed(tmp_path):
    put(tmp_path / "runs", good_result())
    tables = tmp_path / "t"
    tables.mkdir()
    stale = tables / ".table2.md.999999999.tmp"  # no such process
    stale.write_text("half")
    report.build_tables(tmp_path / "runs", tables)
    assert not stale.exists() and (tables / "table2.md").exists()


def test_tables_of_weak_runs_only(tmp_path):
    put(tmp_path / "runs", good_result("weak", acc=0.3))
    report.build_tables(tmp_path / "runs", tmp_path / "t")
    t2 = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(t2, "weak")[0] == "30.00 ± 0.00 [52.26]" and table_row(t2, "cpl")[0] == "— [64.01]"


def test_a_leftover_lock_file_does_not_block_a_rerun(demo, tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    lock = store.result_path(out, "sketch", "weak", 0).with_name(".results.json.lock")
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    proc = run_cli(cli_args(demo, demo / "data", out, cache, **{"--method": "weak"}))
    assert proc.returncode == 0, proc.stderr
    assert store.result_path(out, "sketch", "weak", 0).exists()
    tables = run_cli(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    assert tables.returncode == 0 and "weak" in (tmp_path / "t" / "table2.md").read_text()


def test_tables_name_runs_made_on_different_hardware(tmp_path, capsys):
    out = tmp_path / "runs"
    for seed, name in ((0, "NVIDIA A100-SXM4-40GB"), (1, "Tesla V100-SXM2-32GB")):
        put(out, {**good_result("cpl", seed), "hardware": {"name": name, "capability": "sm_80",
                                                           "precision": "bf16"}})
    report.build_tables(out, tmp_path / "t")
    printed = capsys.readouterr().out
    assert "combine runs made on different hardware" in printed and "V100" in printed


def test_older_results_without_settings_for_one_run_are_refused(tmp_path):
    """Two files of one run that record no settings cannot be told apart: named, not merged."""
    for sub in ("a", "b"):
        r = good_result()
        del r["settings"], r["settings_key"]
        put(tmp_path / "runs", r, sub)
    with pytest.raises(w2s_clip.UserError, match="record no settings"):
        report.load_results(tmp_path / "runs")


# ------------------------------------------------------------------------------------------------
# Symbolic links: read through the user's, never replace one
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("link", ["domain", "method", "seed"])
def test_results_reached_through_a_linked_folder_are_read(tmp_path, link):
    """`runs/sketch -> /scratch/...` (or a method or seed folder linked in) is read as a folder."""
    scratch, runs = tmp_path / "scratch", tmp_path / "runs"
    for m in ("weak", "cpl"):
        put(scratch, good_result(m, acc=0.4 if m == "weak" else 0.6))
    inner = {"domain": "sketch", "method": "sketch/cpl", "seed": "sketch/cpl/seed0"}[link]
    (runs / inner).parent.mkdir(parents=True, exist_ok=True)
    (runs / inner).symlink_to(scratch / inner)
    if link != "domain":  # the rest as real folders
        put(runs, good_result("weak", acc=0.4))
    report.build_tables(runs, tmp_path / "t")
    t2 = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(t2, "cpl")[0].startswith("60.00") and table_row(t2, "weak")[0].startswith("40.00")


def test_a_link_loop_and_a_file_reached_twice_count_once(tmp_path, capsys):
    runs = tmp_path / "runs"
    put(runs, good_result("cpl", acc=0.6))
    (runs / "sketch" / "back").symlink_to(runs)  # a loop
    (runs / "again").symlink_to(runs / "sketch")  # the same file by a second way
    rows = report.load_results(runs)
    assert len(rows) == 1 and rows[0]["path"] == str(runs / "sketch" / "cpl" / "seed0" / "results.json")
    assert "same run" not in capsys.readouterr().out


def test_a_table_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    put(tmp_path / "runs", good_result())
    tables, mine = tmp_path / "t", tmp_path / "my-table.md"
    tables.mkdir()
    mine.write_text("my own notes\n")
    (tables / "table3.md").symlink_to(mine)
    msg = main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", tables],
                     "table3.md", "symbolic link")
    assert "remove the link" in msg and mine.read_text() == "my own notes\n"
    assert (tables / "table3.md").is_symlink() and not (tables / "table2.md").exists()
    assert not temp_files(tables)


def test_a_link_where_a_stale_table_would_be_removed_is_left(tmp_path):
    """runs without curves make no Figure 2: a figure2.png of an earlier build goes, a link the
    user put there stays."""
    put(tmp_path / "runs", good_result())
    tables = tmp_path / "t"
    tables.mkdir()
    (tmp_path / "keep.png").write_bytes(b"png")
    (tables / "figure2.png").symlink_to(tmp_path / "keep.png")
    report.build_tables(tmp_path / "runs", tables)
    assert (tables / "figure2.png").is_symlink() and (tmp_path / "keep.png").read_bytes() == b"png"


# ------------------------------------------------------------------------------------------------
# The ablation table's reference row: the run at the paper's values whenever one exists
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("lr", 0.3), ("lr", 0.001), ("max_grad_norm", 0.0),
                                         ("select_by", "agreement")])
@pytest.mark.parametrize("seeds_off", [1, 3], ids=["one-seed-each", "variant-in-majority"])
def test_ablation_reference_is_the_run_at_the_papers_values(tmp_path, flag, value, seeds_off):
    """`ab/paper` at the defaults and `ab/<flag>=<value>`: the paper's run is the reference row,
    the other its own row named by the flag, whichever value sorts first and even when the
    variant has more runs."""
    from w2s_clip_lab import ablations
    out = tmp_path / "ab"
    put(out, good_result("cpl", 0, 0.5), "paper")
    for seed in range(seeds_off):
        put(out, good_result("cpl", seed, 0.7, **{flag: value}), f"{flag}={value}")
    text = ablations.ablation_table(out)
    shown = ablations.flag_text(flag, value)
    assert "reference:" not in text
    assert table_row(text, "paper defaults") == ["50.00 ± 0.00"]
    assert table_row(text, shown)[0].startswith("70.00") and table_row(text, shown)[0].endswith("(+20.00)")


def test_ablation_rows_name_every_flag_that_differs(tmp_path):
    from w2s_clip_lab import ablations
    out = tmp_path / "ab"
    put(out, good_result("cpl", 0, 0.5), "paper")
    put(out, good_result("cpl", 0, 0.6, lr=0.3, tau=0.1), "two")
    put(out, good_result("cpl", 0, 0.4, lr=0.3), "one")
    text = ablations.ablation_table(out)
    assert table_row(text, "paper defaults") == ["50.00 ± 0.00"]
    assert table_row(text, "--lr 0.3") == ["40.00 ± 0.00 (-10.00)"]
    assert table_row(text, "--lr 0.3, --tau 0.1") == ["60.00 ± 0.00 (+10.00)"]


@pytest.mark.parametrize("values, reference", [((0.3, 0.1), 0.1), ((0.3, 0.3, 0.1), 0.3)],
                         ids=["tie", "majority"])
def test_ablation_without_a_run_at_the_papers_values_takes_the_majority(tmp_path, values, reference):
    from w2s_clip_lab import ablations
    out = tmp_path / "ab"
    for i, lr in enumerate(values):
        put(out, good_result("cpl", i, 0.5 + lr, lr=lr), f"lr={lr}")
    text = ablations.ablation_table(out)
    assert f"reference: the paper's defaults but --lr {reference}" in text
    other = next(v for v in values if v != reference)  # accuracy 0.5 + lr: 100 * lr points apart
    assert table_row(text, f"--lr {other}")[0].endswith(f"({100 * (other - reference):+.2f})")


# ------------------------------------------------------------------------------------------------
# Figure 2 says what it draws: hold-train accuracy (true labels) and agreement with weak labels
# ------------------------------------------------------------------------------------------------
def test_figure2_draws_true_accuracy_and_agreement_and_says_which(tmp_path, monkeypatch):
    """figure2.csv holds per epoch the mean over seeds of train_true_acc, train_agreement and
    test_acc; the left panel's title and legend name true labels and agreement, the weak and
    ceiling levels are drawn on both panels; an older file's `train_acc` is its train_true_acc."""
    drawn = {}

    def capture(fig, plt):
        drawn["titles"] = [ax.get_title() for ax in fig.axes]
        drawn["labels"] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        drawn["levels"] = [[t.get_text() for t in ax.texts] for ax in fig.axes]
        plt.close(fig)
        return b"png"
    monkeypatch.setattr(report, "png_bytes", capture)
    new = [{"epoch": e, "step": 2 * e, "train_true_acc": 0.5 + 0.1 * e, "train_agreement": 0.6 + 0.1 * e,
            "test_acc": 0.4} for e in (0, 1)]
    old = [{"epoch": e, "step": 2 * e, "train_acc": 0.7, "test_acc": 0.4} for e in (0, 1)]
    put(tmp_path / "runs", {**good_result("cpl", 0, 0.6), "curves": new})
    put(tmp_path / "runs", {**good_result("cpl", 1, 0.6), "curves": [
        {**row, "train_true_acc": 0.3 + 0.1 * row["epoch"], "train_agreement": 0.9} for row in new]})
    put(tmp_path / "runs", {**good_result("auxconf-lp", 0, 0.5), "curves": old})
    for level, acc in (("weak", 0.3), ("ceiling", 0.8)):
        put(tmp_path / "runs", good_result(level, 0, acc))
    report.build_tables(tmp_path / "runs", tmp_path / "t")
    rows = list(csv.DictReader(open(tmp_path / "t" / "figure2.csv")))
    cpl1 = next(r for r in rows if r["method"] == "cpl" and r["epoch"] == "1")
    assert float(cpl1["train_true_acc"]) == pytest.approx(50.0)  # (60 + 40) / 2
    assert float(cpl1["train_agreement"]) == pytest.approx(80.0) and float(cpl1["seeds"]) == 2
    assert float(cpl1["train_agreement_std"]) == pytest.approx(math.sqrt(2) * 10)
    lp = next(r for r in rows if r["method"] == "auxconf-lp")
    assert float(lp["train_true_acc"]) == pytest.approx(70.0) and lp["train_agreement"] == ""
    assert "hold-train accuracy (true labels" in drawn["titles"][0]
    assert "agreement with its training labels" in drawn["titles"][0]
    assert "D'_test accuracy (true labels)" in drawn["titles"][1]
    assert "cpl agreement with its weak labels (n=2)" in drawn["labels"][0]
    assert not any("agreement" in label for label in drawn["labels"][1])
    for panel in drawn["levels"]:  # both panels, as the paper draws them
        assert any(t.startswith("weak on D'_test 30.00") for t in panel)
        assert any(t.startswith("ceiling on D'_test 80.00") for t in panel)


def test_a_results_folder_copied_from_another_machine_joins_the_local_runs(tmp_path, capsys):
    """Runs of another machine (its data and its copy of one CLIP config at other paths, the same
    split files and config digest) are the same cells' seeds, not other CLIP models or a sweep;
    the same run in both folders counts once."""
    clip = {"clip": ["d1g3st", None]}
    here = dict(clip_model="/home/a/tiny-clip.json", **clip)
    there = dict(clip_model="/home/b/tiny-clip.json", data_root="/scratch/b/data", **clip)
    for seed in (0, 1):
        put(tmp_path / "runs", good_result("cpl", seed, 0.5, **here), "mine")
        put(tmp_path / "runs", good_result("cpl", seed + 2, 0.7, **there), "copied")
    put(tmp_path / "runs", good_result("cpl", 0, 0.5, **there), "copied-again")
    report.build_tables(tmp_path / "runs", tmp_path / "t")
    printed = capsys.readouterr().out
    assert "other CLIP models" not in printed and "other settings" not in printed
    assert table_row((tmp_path / "t" / "table2.md").read_text(), "cpl")[0].startswith("60.00 ± 11.55")
    assert "1 runs repeat another" in printed


def test_another_clip_config_is_still_another_model(tmp_path, capsys):
    put(tmp_path / "runs", good_result("cpl", 0, 0.5, clip=["aaa", None]), "a")
    put(tmp_path / "runs", good_result("cpl", 1, 0.5, clip=["aaa", None]), "a")
    put(tmp_path / "runs", good_result("cpl", 0, 0.9, clip=["bbb", None]), "b")
    report.build_tables(tmp_path / "runs", tmp_path / "t")
    assert "left out 1 runs of other CLIP models" in capsys.readouterr().out


def test_tables_without_figure_2s_methods_make_no_empty_figure_and_no_warning(tmp_path, recwarn, capsys):
    for m in ("weak", "zero-shot"):
        put(tmp_path / "runs", {**good_result(m), "curves": [{"epoch": 0, "step": 0, "test_acc": 0.5}]})
    report.build_tables(tmp_path / "runs", tmp_path / "t")
    assert not (tmp_path / "t" / "figure2.png").exists() and not (tmp_path / "t" / "figure2.csv").exists()
    assert not [w for w in recwarn if "legend" in str(w.message)] and capsys.readouterr().err == ""


def test_a_sweep_over_tune_by_is_a_row_per_criterion_in_tables_and_ablation(tmp_path):
    from w2s_clip_lab import ablations
    for seed in (0, 1):
        put(tmp_path / "runs", good_result("cpl", seed, 0.5), "agreement")
        put(tmp_path / "runs", good_result("cpl", seed, 0.6, tune_by="weak-kl"), "weak-kl")
        put(tmp_path / "runs", good_result("kd-lp", seed, 0.4), "agreement")
        put(tmp_path / "runs", good_result("kd-lp", seed, 0.4, tune_by="weak-kl"), "weak-kl")
    report.build_tables(tmp_path / "runs", tmp_path / "t")
    t2 = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(t2, "cpl")[0].startswith("50.00") and table_row(t2, "cpl (tune_by=weak-kl)")[0].startswith("60.00")
    text = ablations.ablation_table(tmp_path / "runs")
    assert table_row(text, "paper defaults") == ["40.00 ± 0.00", "50.00 ± 0.00"]
    assert table_row(text, "--tune-by weak-kl") == ["40.00 ± 0.00 (+0.00)", "60.00 ± 0.00 (+10.00)"]


def test_each_table_has_a_long_form_csv_of_its_numbers_removed_with_it(tmp_path):
    """table2.csv holds every number of table2.md's main table as one row: accuracy (mean, std
    and n over seeds; Avg. over the columns), PGR of the means, CPL − the best baseline with
    its interval and the baseline named, and the paper's value; a CSV of another name is the
    user's and kept."""
    import csv
    out = tmp_path / "runs"
    accs = {"weak": (0.40, 0.42), "kd-lp": (0.50, 0.46), "ce-lp": (0.44, 0.44), "cpl": (0.55, 0.53),
            "ceiling": (0.70, 0.72)}
    for method, (a, b) in accs.items():
        for seed, acc in ((0, a), (1, b)):  # 100 D'_test images, round(100 acc) of them right
            right = round(100 * acc)
            put(out, {**good_result(method, seed, acc), "d_test_index": list(range(100)),
                      "d_test_labels": [0] * 100, "predictions": [0] * right + [1] * (100 - right)})
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "table9.csv").write_text("not ours\n")
    run.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    rows = list(csv.DictReader((tmp_path / "t" / "table2.csv").open()))
    cell = lambda kind, method, col: next(r for r in rows if (r["kind"], r["method"], r["column"])  # noqa: E731
                                          == (kind, method, col))
    kd = cell("accuracy", "kd-lp", "sketch")
    assert float(kd["mean"]) == pytest.approx(48.0) and float(kd["std"]) == pytest.approx(2 ** 0.5 * 2)
    assert kd["n"] == "2" and float(kd["paper"]) == report.PAPER[("table2", "kd-lp", "sketch")]
    assert float(cell("pgr", "cpl", "sketch")["mean"]) == pytest.approx((54 - 41) / (71 - 41))
    delta = cell("delta", "cpl", "Avg.")
    assert float(delta["mean"]) == pytest.approx(54 - 48) and delta["compared_with"] == "kd-lp"
    assert float(delta["low"]) <= float(delta["mean"]) <= float(delta["high"])
    assert float(cell("accuracy", "weak", "Avg.")["mean"]) == pytest.approx(41.0)
    assert {r["table"] for r in rows} == {"table2"} and (tmp_path / "t" / "table9.csv").exists()
    for name in ("table3.csv", "table4.csv"):  # written and owned (removed) with their tables
        assert (tmp_path / "t" / name).exists() and name in report.TABLE_FILES
