"""Faithfulness ablation for w2s_clip: how much each choice the paper makes (or leaves to the
Hugging Face Trainer) moves the result, one flag changed at a time from the paper's defaults.

`make ablations` (DomainNet, GPU) and `make demo-ablations` (synthetic data, CPU) run
`w2s_clip.py` once per alternative into <out-dir>/<alternative>/ and then this file, which builds
the table from the results.json files alone:

    python ablations_w2s_clip.py --out-dir runs/ablations --output results/ablations.md
"""
import argparse
import json
import sys
from pathlib import Path

import w2s_clip

# The flags of the paper's letter and their alternatives (README, deviations): flag -> value.
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


def variant_of(config, defaults, flags=tuple(ALTERNATIVES)):
    """The label of a run's variant: "paper defaults", or the `--flag value` pairs of `flags`
    whose value in `config` (a results.json "config") differs from `defaults` (parse_args([]))."""
    changed = [f"--{f.replace('_', '-')} {config[f]}" for f in flags
               if f in config and config[f] != defaults[f]]
    return ", ".join(changed) or "paper defaults"


def ablation_table(out_dir, defaults=None, flags=tuple(ALTERNATIVES)):
    """Markdown: per domain, rows = variants (paper defaults first), columns = methods; each cell
    is the D'_test accuracy (%) mean ± std over seeds and, for an alternative, its difference from
    the paper-defaults cell.

    Args:
        out_dir: folder searched for results.json files (any depth).
        defaults: the flags' paper defaults; default vars(w2s_clip.parse_args([])).
    Returns:
        the markdown text (str); raises w2s_clip.UserError when there is no result.
    """
    defaults = defaults or vars(w2s_clip.parse_args([]))
    acc = {}  # (domain, variant, method) -> [accuracy in % per seed]
    for path in sorted(Path(out_dir).rglob("results.json")):
        r = json.loads(path.read_text())
        key = (r["domain"], variant_of(r["config"], defaults, flags), r["method"])
        acc.setdefault(key, []).append(100 * r["test_accuracy"])
    if not acc:
        raise w2s_clip.UserError(f"no results.json under {out_dir}; run `make ablations` first")
    stats = {key: w2s_clip.mean_std(v) for key, v in acc.items()}
    order = ["paper defaults"] + [variant_of({f: v}, defaults, flags) for f, v in
                                  ALTERNATIVES.items() if f in flags]
    lines = ["# Faithfulness ablation: accuracy (%) on D'_test, one flag changed at a time", ""]
    for domain in [d for d in w2s_clip.DOMAINS if any(k[0] == d for k in acc)]:
        variants = {k[1] for k in acc if k[0] == domain}
        variants = [v for v in order if v in variants] + sorted(variants - set(order))
        methods = [m for m in dict.fromkeys(w2s_clip.TABLE2_ROWS + w2s_clip.METHODS)  # Table 2's order
                   if any(k[0] == domain and k[2] == m for k in acc)]
        lines += [f"### {domain}", "", "| variant | " + " | ".join(methods) + " |",
                  "|" + "---|" * (len(methods) + 1)]
        for v in variants:
            cells = []
            for m in methods:
                if (domain, v, m) not in stats:
                    cells.append("—")
                    continue
                mean, std = stats[(domain, v, m)]
                base = stats.get((domain, "paper defaults", m))
                diff = round(mean - base[0], 2) + 0.0 if base else None  # + 0.0: no "-0.00"
                delta = f" ({diff:+.2f})" if base and v != "paper defaults" else ""
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
        w2s_clip.check_writable(Path(args.output).parent, "--output")
        w2s_clip.atomic_save(text, args.output)
    except w2s_clip.UserError as e:
        sys.exit(f"error: {e}")
    print(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
