"""The package's command: `python w2s_clip.py`'s protocol with the package's additions.

    python -m w2s_clip_lab.run --dataset folder --data-root my_images --domain photos --method all
    python -m w2s_clip_lab.run --domain clipart --weak-model hf:microsoft/resnet-18 --method lp tp cpl
    python -m w2s_clip_lab.run --domain sketch --method zero-shot cpl --prototype-init cpe
    python -m w2s_clip_lab.run --build-tables --out-dir runs --tables-dir results

The file's flags (their names and defaults), its per-seed loop (`w2s_clip.run_experiment`) and its
results; what this adds goes in through the loop's hooks: other layouts and the thorough preflight
(`data`), its own flags in the settings only off their defaults (`settings`: runs and caches are
shared with the file), Hugging Face weak models (`weak_model`), the pixel caches (`datasets`), CPE
prototypes per seed (`seed`), CMM margins (`on_head`) and a box per seed (`after_seed`).
"""
import argparse
import os
import sys

import w2s_clip
from w2s_clip import LinearHead, UserError
from w2s_clip_lab import checks, datasets, store
from w2s_clip_lab.cpe import cmm_reports, cpe_prototypes, read_class_descriptions
from w2s_clip_lab.hf import load_weak_model
from w2s_clip_lab.miniature import make_demo
from w2s_clip_lab.report import build_tables, split_count_note, summary_box


def build_parser():
    """The file's parser (`w2s_clip.build_parser`) with the package's flags: other layouts, the
    pixel caches, CPE, and the tables and miniature as commands of their own."""
    p = w2s_clip.build_parser()
    p.prog = "python -m w2s_clip_lab.run"
    p._option_string_actions["--prototype-init"].choices = ("single", "ensemble", "cpe")
    p._option_string_actions["--prototype-init"].help += (
        "; cpe: weighted by CPE (Shao et al. 2023: worst-k CMM with pseudo-labels on hold-train)")
    p._option_string_actions["--domain"].help = "the data set's domain (DomainNet: one of its six)"
    p._option_string_actions["--weak-model"].help = (
        "any timm model name, or hf:<Hugging Face id or folder> for a transformers image classifier "
        "(Table 3: hf:microsoft/resnet-18 ... hf:microsoft/cvt-13)")
    lab = p.add_argument_group("w2s_clip_lab: other layouts, image caches, CPE, tables")
    lab.add_argument("--dataset", choices=("domainnet", "officehome", "folder"), default="domainnet",
                     help="layout of --data-root: domainnet (split files), officehome "
                          "(<Domain>/<Class>/<image>, split here) or folder "
                          "(<domain>/{train,test}/<class>/<image>); see w2s_clip_lab/datasets.py")
    lab.add_argument("--split-share", type=w2s_clip.in_range(0, 1), default=0.8,
                     help="officehome only (no official split): share of each class's images in the "
                          "weak model's train split, the rest is D_test (DomainBed's 80/20)")
    lab.add_argument("--split-seed", type=w2s_clip.seed_value, default=0,
                     help="officehome only: seed of that split, the same for every --seeds run")
    lab.add_argument("--train-image-cache", type=non_negative_int, default=0, metavar="PIXELS",
                     help="decode each D_train image once and keep it at this short side (uint8, "
                          "bicubic, never enlarged) for weak training's crops: faster, a slightly "
                          "different augmentation (deviation 22); 0: decode every epoch (paper)")
    lab.add_argument("--eval-image-cache", action=argparse.BooleanOptionalAction, default=True,
                     help="keep the weak model's evaluation images up to their center crop (uint8, "
                          "in --cache-dir) so that each seed's weak logits read them instead of "
                          "decoding again: the same tensors bit for bit (timm models)")
    lab.add_argument("--cpe-k", type=w2s_clip.positive(int), default=10,
                     help="CPE: the k worst classes whose mean CMM weighs a template")
    lab.add_argument("--class-descriptions", metavar="FILE",
                     help="CPE: JSON {class name: [sentences]}, each sentence one more prompt of its "
                          "class (e.g. written by a language model beforehand)")
    lab.add_argument("--hold-train-per-class", type=w2s_clip.positive(int), default=None,
                     metavar="N", help="train every head on at most N hold-train images per class "
                     "(each class's first N in the seed's split order; hold-val, D'_test and the "
                     "weak model unchanged): the images-per-class axis of make demo-regimes")
    lab.add_argument("--weak-input-size", type=w2s_clip.positive(int), default=None, metavar="PIXELS",
                     help="train and evaluate a timm weak model at this input size instead of its "
                          "own (the miniature: 32, its images' size; deviation 26)")
    lab.add_argument("--build-tables", action="store_true",
                     help="only build Tables 2-4 and Figure 2 from the results under --out-dir")
    lab.add_argument("--tables-dir", default="results", help="where --build-tables writes")
    lab.add_argument("--make-demo", metavar="DIR",
                     help="only write a synthetic dataset (--dataset folder) and a tiny CLIP config")
    return p


