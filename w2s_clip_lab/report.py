"""Reporting for w2s_clip.py: Tables 2-4, Figure 2, paper_gap.md, the differences and imitation
tables, and the box each run prints, all from the results.json files (never from logs), beside
the paper's published numbers.

    python -m w2s_clip_lab.run --build-tables --out-dir runs --tables-dir results
"""
import csv
import io
import json
import os
from pathlib import Path

import torch

from w2s_clip import DOMAINS, LOSS_NAMES, METHOD_HEAD_LOSS, UserError, pgr
from w2s_clip_lab.checks import check_writable
from w2s_clip_lab.files import (atomic_save, cache_key, fsync_path, refuse_link, remove_stale_temps,
                                temp_path)
from w2s_clip_lab.store import (describe_difference, filled_settings, method_settings, read_result,
                                result_files, result_path, same_settings, settings_key)


def pgr_text(weak, strong, ceiling):
    """PGR with two decimals, or `n/a` when ceiling <= weak: there is no gap to recover, and the
    ratio's sign flips so that the worst method would score highest."""
    return f"{pgr(weak, strong, ceiling):.2f}" if ceiling > weak else "n/a"


TABLE2_ROWS = (("weak", "zero-shot") + tuple(f"{loss}-lp" for loss in LOSS_NAMES)
               + tuple(f"{loss}-tp" for loss in LOSS_NAMES) + ("cpl", "ceiling"))


DELTA = "Δ (CPL − best baseline)"


# Table 3's five weak models, by the Hugging Face ids its column names are.
PAPER_WEAK_MODELS = ("hf:microsoft/resnet-18", "hf:microsoft/resnet-26", "hf:microsoft/resnet-34",
                     "hf:microsoft/cvt-13", "hf:facebook/convnext-tiny-224")


# The paper's published numbers (%), rows as our method names, columns then Avg. (None: not given).
PAPER_TABLE2 = {  # Table 2: ViT-B/32, columns DOMAINS then Avg.; the weak model is not named
    "weak": (67.15, 31.71, 67.90, 46.70, 85.10, 52.26, None),
    "ceiling": (74.27, 50.84, 72.24, 49.92, 85.34, 66.64, None),
    "ce-lp": (66.97, 30.55, 64.90, 45.59, 82.69, 55.28, 57.66),
    "kd-lp": (70.69, 35.78, 68.28, 48.15, 83.66, 59.88, 61.07),
    "auxconf-lp": (67.41, 18.37, 66.92, 30.59, 84.00, 56.79, 54.01),
    "adaptconf-lp": (70.68, 33.78, 67.86, 47.80, 83.84, 60.18, 60.69),
    "ce-tp": (62.02, 29.25, 62.68, 44.82, 81.16, 52.51, 55.41),
    "kd-tp": (69.57, 36.03, 68.37, 47.34, 83.70, 59.93, 60.82),
    "auxconf-tp": (69.20, 20.97, 68.61, 43.60, 83.92, 58.49, 57.47),
    "adaptconf-tp": (69.97, 35.96, 68.18, 47.42, 83.59, 59.95, 60.85),
    "cpl": (73.10, 46.14, 71.80, 47.96, 85.41, 64.01, 64.74),
    DELTA: (2.41, 10.11, 3.19, -0.19, 1.41, 3.83, 3.67)}


PAPER_TABLE3 = {  # Table 3: clipart, columns PAPER_WEAK_MODELS then Avg.
    "weak": (55.22, 57.2, 59.96, 51.33, 69.47, None),
    "ceiling": (74.27, 74.27, 74.27, 74.27, 74.27, None),
    "ce-lp": (64.28, 64.19, 64.72, 62.19, 69.5, 64.98),
    "kd-lp": (66.80, 67.26, 68.53, 65.89, 71.53, 68.00),
    "auxconf-lp": (66.19, 67.02, 66.21, 62.52, 71.10, 66.61),
    "adaptconf-lp": (67.72, 68.13, 68.83, 66.95, 71.42, 68.61),
    "ce-tp": (62.22, 63.35, 64.04, 61.02, 67.71, 63.67),
    "kd-tp": (65.71, 66.43, 67.34, 64.50, 69.31, 66.66),
    "auxconf-tp": (66.39, 67.04, 67.47, 66.04, 69.56, 67.30),
    "adaptconf-tp": (65.91, 66.69, 67.42, 65.31, 69.04, 66.87),
    "cpl": (72.25, 71.84, 72.06, 71.91, 72.47, 72.11),
    DELTA: (4.53, 3.71, 3.23, 4.96, 0.94, 3.50)}


PAPER_TABLE1 = {  # Table 1, DomainNet cleaned: (#train, #test) images
    "clipart": (33525, 14604), "infograph": (36023, 15582), "painting": (50416, 21850),
    "quickdraw": (120750, 51750), "real": (120906, 52041), "sketch": (48212, 20916)}


# {(table, row, column): value}: what the tables print in brackets. Table 4 gives one "average
# performance" per row, in a setting the paper does not state; Figure 2 draws clipart's levels.
PAPER = {**{("table2", row, col): v for row, vals in PAPER_TABLE2.items()
            for col, v in zip(DOMAINS + ("Avg.",), vals) if v is not None},
         **{("table3", row, col): v for row, vals in PAPER_TABLE3.items()
            for col, v in zip(PAPER_WEAK_MODELS + ("Avg.",), vals) if v is not None},
         ("table4", "cpl-text", "Avg."): 70.34, ("table4", "cpl", "Avg."): 74.42,
         ("figure2", "weak", "clipart"): 67.15, ("figure2", "ceiling", "clipart"): 74.27,
         **{("table1", d, split): n for d, counts in PAPER_TABLE1.items()
            for split, n in zip(("#train", "#test"), counts)}}


