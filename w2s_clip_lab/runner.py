"""The runner of `python w2s_clip.py`: the paper's protocol (Section 5) for one domain on files.

`w2s_clip.main` parses the flags and hands them to `run`; nothing else imports this module. A run
reads as the protocol: preflight (the device, the data, the checks) -> the runs still to do -> per
seed the weak stage (weak model and its logits, cached) -> CLIP's features (cached, once) -> each
method (`w2s_clip.run_method`) -> its results saved -> a box of the seed's results.
"""
import errno
import os
import sys
import time

import torch

from w2s_clip import METHOD_GROUPS, LinearHead, UserError, protocol_splits, run_method
from w2s_clip_lab.checks import (check_models, check_split_flags, check_writable, choose_device,
                                 cpu_cost_warning, device_line, small_test_note)
from w2s_clip_lab.cpe import cmm_reports, cpe_prototypes, read_class_descriptions
from w2s_clip_lab.datasets import load_domain, write_splits
from w2s_clip_lab.files import remove_stale_temps
from w2s_clip_lab.miniature import make_demo
from w2s_clip_lab.report import build_tables, split_count_note, summary_box
from w2s_clip_lab.store import (check_images_once, epochs_log, feature_stage, pending_runs,
                                result_path, run_settings, save_run, settings_key, weak_stage)


def run(args):
    """What `python w2s_clip.py` does with its parsed flags: --make-demo, --build-tables or one
    domain's runs. A UserError becomes one line on stderr and exit status 1."""
    try:
        if args.make_demo:
            make_demo(args.make_demo, layout="folder")
        elif args.build_tables:
            build_tables(args.out_dir, args.tables_dir)
        else:
            run_experiment(args)
    except UserError as e:  # also re-raised from data-loader workers, with their traceback
        msg = str(e).strip().splitlines()[-1]
        sys.exit("error: " + msg.split("UserError: ", 1)[-1])
    except KeyboardInterrupt:  # finished runs and caches are complete files; the rest is redone
        print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:  # a full disk outside atomic_save (a table, a stamp file)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        where = e.filename or (args.tables_dir if args.build_tables else args.make_demo
                               or f"{args.out_dir} or {args.cache_dir}")
        what = ("a file-size limit (ulimit -f, a quota) stopped a write on" if e.errno == errno.EFBIG
                else "no space left on")
        sys.exit(f"error: {what} {where}; free some space and run the command again")


def run_experiment(args):
    """The paper's protocol for one domain (Section 5): for each seed the splits (step 0), the weak
    model and its logits (steps 1-2), then every requested method (steps 3-5) on CLIP features
    computed once; each result saved as it finishes, then a box of the seed's results."""
    methods = list(dict.fromkeys(m for name in args.method for m in METHOD_GROUPS.get(name, [name])))
    run = preflight(args)
    todo = pending_runs(args, methods, run["settings"])  # finished runs are kept (resumed)
    if not any(todo.values()):
        for seed in args.seeds:  # what they hold, as the run that made them printed it
            print(summary_box(args.out_dir, args.domain, seed, methods, run["settings"]))
        print(f"all runs exist under {args.out_dir}/{args.domain}; --force recomputes them")
        return
    data = run["data"]
    data["images"] = check_images_once(args.data_root, data["train_paths"] + data["test_paths"],
                                       args.cache_dir, args.domain)
    strong = None
    for seed in (seed for seed, todo_methods in todo.items() if todo_methods):
        splits = protocol_splits(len(data["test_labels"]), seed)
        weak = weak_stage_of(args, run, seed)  # (logits [n_test, k], training history)
        if strong is None and set(todo[seed]) - {"weak"}:
            strong = {**feature_stage(args, data, run["device"], run["precision"], run["settings"]),
                      "descriptions": run["descriptions"]}
        if strong is not None and args.prototype_init == "cpe":
            weigh_cpe(strong, args, data["classnames"], splits, todo[seed])
        results = {method: run_and_save(method, seed, args, run, splits, weak, strong)
                   for method in todo[seed]}
        print(summary_box(args.out_dir, args.domain, seed, methods, run["settings"], results))