def non_negative_int(text):
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def preflight(args, device):
    """The `data` hook: everything a run of one domain checks and prints before any work, beyond
    the file's: the split flags, another layout's split files (written first), the identities
    of the listed images, notes on the data's size, the models and checkpoints, the folders,
    the class descriptions, every image's header once per data folder (a stamp in --cache-dir).
    Returns load_domain's dict, with `images` and `descriptions`."""
    checks.check_split_flags(args)
    if args.dataset == "domainnet" and args.domain not in w2s_clip.DOMAINS:
        raise UserError(f"--domain {args.domain}: DomainNet has {', '.join(w2s_clip.DOMAINS)}; "
                        f"another data set needs --dataset officehome or folder")
    split_root = None
    if args.dataset != "domainnet":  # another layout: DomainNet-format split files written first
        checks.check_writable(args.out_dir, "--out-dir")
        checks.check_writable(args.cache_dir, "--cache-dir")
        split_root = os.path.join(args.out_dir, "splits", args.dataset)
        skipped, first = datasets.write_splits(
            args.dataset, args.data_root, args.domain, split_root, args.split_share, args.split_seed,
            check=lambda root, paths: store.check_images_once(root, paths, args.cache_dir, args.domain))
        if skipped:
            print(f"note: skipped {skipped} files that are not images by their extension, "
                  f"e.g. {first}", flush=True)
    data = datasets.load_domain(args.data_root, args.domain, split_root)
    n_train, n_test = len(data["train_labels"]), len(data["test_labels"])
    warning = args.device is None and device == "cpu" and checks.cpu_cost_warning(
        n_train, n_test, len(args.seeds), args.weak_epochs)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    note = args.dataset == "domainnet" and split_count_note(args.domain, n_train, n_test,
                                                             len(data["classnames"]))
    if note:
        print(note, flush=True)
    checks.check_models(args)
    checks.check_writable(args.out_dir, "--out-dir")
    checks.check_writable(args.cache_dir, "--cache-dir")
    store.remove_stale_temps(args.cache_dir)  # left by a full disk or a killed run
    sizes = w2s_clip.split_sizes(n_test, os.path.join(split_root or args.data_root,
                                                      f"{args.domain}_test.txt"))
    if args.class_descriptions and args.prototype_init != "cpe":
        raise UserError("--class-descriptions enriches CPE's ensemble: add --prototype-init cpe")
    descriptions = (read_class_descriptions(args.class_descriptions, data["classnames"])
                    if args.class_descriptions else None)
    note = checks.small_test_note(sizes["test"])
    if note:
        print(note, flush=True)
    images = store.check_images_once(args.data_root, data["train_paths"] + data["test_paths"],
                                     args.cache_dir, args.domain)
    return {**data, "images": images, "descriptions": descriptions}


def first_per_class(indices, labels, n):
    """The first n of `indices` [m] of each class (labels[indices]), in their order [<= m]."""
    seen, keep = {}, []
    for position, c in enumerate(labels[indices].tolist()):
        seen[c] = seen.get(c, 0) + 1
        if seen[c] <= n:
            keep.append(position)
    return indices[keep]


def seed_stage(args, strong, data, splits, methods):
    """The `seed` hook: --hold-train-per-class's hold-train (in place, before any head sees it),
    then CPE's prototypes (`weigh_cpe`)."""
    if args.hold_train_per_class:
        splits["hold_train"] = first_per_class(splits["hold_train"], data["test_labels"],
                                               args.hold_train_per_class)
    weigh_cpe(args, strong, data, splits, methods)


def weigh_cpe(args, strong, data, splits, methods):
    """Part of the `seed` hook: with --prototype-init cpe, this seed's starting prototypes, CPE's
    template weights found on its hold-train images (no true label), put in `strong` for
    `w2s_clip.zero_shot_prototypes`; only when a method of the seed starts from them."""
    if args.prototype_init != "cpe":
        return
    strong.pop("prototypes", None)
    strong.pop("cpe", None)
    if set(methods) & {"zero-shot", "cpl", "ceiling"}:
        strong["prototypes"], strong["cpe"] = cpe_prototypes(
            strong["clip"], strong["tokenizer"], data["classnames"],
            strong["feats"][splits["hold_train"]], args.cpe_k, data["descriptions"],
            args.prototype_norm == "unit", cache=strong)


def cmm_of(strong, data, splits, weak_logits):
    """The `on_head` hook: the worst classes' margins (CMM, `cpe.cmm_reports`) of every
    weak-to-strong and zero-shot head with class embeddings (not LP, not the ceiling)."""
    te = splits["test"]

    def report(method, head):
        if method == "ceiling" or isinstance(head, LinearHead):
            return {}
        zero_shot = strong["prototypes"] if method == "cpl" else None  # where CPL started
        return cmm_reports(head, strong["feats"][te], data["test_labels"][te],
                           weak_logits[te].argmax(-1), data["classnames"], zero_shot)
    return report


def seed_box(args, seed, methods, settings, results):
    """The `after_seed` hook: a box of the seed's results with CPL's paired-bootstrap differences."""
    print(summary_box(args.out_dir, args.domain, seed, methods, settings, results), flush=True)


HOOKS = {**w2s_clip.HOOKS, "data": preflight, "settings": store.run_settings,
         "weak_model": load_weak_model, "datasets": store.cached_datasets, "seed": seed_stage,
         "on_head": cmm_of, "after_seed": seed_box}


def run(args):
    """What the command does with its parsed flags: --make-demo, --build-tables or the protocol."""
    if args.make_demo:
        make_demo(args.make_demo, layout="folder")
    elif args.build_tables:
        build_tables(args.out_dir, args.tables_dir)
    else:
        if args.dataset == "officehome":
            args.domain = args.domain.replace(" ", "_")  # "Real World" is run as Real_World
        size = args.weak_input_size
        w2s_clip.run_experiment(args, {**HOOKS, "weak_model": lambda name, k, pretrained:
                                       load_weak_model(name, k, pretrained, input_size=size)})


def main(argv=None):
    """`w2s_clip.main` with this parser and `run`: the same one-line errors and exit statuses."""
    w2s_clip.main(argv, build_parser(), run)


if __name__ == "__main__":
    main()