def result_row(r, path):
    """The flat row the tables group: what ran, its numbers, and its settings, with the CLIP model
    and weights as the run command compared them (real paths, a checkpoint's digest), not as typed."""
    cfg, settings = r["config"], r.get("settings")
    canonical = settings if isinstance(settings, dict) else cfg
    init = cfg.get("prototype_init", "single")
    method = r["method"] + (f" ({init} init)" if r["method"] in ("cpl", "ceiling", "zero-shot")
                            and init != "single" else "")
    return {"domain": r["domain"], "method": method, "seed": r["seed"],
            "dataset": cfg.get("dataset", "domainnet"),
            "weak_model": canonical.get("weak_model", cfg["weak_model"]),
            "clip_model": canonical.get("clip_model", cfg["clip_model"]),
            "clip_pretrained": canonical.get("clip_pretrained", cfg.get("clip_pretrained")),
            "test_accuracy": r["test_accuracy"], "worst10_accuracy": r["worst10_accuracy"],
            **{key: r.get(key) for key in ("agreement_with_weak", "accuracy_where_weak_right",
                                           "accuracy_where_weak_wrong", "predictions",
                                           "d_test_index", "d_test_labels")},
            "n_predicted_classes": r.get("n_predicted_classes"), "curves": r.get("curves", []),
            "settings": settings, "config": cfg, "tuned": r.get("tuned"),
            "hardware": r.get("hardware"), "path": str(path)}


def load_results(out_dir):
    """Every readable results.json under out_dir (`result_files`: symbolic links to folders
    followed, each file once) as a flat row (`result_row`); unreadable ones are named and
    skipped. Two files of one run (same domain, method, seed and settings, e.g. a copied folder)
    count once: the one nearest out_dir is kept and a note names the other. Runs of other
    settings are all kept: `comparable_runs` decides which ones a table combines."""
    rows, seen = [], {}
    for path in result_files(out_dir):  # symbolic links to folders followed
        r = read_result(path)
        if r is None:
            continue
        row = result_row(r, path)
        run = (row["domain"], row["method"], row["seed"],
               settings_key(row["settings"]) or (row["weak_model"], row["clip_model"],
                                                 row["clip_pretrained"]))
        if run in seen and not isinstance(row["settings"], dict):  # older files: cannot tell
            raise UserError(f"{path} and {seen[run]} are the same run and record no settings to "
                            f"tell them apart; keep one, or build tables from a narrower --out-dir")
        if run in seen:
            print(f"note: {path} is the same run as {seen[run]} (same settings); counted once")
            continue
        seen[run] = path
        rows.append(row)
    return sorted(rows, key=lambda r: r["path"])


TABLE_AXES = ("domain", "splits", "weak_model", "prototype_init", "cpe_k",
              "class_descriptions")  # vary across a table's cells (CPE's flags with its init)


def varying_settings(settings):
    """The names of the settings whose values differ among `settings` (dicts), sorted."""
    names = sorted({k for s in settings for k in s})
    return [k for k in names if len({json.dumps(s.get(k), sort_keys=True, default=str)
                                     for s in settings}) > 1]


def short_value(v):
    """A setting's value as a label shows it: 0.1, `0.01 0.1`, at most 24 characters."""
    v = f"{v:g}" if isinstance(v, float) else " ".join(map(str, v)) if isinstance(v, list) else str(v)
    return v if len(v) <= 24 else v[:21] + "..."


def setting_label(settings, ref, vary=TABLE_AXES):
    """`name=value, ...` of the settings that differ from `ref` (e.g. `tau=0.1, tune=none`)."""
    return ", ".join(f"{name}={short_value(settings.get(name))}"
                     for name in sorted(settings.keys() | ref.keys())
                     if name not in vary and settings.get(name) != ref.get(name))


WHERE_SETTINGS = ("data_root", "clip_model", "clip_pretrained")  # paths: which files, not what


def table_settings(method, settings):
    """The settings (run_settings' dict) by which the tables tell `method`'s runs apart:
    `method_settings` but where the files are (a results folder copied from another machine, the
    same data or CLIP config at another path), as the split files' digest (`splits`) and the CLIP
    config's and weights' identity (`clip`) say what they are; where a file lacks `clip`, its
    paths count."""
    kept = method_settings(method, settings)
    if "clip" in kept:
        kept = {k: v for k, v in kept.items() if k not in WHERE_SETTINGS}
    return kept


def clip_group(r):
    """Which CLIP model a row's run used, as the tables group them: the config's digest or the
    open_clip name (`settings["clip"][0]`), else the name recorded."""
    clip = r["settings"].get("clip") if isinstance(r.get("settings"), dict) else None
    return str(clip[0]) if isinstance(clip, list) and clip else str(r["clip_model"])