def preflight(args):
    """Everything a run of one domain checks and prints before any work: the device line, the
    data (split files written first for another --dataset), notes on its size, the models, the
    folders and the class descriptions. Stops with one line (UserError) on the first problem.

    Returns:
        dict: device, precision, hardware (`hardware_report`), data (`load_domain`), descriptions,
        settings (`run_settings`: what a result depends on).
    """
    check_split_flags(args)
    device, precision, hardware = choose_device(args.device, args.precision)
    print(device_line(hardware), flush=True)
    split_root = None
    if args.dataset != "domainnet":  # another layout: DomainNet-format split files written first
        check_writable(args.out_dir, "--out-dir")
        check_writable(args.cache_dir, "--cache-dir")
        split_root = os.path.join(args.out_dir, "splits", args.dataset)
        skipped, first = write_splits(
            args.dataset, args.data_root, args.domain, split_root, args.split_share,
            args.split_seed, check=lambda root, paths: check_images_once(root, paths,
                                                                         args.cache_dir, args.domain))
        if skipped:
            print(f"note: skipped {skipped} files that are not images by their extension, "
                  f"e.g. {first}", flush=True)
    data = load_domain(args.data_root, args.domain, split_root)
    n_train, n_test = len(data["train_labels"]), len(data["test_labels"])
    warning = args.device is None and device == "cpu" and cpu_cost_warning(
        n_train, n_test, len(args.seeds), args.weak_epochs)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    note = args.dataset == "domainnet" and split_count_note(args.domain, n_train, n_test,
                                                             len(data["classnames"]))
    if note:
        print(note, flush=True)
    check_models(args)
    check_writable(args.out_dir, "--out-dir")
    check_writable(args.cache_dir, "--cache-dir")
    remove_stale_temps(args.cache_dir)  # left by a full disk or a killed run
    sizes = {name: len(i) for name, i in protocol_splits(n_test, 0).items()}
    if min(sizes.values()) == 0:
        raise UserError(f"{args.data_root}/{args.domain}_test.txt lists {n_test} images, too few: "
                        f"the splits {sizes} must all be non-empty")
    if args.class_descriptions and args.prototype_init != "cpe":
        raise UserError("--class-descriptions enriches CPE's ensemble: add --prototype-init cpe")
    descriptions = None
    if args.class_descriptions:
        descriptions = read_class_descriptions(args.class_descriptions, data["classnames"])
    note = small_test_note(sizes["test"])
    if note:
        print(note, flush=True)
    return {"device": device, "precision": precision, "hardware": hardware, "data": data,
            "descriptions": descriptions,
            "settings": run_settings(args, data, device, precision)}


def weak_stage_of(args, run, seed):
    """Steps 1-2 for one seed (`store.weak_stage`: cached); a diverging weak model is one line."""
    try:
        return weak_stage(args, run["data"], seed, run["device"], run["precision"], run["settings"])
    except FloatingPointError as e:
        raise UserError(f"{args.domain} seed {seed} weak: {e}; lower --weak-lr (now "
                        f"{args.weak_lr:g})") from None


def weigh_cpe(strong, args, classnames, splits, methods):
    """--prototype-init cpe: this seed's starting prototypes, CPE's template weights found on its
    hold-train images (no true label), put in `strong` for `w2s_clip.zero_shot_prototypes`; only
    when a method of the seed starts from them (zero-shot, cpl, the ceiling's CPL head)."""
    strong.pop("prototypes", None)
    strong.pop("cpe", None)
    if set(methods) & {"zero-shot", "cpl", "ceiling"}:
        strong["prototypes"], strong["cpe"] = cpe_prototypes(
            strong["clip"], strong["tokenizer"], classnames, strong["feats"][splits["hold_train"]],
            args.cpe_k, strong["descriptions"], args.prototype_norm == "unit", cache=strong)


def cmm_of(strong, data, splits, weak_logits):
    """`run_method`'s `on_head`: the worst classes' margins (CMM, `cpe.cmm_reports`) of every
    weak-to-strong and zero-shot head with class embeddings (not LP, not the ceiling)."""
    te = splits["test"]

    def report(method, head):
        if method == "ceiling" or isinstance(head, LinearHead):
            return {}
        zero_shot = strong["prototypes"] if method == "cpl" else None  # where CPL started
        return cmm_reports(head, strong["feats"][te], data["test_labels"][te],
                           weak_logits[te].argmax(-1), data["classnames"], zero_shot)
    return report


def run_and_save(method, seed, args, run, splits, weak, strong):
    """One method on one seed (`run_method`), its epochs logged as training goes, its results,
    head and log saved together (`save_run`) with what made them; returns the results."""
    cuda = torch.device(run["device"]).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run["device"])
    start, path, data = time.time(), result_path(args.out_dir, args.domain, method, seed), run["data"]
    try:
        with epochs_log(path) as on_epoch:
            result = run_method(method, args, data, splits, weak[0], strong, seed, on_epoch,
                                on_head=strong and cmm_of(strong, data, splits, weak[0]))
    except FloatingPointError as e:
        raise UserError(f"{args.domain} seed {seed} {method}: {e}; lower --lr (now {args.lr:g}) or "
                        f"check --tau-grid, --cpl-logit-scale, --kd-temperature-grid") from None
    for warning in result.get("warnings", []):
        print(f"warning: {args.domain} seed {seed} {method}: {warning}", file=sys.stderr, flush=True)
    head = result.pop("_head", None)
    if method == "weak":
        result["weak_training"] = weak[1]  # per epoch; None from an older cache
    result.update(domain=args.domain, method=method, seed=seed, classnames=data["classnames"],
                  hardware=run["hardware"], n_weak_train=len(data["train_labels"]),
                  **{f"n_{s}": len(i) for s, i in splits.items()}, seconds=time.time() - start,
                  settings=run["settings"], settings_key=settings_key(run["settings"]),
                  config=vars(args))
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(run["device"]) / 2**30
    save_run(path, result, head, run["settings"], args.force)
    tuned = "".join(f", {name} {value:g}" for name, value in result["tuned"].items())
    print(f"{args.domain} seed {seed} {method}: {100 * result['test_accuracy']:.2f}% on D'_test in "
          f"{result['seconds']:.1f} s{tuned} -> {path}", flush=True)
    return result
