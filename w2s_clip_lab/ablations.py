"""Faithfulness ablation for w2s_clip: how much each choice the paper makes (or leaves to the
Hugging Face Trainer) moves the result, one flag changed at a time from the paper's defaults.

`make ablations` (DomainNet, GPU) and `make demo-ablations` (synthetic data, CPU) run
`w2s_clip.py` once per alternative into <out-dir>/<alternative>/ and then this file, which builds
the table from the results.json files alone:

    python -m w2s_clip_lab.ablations --out-dir runs/ablations --output results/ablations.md
"""
import argparse
import json
import sys
from pathlib import Path

import w2s_clip
from w2s_clip_lab import checks, files, report, store

# The flags of the paper's letter and their alternatives (docs/deviations.md), in the order the
# table lists them: flag -> value. Any other changed flag is a variant too, listed after these.
ALTERNATIVES = {"cpl_logit_scale": 100.0,      # Eq. 3: cos; CLIP's 100 * cos
                "prototype_norm": "unit",      # Algorithm 1: raw text embeddings; unit norm
                "lp_input": "normalized",      # Eq. 1: W f(x) + b; on f(x) / |f(x)|
                "lr_schedule": "cosine",       # HF Trainer: linear decay; cosine
                "max_grad_norm": 0.0,          # HF Trainer: clip at 1.0; no clipping
                "select_by": "agreement",      # HF Trainer: lowest eval loss; weak-label agreement
                "select_from": "start-and-epochs",  # HF Trainer: epochs only; the start too
                "tune": "none",                # Section 5 step 4: tuned on hold-val; fixed flags
                "tune_by": "weak-kl",          # tuning by weak-label agreement; by KL to p^w
                "ceiling_data": "hold-train",  # Section 5 step 5: D_hold; hold-train only
                "cpl_kl": "printed"}           # Eq. 5's summand KL(p^w || p^s); as printed


# Settings that say what was run on, not how, and flags that never change a result (in the
# "config" of older files without settings): never a variant.
NOT_VARIANTS = ("data_root", "splits", "clip", "clip_model", "clip_pretrained", "device", "workers",
                "domain") + store.RUN_FLAGS


def flag_text(name, value):
    """`--name value` as typed (lists space-separated)."""
    shown = " ".join(map(str, value)) if isinstance(value, list) else value
    return f"--{name.replace('_', '-')} {shown}"


def reference_settings(settings_list, defaults=None):
    """The settings every variant is named against. Among the settings in which the runs differ
    (not NOT_VARIANTS), a run at the paper's values (`defaults`; a setting a file lacks counts at
    its default) is the reference whenever one exists. Only when every run differs from them is
    it, per setting, the value most runs have (a tie goes to the default, then to the first value
    in sorted order).

    Args:
        settings_list: one dict per run (run_settings' dict, or an older file's config).
        defaults: the paper's defaults, JSON-like (vars(w2s_clip.parse_args([])) through JSON).
    """
    defaults = defaults or {}
    text = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    names = sorted({k for s in settings_list for k in s} - set(NOT_VARIANTS))
    value = lambda s, name: s.get(name, defaults.get(name))  # noqa: E731
    varying = [n for n in names if len({text(value(s, n)) for s in settings_list}) > 1]
    at_paper = [s for s in settings_list if all(text(value(s, n)) == text(defaults.get(n))
                                                for n in varying if n in defaults)]
    if at_paper and any(n in defaults for n in varying):
        return {n: value(at_paper[0], n) for n in names}
    reference = {}
    for name in names:
        values = [text(value(s, name)) for s in settings_list]
        top = max(map(values.count, values))
        tied = sorted(v for v in set(values) if values.count(v) == top)
        reference[name] = json.loads(text(defaults.get(name)) if text(defaults.get(name)) in tied
                                     else tied[0])
    return reference