def comparable_runs(rows, vary=TABLE_AXES):
    """The rows for one set of tables: those made with the most common settings apart from seed,
    method and the settings in `vary` keep their method's name; runs made with other settings (a
    sweep) become rows of their own, named by what differs (`cpl (tau=0.1)`); rows without a
    settings dict (older files) are kept unchecked. Within a domain, runs of other split files
    than most are left out.

    Returns:
        (rows, notes): a note on the renamed rows (how many, which settings differ, one file),
        on rows left out and on the unchecked rows.
    """
    def relevant(r, settings=None):  # what the run's result depends on, of `settings` or its own
        method = base_method(r["method"])  # `cpl (ensemble init)` depends on what cpl does
        return {k: v for k, v in table_settings(method, settings or r["settings"]).items()
                if k not in vary}

    checked = [r for r in rows if isinstance(r.get("settings"), dict)]
    candidates = {cache_key(**r["settings"]): r["settings"] for r in checked}
    ref = {}  # per group (weak or not): the settings most runs of the group agree with
    for weak in (False, True):
        members = [r for r in checked if (r["method"] == "weak") == weak]
        if members:
            ref[weak] = candidates[max(sorted(candidates), key=lambda c: sum(
                relevant(r) == relevant(r, candidates[c]) for r in members))]
    notes, kept, seen, merged, other, names = [], [], set(), 0, [], set()
    for r in rows:
        weak = r["method"] == "weak"
        has = isinstance(r.get("settings"), dict)
        same = (r["domain"], r["weak_model"], r["method"], r["seed"], cache_key(**table_settings(
            base_method(r["method"]), r["settings"]))) if has else None  # axes included
        if same is not None and same in seen:
            merged += 1  # the same run in each folder of a sweep that does not touch it
            continue
        seen.add(same)
        if has and relevant(r) != relevant(r, ref[weak]):  # a sweep, or other settings: a row
            mine, theirs = relevant(r), relevant(r, ref[weak])
            label = setting_label(mine, theirs, ())
            names |= {n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n)}
            other.append(r)
            r = {**r, "method": f"{r['method']} ({label})", "variant_of": r["method"]}
        kept.append(r)
    if other:
        plain_ref = filled_settings(ref[False if False in ref else True])
        plain = ", ".join(f"{n}={short_value(plain_ref.get(n))}" for n in sorted(names))
        notes.append(f"{len(other)} runs made with other settings than the other "
                     f"{len(kept) - len(other)} are rows of their own, named by what differs "
                     f"(the rows without a label have {plain}), e.g. {other[0]['path']}")
    if merged:
        notes.append(f"{merged} runs repeat another with all the settings they depend on (a sweep's "
                     f"folders each hold one): counted once")
    for domain in sorted({r["domain"] for r in kept}):  # a domain's split files are one per table
        mine = [r for r in kept if r["domain"] == domain and isinstance(r.get("settings"), dict)]
        digests = [r["settings"].get("splits") for r in mine]
        if len(set(digests)) > 1:
            common = max(sorted(set(digests), key=str), key=digests.count)
            left = [r for r in mine if r["settings"].get("splits") != common]
            notes.append(f"left out {len(left)} runs of {domain} made with other split files "
                         f"than the other {digests.count(common)} (the split files changed "
                         f"between runs), e.g. {left[0]['path']}")
            kept = [r for r in kept if not any(r is x for x in left)]
    unchecked = len(rows) - len(checked)
    if unchecked and checked:
        notes.append(f"{unchecked} runs are older results.json files without their settings: "
                     f"kept, not checked for comparability")
    return kept, notes


def csv_text(rows, fields):
    """CSV text of dict rows with the columns `fields` (other keys ignored), header first."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def mean_std(values):
    """(mean, sample std) of a list; std is 0 for a single value."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def accuracy_grid(rows, row_key, col_key, metric="test_accuracy", scale=100):
    """{(row, col): [per-seed values · scale (% for accuracies)]} from flat result rows; rows
    without `metric` (older results) are left out."""
    grid = {}
    for r in rows:
        if r.get(metric) is not None:
            grid.setdefault((r[row_key], r[col_key]), []).append(scale * r[metric])
    return grid


def base_method(name):
    """The method of a table row: `cpl` for `cpl (ensemble init)` or `cpl (tau=0.1)`."""
    return name.split(" (")[0]


def is_baseline(method):
    """An LP or TP weak-to-strong row (e.g. `kd-tp`, `kd-tp (tau=0.1)`): what CPL is compared with."""
    return base_method(method) in METHOD_HEAD_LOSS and not method.startswith("cpl")


def markdown_table(title, row_names, col_names, grid, table_id, pgr_column=False, delta=True,
                   paper=None):
    """Rows x columns of `mean ± std` cells (paper value in brackets), an Avg. column, the Δ row.

    A cell over another number of seeds than most cells says so: `(n=1)`.
    Avg. is the mean of the per-column means (shown when every column has runs). The Δ row is CPL
    minus the best other weak-to-strong row. The PGR column is the PGR of the row's Avg. against
    weak's and the ceiling's Avg. (the ratio of mean gaps; a mean of per-column ratios lets one
    column with a tiny gap decide it), `n/a` where ceiling <= weak. `paper` maps (table_id, row,
    column) to a published value.
    """
    stats = {key: mean_std(v) for key, v in grid.items()}
    means = {key: m for key, (m, _) in stats.items()}
    sizes = [len(grid[(r, c)]) for r in row_names for c in col_names if (r, c) in grid]
    usual = max(set(sizes), key=lambda n: (sizes.count(n), n)) if sizes else 0  # most cells
    seeds = lambda key: "" if len(grid[key]) == usual else f" (n={len(grid[key])})"
    paper = paper or {}
    cols = list(col_names) + ["Avg."]

    def avg(row):
        vals = [means.get((row, c)) for c in col_names]
        return sum(vals) / len(vals) if vals and None not in vals else None

    def cell(row, col, text):
        ref = paper.get((table_id, row, col))
        return text if ref is None else f"{text} [{ref:.2f}]"

    head = ["method"] + cols + (["PGR"] if pgr_column else [])
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in row_names:
        cells = [cell(row, c, "{:.2f} ± {:.2f}".format(*stats[(row, c)]) + seeds((row, c))
                      if (row, c) in stats else "—") for c in col_names]
        cells.append(cell(row, "Avg.", f"{avg(row):.2f}" if avg(row) is not None else "—"))
        if pgr_column:
            levels = (avg("weak"), avg(row), avg("ceiling"))
            known = row not in ("weak", "ceiling") and None not in levels
            cells.append(pgr_text(*levels) if known else "—")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    baselines = [r for r in row_names if is_baseline(r)]
    if delta and "cpl" in row_names and baselines:
        name, cells = "Δ (CPL − best baseline)", []
        for c in cols:
            get = avg if c == "Avg." else (lambda r, c=c: means.get((r, c)))
            base = [get(r) for r in baselines if get(r) is not None]
            ok = get("cpl") is not None and base
            cells.append(cell(name, c, f"{get('cpl') - max(base):+.2f}" if ok else "—"))
        lines.append(f"| {name} | " + " | ".join(cells) + (" | |" if pgr_column else " |"))
    return "\n".join(lines) + "\n"


