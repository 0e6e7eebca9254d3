"""Tuning rules judged by regret: which rule for choosing a method's hyperparameters on hold-val
picks the grid point whose student is best on D'_test?

Every weak-to-strong run with `--tune hold-val` records, per point of its grid, the hold-val score
under each rule of w2s_clip.TUNING_RULES (weak labels only), whether the point is the flags' own
values (what `--tune none` trains) and its D'_test accuracy (for this analysis, never to select).
A rule's regret on one run is the D'_test accuracy of the grid's best point minus that of the point
the rule picks: 0 when it picks the best, never negative. `make demo-tuning` writes the table:

    python -m w2s_clip_lab.regret --levels paper=demo/tuning/paper easy=demo/tuning/easy \\
        --output demo/results/tuning_regret.md
"""
import argparse
import sys
from pathlib import Path

import w2s_clip
from w2s_clip import UserError
from w2s_clip_lab import checks, files, report, store

RULES = (*w2s_clip.TUNING_RULES, "none")  # "none": the flags' values, no tuning


def pick(tuning, rule):
    """The index of the grid point `rule` picks from a run's `tuning` rows, as fit_tuned picks
    it (the highest score, a head that learned before one that did not, ties to the earlier
    point, a diverged point never); for "none" the point at the flags' values (None if the grid
    does not hold it or it diverged)."""
    trained = [i for i, row in enumerate(tuning) if "scores" in row]
    if rule == "none":
        return next((i for i in trained if tuning[i].get("at_flags")), None)
    return max(trained, key=lambda i: (tuning[i].get("learned", True), tuning[i]["scores"][rule], -i))


def regret(tuning, rule):
    """Best grid point's D'_test accuracy minus the picked point's (points in [0, 1]), or None
    when the rule cannot pick (no point at the flags' values)."""
    i = pick(tuning, rule)
    best = max(row["test_accuracy"] for row in tuning if "scores" in row)
    return None if i is None else best - tuning[i]["test_accuracy"]


def regret_records(out_dir, label):
    """One record per run under out_dir with a tuning grid of two or more points and every rule's
    scores: {level, method, domain, seed, regret: {rule: points in [0, 1] or None}}."""
    records = []
    for row in report.load_results(out_dir):
        tuning = (store.read_result(Path(row["path"])) or {}).get("tuning") or []
        trained = [t for t in tuning if "diverged" not in t]
        if len(trained) < 2 or not all(isinstance(t.get("scores"), dict) for t in trained):
            continue  # nothing tuned (CE, weak, ceiling), or a file older than the rules' scores
        records.append({"level": label, "method": row["method"], "domain": row["domain"],
                        "seed": row["seed"], "regret": {rule: regret(tuning, rule) for rule in RULES}})
    return records


def mean_interval(values, n_boot=2000, seed=0):
    """Mean of `values` and its 95% percentile-bootstrap interval (seeded)."""
    import torch
    v = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (n_boot, len(v)), generator=g)].mean(dim=1)
    return v.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def cell(values):
    """`mean [lo, hi]` in points, n runs, or — when there are none."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "—"
    m, lo, hi = mean_interval(values)
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def regret_table(records):
    """The markdown of tuning_regret.md: mean regret per rule and method (and per level), with
    95% bootstrap intervals over the runs (domains x seeds), and the rule with the lowest mean
    regret over all methods and levels. Returns (text, that rule)."""
    if not records:
        raise UserError("no run with a tuning grid and every rule's scores: run w2s_clip.py with "
                        "--tune hold-val (this version) into the folders given")
    levels = list(dict.fromkeys(r["level"] for r in records))
    methods = sorted({r["method"] for r in records})
    overall = {rule: [r["regret"][rule] for r in records] for rule in RULES}
    usable = {rule: v for rule, v in overall.items() if all(x is not None for x in v)}
    winner = min(usable, key=lambda rule: (sum(usable[rule]) / len(usable[rule]),
                                           RULES.index(rule)))
    head = "| method | runs | " + " | ".join(RULES) + " |"
    rule_line = "|---|---|" + "---|" * len(RULES)
    lines = ["## Tuning rules judged by regret", "",
             "Regret = D'_test accuracy of the grid's best point − that of the point the rule picks "
             "(points; 0 = the best pick). Mean over runs (domains × seeds), 95% bootstrap interval. "
             "Rules: agreement with hold-val's weak labels, weak-kl (lowest KL to them), val-loss "
             "(lowest hold-val loss at the flags' values), none (the flags' values, no tuning).", ""]
    for level in [*levels, "all"]:
        rows = [r for r in records if level in ("all", r["level"])]
        lines += [f"### {'all levels' if level == 'all' else level}", "", head, rule_line]
        for method in [*methods, "all methods"]:
            sub = [r for r in rows if method in ("all methods", r["method"])]
            if sub:
                lines.append(f"| {method} | {len(sub)} | " + " | ".join(
                    cell([r["regret"][rule] for r in sub]) for rule in RULES) + " |")
        lines.append("")
    mean = lambda rule: 100 * sum(usable[rule]) / len(usable[rule])  # noqa: E731
    lines.append(f"Lowest mean regret over all methods and levels: **{winner}** "
                 f"({mean(winner):.2f} points; " + ", ".join(
                     f"{rule} {mean(rule):.2f}" for rule in usable if rule != winner) + ").")
    return "\n".join(lines) + "\n", winner


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", nargs="+", required=True, metavar="LABEL=DIR",
                   type=checks.label_dir,
                   help="result folders of runs with --tune hold-val, each with a label")
    p.add_argument("--output", default="results/tuning_regret.md", help="the markdown file written")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        records = [rec for label, folder in args.levels for rec in regret_records(folder, label)]
        text, winner = regret_table(records)
        out = Path(args.output)
        checks.check_writable(out.parent, "--output")
        files.atomic_save(text, out)
        print(text, end="")
        print(f"wrote {out}")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