def variant_of(settings, reference, ignore=NOT_VARIANTS, defaults=None):
    """The label of a run's variant: the `--flag value` of every setting (any flag) in which
    `settings` differs from `reference`, or "" when none does; a setting either lacks counts at
    its value in `defaults` (a file older than the flag, or one the settings leave out)."""
    get = lambda s, k: s.get(k, (defaults or {}).get(k))  # noqa: E731
    names = sorted(settings.keys() | reference.keys())
    return ", ".join(flag_text(k, get(settings, k)) for k in names
                     if k not in ignore and get(settings, k) != get(reference, k))


def ablation_table(out_dir, defaults=None):
    """Markdown: per domain, rows = variants (the reference first), columns = methods; each cell
    is the D'_test accuracy (%) mean ± std over seeds and, for a variant, its difference from the
    reference cell. Runs are read with w2s_clip's results reader (bad files are named and skipped);
    the reference is the run at the paper's defaults where one exists (`reference_settings`), and
    every other run is a row of its own, named by each flag in which it differs (any flag).

    Args:
        out_dir: folder searched for results.json files (any depth).
        defaults: the paper's defaults; default vars(w2s_clip.parse_args([])). The reference row
            is "paper defaults" when it equals them, else "reference" with a line saying how it
            differs.
    Returns:
        the markdown text (str); raises w2s_clip.UserError when there is no result.
    """
    defaults = json.loads(json.dumps(defaults or vars(w2s_clip.parse_args([])), default=str))
    defaults.pop("precision", None)  # "auto" is resolved in each file: never "at the default"
    rows = report.load_results(out_dir)
    if not rows:
        raise w2s_clip.UserError(f"no readable results.json under {out_dir}; run `make ablations` "
                                 f"first")
    settings = [r["settings"] if isinstance(r["settings"], dict) else r["config"] for r in rows]
    reference = reference_settings(settings, defaults)
    shared = [k for k in defaults if k in reference]
    off_paper = variant_of({k: reference[k] for k in shared}, {k: defaults[k] for k in shared})
    ref_name = "reference" if off_paper else "paper defaults"
    acc = {}  # (domain, variant, method) -> [accuracy in % per seed]
    for r, s in zip(rows, settings):
        key = (r["domain"], variant_of(s, reference, defaults=defaults) or ref_name, r["method"])
        acc.setdefault(key, []).append(100 * r["test_accuracy"])
    stats = {key: report.mean_std(v) for key, v in acc.items()}
    order = [ref_name] + [flag_text(f, v) for f, v in ALTERNATIVES.items()]
    lines = ["# Faithfulness ablation: accuracy (%) on D'_test, one flag changed at a time", ""]
    if off_paper:
        lines += [f"reference: the paper's defaults but {off_paper}", ""]
    domains = sorted({k[0] for k in acc}, key=lambda d: (d not in w2s_clip.DOMAINS, d))
    for domain in domains:
        variants = {k[1] for k in acc if k[0] == domain}
        variants = [v for v in order if v in variants] + sorted(variants - set(order))
        ran = {k[2] for k in acc if k[0] == domain}
        methods = [m for m in dict.fromkeys(report.TABLE2_ROWS + w2s_clip.METHODS) if m in ran]
        methods += sorted(ran - set(methods))  # Table 2's order, then e.g. "cpl (ensemble init)"
        lines += [f"### {domain}", "", "| variant | " + " | ".join(methods) + " |",
                  "|" + "---|" * (len(methods) + 1)]
        for v in variants:
            cells = []
            for m in methods:
                if (domain, v, m) not in stats:
                    cells.append("—")
                    continue
                mean, std = stats[(domain, v, m)]
                base = stats.get((domain, ref_name, m))
                diff = round(mean - base[0], 2) + 0.0 if base else None  # + 0.0: no "-0.00"
                delta = f" ({diff:+.2f})" if base and v != ref_name else ""
                cells.append(f"{mean:.2f} ± {std:.2f}{delta}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/ablations", help="results of the ablation runs")
    p.add_argument("--output", default="results/ablations.md", help="markdown file to write")
    args = p.parse_args(argv)
    try:
        text = ablation_table(args.out_dir)
        checks.check_writable(Path(args.output).parent, "--output")
        files.atomic_save(text, args.output)
    except w2s_clip.UserError as e:
        sys.exit(f"error: {e}")
    print(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