def bootstrap_difference(pairs, n_boot=2000, seed=0, level=0.95):
    """Accuracy of A minus accuracy of B in points, with a paired bootstrap interval.

    `pairs` maps each column (a domain, a weak model) to one (correct_a, correct_b) pair of bool
    tensors per seed, A and B scored on the same D'_test images of that seed. The difference is
    the mean over columns of the mean over seeds. Each of `n_boot` replicates redraws every seed's
    images with replacement, one draw for both methods (paired), and recomputes it; the interval
    holds the middle `level` of the replicates (percentile bootstrap, seeded).
    Returns:
        (difference, low, high) in points.
    """
    g = torch.Generator().manual_seed(seed)
    point, reps = 0.0, torch.zeros(n_boot, dtype=torch.float64)
    for column in pairs.values():
        for a, b in column:
            d = a.double() - b.double()
            point += d.mean().item() / len(column) / len(pairs)
            for start in range(0, n_boot, 256):  # [chunk, n] indices at a time: bounded memory
                idx = torch.randint(len(d), (min(256, n_boot - start), len(d)), generator=g)
                reps[start:start + len(idx)] += d[idx].mean(dim=1) / len(column) / len(pairs)
    tail = (1 - level) / 2
    low, high = torch.quantile(reps, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return 100 * point, 100 * low, 100 * high


def correct_by_seed(rows, method, col_key, col):
    """{seed: (d_test_index, bool tensor of correct predictions)} of one method in one column,
    from the per-image predictions in results.json (runs without them are left out)."""
    out = {}
    for r in rows:
        if r["method"] == method and r[col_key] == col and r.get("predictions") is not None:
            out[r["seed"]] = (r["d_test_index"], torch.tensor(r["predictions"])
                              == torch.tensor(r["d_test_labels"]))
    return out


def differences(rows, col_key, col_names, baselines, n_boot=2000):
    """CPL against the best baseline and against the weak model per column and for Avg., each a
    (difference, low, high) in points from `bootstrap_difference` over the seeds both ran on the
    same images. The best baseline of a column is the one with the highest mean accuracy there;
    Avg.'s is the one with the highest mean over the columns (as the tables' Δ row).
    Returns {(comparison, column): (name of B, (difference, low, high)) or None}."""
    mean = lambda m, c: (lambda v: sum(v) / len(v) if v else None)(  # noqa: E731
        [r["test_accuracy"] for r in rows if r["method"] == m and r[col_key] == c])
    out = {}

    def pairs(other, cols):
        found = {}
        for c in cols:
            a, b = correct_by_seed(rows, "cpl", col_key, c), correct_by_seed(rows, other, col_key, c)
            same = [(a[s][1], b[s][1]) for s in sorted(a.keys() & b.keys()) if a[s][0] == b[s][0]]
            if not same:
                return None
            found[c] = same
        return found

    for c in list(col_names) + ["Avg."]:
        cols = col_names if c == "Avg." else [c]
        score = lambda m: (None if any(mean(m, x) is None for x in cols)  # noqa: E731
                           else sum(mean(m, x) for x in cols) / len(cols))
        ranked = sorted((b for b in baselines if score(b) is not None), key=lambda b: -score(b))
        for comparison, other in (("best baseline", ranked[0] if ranked else None), ("weak", "weak")):
            p = pairs(other, cols) if other else None
            out[(comparison, c)] = (other, bootstrap_difference(p, n_boot)) if p else None
    return out


def differences_table(title, rows, col_key, col_names, baselines, diffs=None):
    """differences.md's section for one table: `+d [low, high]` per column and Avg. (`diffs`:
    `differences`' result, computed here if not given)."""
    diffs = differences(rows, col_key, col_names, baselines) if diffs is None else diffs
    lines = [f"### {title}", "", "| CPL − | " + " | ".join(list(col_names) + ["Avg."]) + " |",
             "|" + "---|" * (len(col_names) + 2)]
    for comparison in ("best baseline", "weak"):
        cells = []
        for c in list(col_names) + ["Avg."]:
            found = diffs[(comparison, c)]
            name = f" ({found[0]})" if found and comparison != "weak" else ""
            cells.append(f"{found[1][0]:+.2f} [{found[1][1]:+.2f}, {found[1][2]:+.2f}]{name}"
                         if found else "—")
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paper_gap(title, table_id, row_names, col_names, rows, col_key, paper):
    """Ours − paper for every published cell of a table: `+d ± s`, s the std over seeds.

    `rows` are flat results (method, seed, test_accuracy and `col_key`). Avg. is the mean of the
    column means, its s the std over seeds of the per-seed row average (seeds every column has);
    Δ (CPL − best baseline, on means) has no s. A cell without ours or the paper's is `—`.
    """
    vals = {}
    for r in rows:
        vals.setdefault((r["method"], r[col_key]), {})[r["seed"]] = 100 * r["test_accuracy"]

    def ours(row, col):  # (mean, std) or None
        if col != "Avg.":
            return mean_std(list(vals[(row, col)].values())) if (row, col) in vals else None
        if any((row, c) not in vals for c in col_names):
            return None
        seeds = set.intersection(*(set(vals[(row, c)]) for c in col_names))
        per_seed = [sum(vals[(row, c)][s] for c in col_names) / len(col_names) for s in seeds]
        std = mean_std(per_seed)[1] if per_seed else float("nan")
        return sum(ours(row, c)[0] for c in col_names) / len(col_names), std

    cols, delta = list(col_names) + ["Avg."], "Δ (CPL − best baseline)"
    lines = [f"### {title}: ours − paper (± std over seeds)", "",
             "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    baselines = [r for r in row_names if r not in ("weak", "zero-shot", "ceiling", "cpl")]
    for row in list(row_names) + [delta]:
        if not any((table_id, row, c) in paper for c in cols):
            continue
        cells = []
        for c in cols:
            ref = paper.get((table_id, row, c))
            if row == delta:
                got = [ours(b, c) for b in baselines] if ours("cpl", c) else []
                got = [g[0] for g in got if g]
                mine = (ours("cpl", c)[0] - max(got), None) if got else None
            else:
                mine = ours(row, c)
            if ref is None or mine is None:
                cells.append("—")
            else:
                diff = round(mine[0] - ref, 2) + 0.0  # no "-0.00"
                cells.append(f"{diff:+.2f}" + ("" if mine[1] is None else f" ± {mine[1]:.2f}"))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if len(lines) == 4:
        lines.append("| no run matches a published cell |" + " |" * len(cols))
    return "\n".join(lines) + "\n"


def tables_runs(rows):
    """The runs the tables show: those of the data set and the CLIP model with the most runs,
    combined where comparable (`comparable_runs`). Returns (rows, dataset, CLIP model, notes on
    what was left out and on mixed hardware)."""
    count = lambda key, value: sum(r[key] == value for r in rows)  # noqa: E731
    dataset = max(sorted({r["dataset"] for r in rows}), key=lambda d: count("dataset", d))
    other_data = [r for r in rows if r["dataset"] != dataset]
    rows = [r for r in rows if r["dataset"] == dataset]
    groups = [clip_group(r) for r in rows]  # one config at two paths is one model
    group = max(sorted(set(groups)), key=groups.count)
    others = [r for r, g in zip(rows, groups) if g != group]
    rows = [r for r, g in zip(rows, groups) if g == group]
    clip_model = min(str(r["clip_model"]) for r in rows)
    rows, notes = comparable_runs(rows)
    kinds = {}
    for r in rows:
        hw = r.get("hardware") if isinstance(r.get("hardware"), dict) else {}
        kind = " ".join(str(hw[k]) for k in ("name", "capability", "precision") if hw.get(k))
        kinds[kind or "unrecorded hardware"] = kinds.get(kind or "unrecorded hardware", 0) + 1
    if len(kinds) > 1:
        notes.append("the tables combine runs made on different hardware: "
                     + ", ".join(f"{k} ({n} runs)" for k, n in sorted(kinds.items())))
    if other_data:
        notes.insert(0, f"left out {len(other_data)} runs of other data sets than the {len(rows)} "
                        f"of {dataset} ({', '.join(sorted({r['dataset'] for r in other_data}))}), "
                        f"e.g. {other_data[0]['path']}")
    if others:
        notes.insert(0, f"left out {len(others)} runs of other CLIP models than the "
                        f"{len(rows)} of {clip_model} "
                        f"({', '.join(sorted({str(r['clip_model']) for r in others}))}), "
                        f"e.g. {others[0]['path']}")
    return rows, dataset, clip_model, notes


def table_markdown(table_id, title, names, subset, col_key, col_names, delta, shown):
    """One table file: accuracy (mean ± std, the paper's value `shown` in brackets, Avg., PGR, Δ),
    then its companions: worst-10 accuracy, classes predicted and, for Tables 2 and 3, agreement
    with the weak model and accuracy where the weak model is wrong."""
    grid = accuracy_grid(subset, "method", col_key)
    worst = accuracy_grid(subset, "method", col_key, "worst10_accuracy")
    classes = accuracy_grid(subset, "method", col_key, "n_predicted_classes", scale=1)
    text = markdown_table(title, names, col_names, grid, table_id, True, delta, shown)
    text += "\n" + markdown_table("Worst-10 class accuracy (%): mean of the 10 lowest classes",
                                   names, col_names, worst, f"{table_id}-worst10", delta=delta)
    text += "\n" + markdown_table("Distinct classes predicted on D'_test (a collapsed head "
                                   "predicts few)", names, col_names, classes,
                                   f"{table_id}-classes", delta=False)
    if table_id != "table4":  # what the student copies from its supervisor
        for metric, what in (("agreement_with_weak", "Agreement with the weak model on D'_test "
                              "(%): the share of images where the prediction is the weak one"),
                             ("accuracy_where_weak_wrong", "Accuracy (%) on the D'_test images "
                              "the weak model gets wrong: the supervisor's mistakes not copied")):
            text += "\n" + markdown_table(what, [n for n in names if n != "weak"], col_names,
                                           accuracy_grid(subset, "method", col_key, metric),
                                           f"{table_id}-{metric}", delta=False)
    return text


LONG_FIELDS = ("table", "kind", "method", "variant", "column", "mean", "std", "n", "low", "high",
               "compared_with", "paper")  # tableN.csv: one row per number of tableN.md's main table


def table_long_form(table_id, names, subset, col_key, col_names, delta, shown, diffs=None):
    """tableN.md's main table as long-form rows (LONG_FIELDS), one per number, for pandas: kind
    `accuracy` (mean and std over seeds in %, n seeds; Avg.: the mean of the column means over n
    columns), `pgr` (of the means, per column and for Avg.), `delta` (CPL − the best baseline in
    points, with its 95% paired-bootstrap interval from `differences` where it names the same
    baseline); `variant` is a settings variant's label (`tau=0.1`), `paper` the published value."""
    grid = accuracy_grid(subset, "method", col_key)
    means = {key: mean_std(v)[0] for key, v in grid.items()}
    cols = list(col_names) + ["Avg."]

    def level(row, col):  # a row's mean in a column, or its Avg. over every column
        if col != "Avg.":
            return means.get((row, col))
        vals = [means.get((row, c)) for c in col_names]
        return sum(vals) / len(vals) if vals and None not in vals else None

    out = []

    def add(kind, row, col, mean, **more):
        method, _, variant = row.partition(" (")
        out.append({"table": table_id, "kind": kind, "method": method, "variant": variant.rstrip(")"),
                    "column": col, "mean": mean, "paper": shown.get((table_id, row, col)), **more})
    for row in names:
        for col in cols:
            if col != "Avg." and (row, col) in grid:
                m, s = mean_std(grid[(row, col)])
                add("accuracy", row, col, m, std=s, n=len(grid[(row, col)]))
            elif col == "Avg." and level(row, col) is not None:
                add("accuracy", row, col, level(row, col), n=len(col_names))
            levels = (level("weak", col), level(row, col), level("ceiling", col))
            if row not in ("weak", "ceiling") and None not in levels:
                add("pgr", row, col, pgr(*levels))
    baselines = [r for r in names if is_baseline(r)]
    for col in cols if delta and "cpl" in names and baselines else []:
        scored = {b: level(b, col) for b in baselines if level(b, col) is not None}
        if level("cpl", col) is None or not scored:
            continue
        best = max(scored, key=scored.get)
        found = (diffs or {}).get(("best baseline", col))
        low, high = found[1][1:] if found and found[0] == best else (None, None)
        out.append({"table": table_id, "kind": "delta", "method": "cpl", "variant": "", "column": col,
                    "mean": level("cpl", col) - scored[best], "low": low, "high": high,
                    "compared_with": best, "paper": shown.get((table_id, "Δ (CPL − best baseline)", col))})
    return out


def build_tables(out_dir, tables_dir, table_rows=TABLE2_ROWS, domains=DOMAINS, paper=PAPER,
                 paper_weak_models=PAPER_WEAK_MODELS):
    """Write table2.md, table3.md, table4.md, paper_gap.md, runs.csv and figure2.csv (+ .png).

    Tables 2 and 4 use the CLIP model and the weak model (resnet18 if present) with the most runs;
    Table 3 is clipart (or the first domain) by weak model: the paper's five (`paper_weak_models`)
    where any has runs, else every weak model. Every table has a worst-10 companion and one of the
    number of distinct classes predicted; paper_gap.md holds ours − paper for each published cell.
    The paper's Avg. is shown only where our columns are the paper's (all six domains; Table 3's
    five weak models), so that both are averages over the same columns.
    """
    if os.path.isfile(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a folder; pass the folder the runs "
                        f"wrote to")
    rows = load_results(out_dir)
    if not rows:
        raise UserError(f"no readable results.json under {out_dir}; run experiments first")
    check_writable(tables_dir, "--tables-dir")
    fields = ["domain", "method", "seed", "weak_model", "clip_model", "test_accuracy",
              "worst10_accuracy", "n_predicted_classes", "agreement_with_weak",
              "accuracy_where_weak_wrong", "path"]
    varying = varying_settings([r["settings"] for r in rows if isinstance(r["settings"], dict)])
    varying = [k for k in varying if k not in fields]  # e.g. tau in a sweep: a column each
    settings_of = lambda r: r["settings"] if isinstance(r["settings"], dict) else {}  # noqa: E731
    files = {"runs.csv": csv_text([{**r, **{k: settings_of(r).get(k) for k in varying}}
                                   for r in rows], fields[:-1] + varying + ["path"])}  # written last
    rows, dataset, clip_model, notes = tables_runs(rows)
    count = lambda key, value: sum(r[key] == value for r in rows)  # noqa: E731
    if dataset != "domainnet":  # the paper's numbers belong beside DomainNet runs only
        paper, domains = {}, sorted({r["domain"] for r in rows},
                                    key=lambda d: (d.lower() not in DOMAINS, d))
    table4_rows = ("zero-shot", "zero-shot (ensemble init)", "zero-shot (cpe init)", "cpl",
                   "cpl (ensemble init)", "cpl (cpe init)", "cpl-text")
    extra = sorted({r["method"] for r in rows if " (" not in r["method"]} - {*table_rows, *table4_rows})
    table_rows = tuple(table_rows[:-1]) + tuple(extra) + tuple(table_rows[-1:])  # ceiling last
    variants = {(r["variant_of"], r["method"]) for r in rows if r.get("variant_of")}
    with_variants = lambda names: [v for n in names for v in  # noqa: E731
                                   [n, *sorted(m for base, m in variants if base == n)]]
    for note in notes:
        print(f"note: {note}")
    weak_models = sorted({r["weak_model"] for r in rows},
                         key=lambda w: (w != "resnet18", -count("weak_model", w), w))
    main_rows = [r for r in rows if r["weak_model"] == weak_models[0]]
    cols = [d for d in domains if any(r["domain"] == d for r in main_rows)]
    t3_domain = next((d for d in sorted({r["domain"] for r in rows}) if d.lower() == "clipart"),
                     cols[0])
    t3_rows = [r for r in rows if r["domain"] == t3_domain]
    t3_models = [w for w in paper_weak_models if w in weak_models] or weak_models
    shown = Path(clip_model).name if str(clip_model).endswith(".json") else clip_model
    specs = [("table2", f"Table 2: accuracy (%) on D'_test, {shown} with weak model "
              f"{weak_models[0]}", with_variants(table_rows), main_rows, "domain", cols, True),
             ("table3", f"Table 3: accuracy (%) on {t3_domain} by weak model, {shown}",
              with_variants(table_rows), t3_rows, "weak_model", t3_models, True),
             ("table4", "Table 4: tuning the prototypes (cpl) vs. the text encoder (cpl-text)",
              with_variants(table4_rows), main_rows, "domain", cols, False)]
    gaps = ["# Ours − paper per published cell (percentage points)", ""]
    difference_parts = [DIFFERENCES_HEAD]
    if dataset != "domainnet":
        gaps.append(f"These are {dataset} runs: the paper publishes DomainNet numbers only.\n")
    paper_cols = {"table2": tuple(domains), "table3": tuple(paper_weak_models),
                  "table4": tuple(domains)}
    for table_id, title, names, subset, col_key, col_names, delta in specs:
        same_cols = tuple(col_names) == paper_cols[table_id]  # else our Avg. is not the paper's
        shown = {key: v for key, v in paper.items() if same_cols or key[2] != "Avg."}
        files[f"{table_id}.md"] = table_markdown(table_id, title, names, subset, col_key, col_names,
                                                 delta, shown)
        diffs = None
        if table_id != "table4":
            diff_title = f"{title.split(':')[0]}: CPL minus ..., points, 95% interval"
            baselines = [n for n in names if is_baseline(n)]
            diffs = differences(subset, col_key, col_names, baselines)
            difference_parts.append(differences_table(diff_title, subset, col_key, col_names,
                                                      baselines, diffs))
        files[f"{table_id}.csv"] = csv_text(table_long_form(
            table_id, names, subset, col_key, col_names, delta, shown, diffs), LONG_FIELDS)
        if dataset == "domainnet":
            gaps.append(paper_gap(title.split(":")[0], table_id, names, col_names, subset, col_key,
                                  shown))
    files["paper_gap.md"] = "\n".join(gaps)
    files["differences.md"] = "\n".join(difference_parts)
    files.update(imitation_figure(main_rows, [n for n in table_rows if n != "weak"]))
    files.update(figure2(main_rows, accuracy_grid(main_rows, "method", "domain"), domains,
                         paper=paper))
    save_together(files, tables_dir, owned=TABLE_FILES)
    print(f"wrote {', '.join(sorted(files))} to {tables_dir}")


TABLE_FILES = ("runs.csv", "table2.md", "table3.md", "table4.md", "table2.csv", "table3.csv",
               "table4.csv", "paper_gap.md", "figure2.csv", "figure2.png", "differences.md",
               "imitation.csv", "imitation.png")  # build_tables owns them


DIFFERENCES_HEAD = """# CPL minus the best baseline and minus the weak model, with 95% intervals

Each cell: the difference of mean accuracy on D'_test in points [95% interval]. The interval is a
paired percentile bootstrap (`bootstrap_difference`, 2,000 replicates, seed 0): each replicate
redraws every seed's D'_test images with replacement, the same draw for both methods, and averages
the difference over the seeds and, for Avg., over the columns. It measures how much the difference
depends on which test images were drawn, given these seeds' models; it does not redraw the models
(seed-to-seed spread is the ± std of the tables). An interval that excludes 0 settles the sign on
these images. The best baseline of a column is the LP or TP method with the highest mean there;
Avg.'s, the one with the highest mean over the columns.
"""


def save_together(files, folder, owned=()):
    """Write {name: str or bytes} into `folder` as a set: every file to a temporary name first,
    then all renamed into place, so a failure replaces none of them; then remove the files of
    `owned` this set does not hold (left by an earlier build, they would be stale)."""
    folder = Path(folder)
    for name in files:  # a link the user made in the tables folder: refused before any write
        refuse_link(folder / name)
    temps = {}
    try:
        for name, data in files.items():
            remove_stale_temps(folder, name)  # of a killed build
            temps[name] = temp_path(folder / name)
            atomic_save(data, temps[name])
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for name, tmp in temps.items():  # each flushed by atomic_save; the folder once after
        os.replace(tmp, folder / name)
    fsync_path(folder)
    for name in set(owned) - set(files):
        if not (folder / name).is_symlink():  # a link is the user's, not an earlier build's
            (folder / name).unlink(missing_ok=True)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png_bytes(fig, plt):
    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


FIGURE2_SERIES = ("train_true_acc", "train_agreement", "test_acc")  # figure2.csv's, per epoch


def curve_value(point, name):
    """A curves row's `name`, in %: `train_true_acc` is `train_acc` in files written before it was
    named for what it measures (the same quantity); None where a file lacks it."""
    value = point.get(name, point.get("train_acc") if name == "train_true_acc" else None)
    return None if value is None else 100 * value


def figure2(rows, grid, domains=DOMAINS, methods=("auxconf-tp", "cpl", "auxconf-lp"), paper=None):
    """Figure 2: per epoch of three methods (mean over seeds, ± std band), on the first of
    `domains` that has curves (clipart for the full grid), beside the weak and ceiling levels
    (their D'_test accuracies, true labels, on both panels as in the paper; the paper's levels
    `paper[("figure2", level, domain)]` in brackets beside ours). Left: the head's own training
    images (hold-train for these methods), accuracy against their true labels (solid) and
    agreement with the labels it trains on, the weak model's argmax (dotted: imitation). Right:
    accuracy on D'_test, true labels.
    Returns {"figure2.csv": text, "figure2.png": bytes} ({} without curves; no png without
    matplotlib)."""
    domain = next((d for d in domains if any(r["domain"] == d and r["curves"] for r in rows)), None)
    if domain is None:
        return {}
    series = []
    for m in methods:
        curves = [r["curves"] for r in rows if r["domain"] == domain and r["method"] == m]
        for epoch in range(min(map(len, curves), default=0)):
            pts = [c[epoch] for c in curves]
            row = {"domain": domain, "method": m, "epoch": pts[0]["epoch"], "step": pts[0]["step"],
                   "seeds": len(pts)}
            for name in FIGURE2_SERIES:
                values = [curve_value(p, name) for p in pts]
                if None not in values:  # an older file has no train_agreement: left empty
                    row[name], row[name.replace("_acc", "") + "_std"] = mean_std(values)
            series.append(row)
    if not series:  # none of `methods` has curves here: no empty figure
        return {}
    fields = ["domain", "method", "epoch", "step", "seeds"] + [
        f for name in FIGURE2_SERIES for f in (name, name.replace("_acc", "") + "_std")]
    files = {"figure2.csv": csv_text(series, fields)}
    plt = pyplot()
    if plt is None:
        return files
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = ((("train_true_acc", "-"), ("train_agreement", ":")), (("test_acc", "-"),))
    for ax, panel in zip(axes, panels):
        for i, m in enumerate(dict.fromkeys(s["method"] for s in series)):  # methods with curves
            for name, style in panel:
                pts = [s for s in series if s["method"] == m and name in s]
                if not pts:
                    continue
                x, y = [s["step"] for s in pts], [s[name] for s in pts]
                sd = [s[name.replace("_acc", "") + "_std"] for s in pts]
                what = {"train_agreement": " agreement with its weak labels"}.get(name, "")
                ax.plot(x, y, ls=style, marker="o", color=f"C{i}", markersize=3 if what else 5,
                        label=f"{m}{what} (n={pts[0]['seeds']})")
                ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                                color=f"C{i}", alpha=0.15, linewidth=0)
        for level in ("weak", "ceiling"):
            if (level, domain) in grid:
                ours = mean_std(grid[(level, domain)])[0]
                ref = (paper or {}).get(("figure2", level, domain))
                ax.axhline(ours, ls="--", color="gray", lw=1)
                ax.annotate(f"{level} on D'_test {ours:.2f}" + (f" [{ref:.2f}]" if ref is not None
                                                                 else ""),
                            (0.99, ours), xycoords=("axes fraction", "data"), ha="right",
                            va="bottom", color="gray", fontsize=8)
        what = ("hold-train accuracy (true labels, solid) and agreement with its training labels "
                "(dotted)" if panel[0][0] == "train_true_acc" else "D'_test accuracy (true labels)")
        ax.set(title=f"{domain}: {what}", xlabel="step", ylabel="%, mean ± std over seeds")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    return {**files, "figure2.png": png_bytes(fig, plt)}


def imitation_figure(rows, methods):
    """Accuracy where the weak model is wrong against agreement with it, one point per method
    (mean over columns and seeds): up is correcting the supervisor, right is copying it.
    Returns {"imitation.csv": text, "imitation.png": bytes} ({} without the keys)."""
    points = []
    for m in methods:
        runs = [r for r in rows if r["method"] == m and r.get("agreement_with_weak") is not None
                and r.get("accuracy_where_weak_wrong") is not None]
        if runs:
            points.append({"method": m, "runs": len(runs),
                           "agreement_with_weak": 100 * sum(r["agreement_with_weak"] for r in runs) / len(runs),
                           "accuracy_where_weak_wrong": 100 * sum(r["accuracy_where_weak_wrong"]
                                                                  for r in runs) / len(runs),
                           "test_accuracy": 100 * sum(r["test_accuracy"] for r in runs) / len(runs)})
    if not points:
        return {}
    files = {"imitation.csv": csv_text(points, ["method", "runs", "agreement_with_weak",
                                                "accuracy_where_weak_wrong", "test_accuracy"])}
    plt = pyplot()
    if plt is None:
        return files
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        ax.scatter(p["agreement_with_weak"], p["accuracy_where_weak_wrong"],
                   color="C3" if p["method"].startswith("cpl") else "C0")
        ax.annotate(p["method"], (p["agreement_with_weak"], p["accuracy_where_weak_wrong"]),
                    textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set(xlabel="agreement with the weak model on D'_test (%)",
           ylabel="accuracy where the weak model is wrong (%)",
           title="What the student copies from its supervisor (mean over runs)")
    ax.title.set_fontsize(10)
    return {**files, "imitation.png": png_bytes(fig, plt)}


def summary_box(out_dir, domain, seed, methods, settings=None, results=None):
    """A box of weak, `methods` and ceiling accuracy on D'_test (with PGR), from the command's own
    `results` ({method: results}) and whichever results.json exist for the rest of this domain and
    seed and, given `settings` (run_settings' dict), were made with them; a line under the box
    names the runs left out and why."""
    acc, left_out, found = {}, [], []
    for m in ["weak", *[m for m in methods if m not in ("weak", "ceiling")], "ceiling"]:
        path = result_path(out_dir, domain, m, seed)
        r = (results or {}).get(m) or (read_result(path, "left out of the box") if path.exists()
                                       else None)
        if r is not None and settings is not None and not same_settings(r.get("settings"),
                                                                        settings, m):
            left_out.append(f"{m} ({describe_difference(r.get('settings'), settings, method=m)})")
        elif r is not None:
            acc[m] = r["test_accuracy"]
            found.append({**r, "column": domain})
    rows = [f"{domain}, seed {seed}: accuracy on D'_test (%), PGR"]
    for m, a in acc.items():
        gap = m not in ("weak", "ceiling") and {"weak", "ceiling"} <= acc.keys()
        ratio = f"{pgr_text(acc['weak'], a, acc['ceiling']):>8}" if gap else ""  # n/a: ceiling <= weak
        rows.append(f"{m:<16}{100 * a:6.2f}" + ratio)
    width = max(map(len, rows))
    note = ([f"left out of the box, made with other settings: {'; '.join(left_out)}"]
            if left_out else [])
    baselines = [m for m in acc if is_baseline(m)]
    diffs = differences(found, "column", [domain], baselines) if "cpl" in acc else {}
    for comparison in ("best baseline", "weak"):
        got = diffs.get((comparison, domain))
        if got:
            who = f" ({got[0]})" if comparison != "weak" else ""
            note.append(f"cpl − {comparison}{who}: {got[1][0]:+.2f} points, 95% interval "
                        f"[{got[1][1]:+.2f}, {got[1][2]:+.2f}] (paired bootstrap over this seed's "
                        f"D'_test images)")
    return "\n".join(["+" + "-" * (width + 2) + "+"] + [f"| {r:<{width}} |" for r in rows]
                     + ["+" + "-" * (width + 2) + "+"] + note)


def split_count_note(domain, n_train, n_test, num_classes, paper=PAPER):
    """One line when a DomainNet domain (345 classes) lists other counts than the paper's Table 1
    (`paper[("table1", domain, "#train" / "#test")]`), else None; the run goes on either way."""
    ref = (paper.get(("table1", domain, "#train")), paper.get(("table1", domain, "#test")))
    if num_classes != 345 or None in ref or ref == (n_train, n_test):
        return None
    return (f"note: {domain}_train.txt / {domain}_test.txt list {n_train} / {n_test} images, the "
            f"paper's Table 1 (DomainNet cleaned) {ref[0]} / {ref[1]}; an uncleaned download is "
            f"the usual cause; going on")
