"""What the runner keeps on disk: decoded-image caches, the cached stages of the protocol (weak
model and logits, CLIP features), each run's settings, and the results.json files with their one
reader; every file written through files.py (atomic, locked, keyed by what made it). A damaged
cache file is recomputed; a result is written whole or not at all.
"""
import contextlib
import csv
import errno
import functools
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from w2s_clip import (HYPERPARAMETERS, LOSSES, METHOD_HEAD_LOSS, UserError, encode_images,
                      load_clip, parse_args, predict_logits, progress, set_seed, train_weak_model)
from w2s_clip_lab.checks import check_images, one_line
from w2s_clip_lab.datasets import ImageList, decode_image, file_digest, make_loader
from w2s_clip_lab.files import (atomic_save, cache_key, cached, file_lock, load_cache, log_computed,
                                refuse_link, remove_stale_temps, temp_path)
from w2s_clip_lab.hf import load_weak_model


# ------------------------------------------------------------------------------------------------
# Decoded images kept: each image decoded once for the weak model's evaluation (and training)
# ------------------------------------------------------------------------------------------------
def image_stats_digest(root, paths, workers=16):
    """A digest of each listed image's size and modification time (os.stat, threaded; -1 for a
    missing file), so that a cache notices images replaced under the same paths."""
    def stat(rel):
        try:
            st = os.stat(os.path.join(root, rel))
            return f"{st.st_size} {st.st_mtime_ns}\n"
        except OSError:
            return "-1 -1\n"
    h = hashlib.sha1()
    with ThreadPoolExecutor(workers) as pool:
        for line in pool.map(stat, paths, chunksize=1024):
            h.update(line.encode())
    return h.hexdigest()[:16]


def check_images_once(root, paths, cache_dir, domain):
    """`check_images` once per data folder: a stamp file in `cache_dir`, keyed by the real root,
    the listed paths and each image's size and time, records that they passed. Returns the
    images' `image_stats_digest` (part of the cache keys)."""
    images = image_stats_digest(root, paths)
    key = cache_key(root=os.path.realpath(root), images=images,
                    paths=hashlib.sha1("\n".join(paths).encode()).hexdigest())
    stamp = Path(cache_dir) / f"images-checked-{domain}-{key}"
    if not stamp.exists():
        check_images(root, paths)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    return images


class PixelCache:
    """Images kept decoded: uint8 [h, w, 3] arrays back to back in `<stem>.u8`, with an index
    `<stem>.idx.pt` of (offset, h, w) rows. Reading one is a copy, not a decode. The file is
    memory-mapped on first use, so each data-loader worker maps it instead of receiving a copy.
    `build_pixel_cache` writes it."""

    def __init__(self, stem):
        self.stem, self.index, self.flat = str(stem), None, None

    def __len__(self):
        return len(self.load_index())

    def load_index(self):
        if self.index is None:
            self.index = torch.load(f"{self.stem}.idx.pt", weights_only=True).tolist()
        return self.index

    def __getitem__(self, i):
        import numpy as np
        if self.flat is None:
            self.flat = np.memmap(f"{self.stem}.u8", dtype=np.uint8, mode="r")
        offset, h, w = self.load_index()[i]
        return Image.fromarray(np.array(self.flat[offset:offset + h * w * 3]).reshape(h, w, 3))

    def valid(self, n):
        """True if both files exist and hold n images that fill the data file exactly."""
        try:
            index = torch.load(f"{self.stem}.idx.pt", weights_only=True)
            size = os.path.getsize(f"{self.stem}.u8")
        except Exception:  # missing, truncated or damaged: derived data, rebuilt
            return False
        if not (isinstance(index, torch.Tensor) and index.shape == (n, 3)):
            return False
        ends = index[:, 0] + index[:, 1] * index[:, 2] * 3  # each image's end: the next's offset
        return (int(ends[-1]) if n else 0) == size and bool((index[1:, 0] == ends[:-1]).all())


class PixelSource(Dataset):
    """Image i of `paths` decoded and passed through `prepare` (PIL -> PIL), as a uint8 array."""

    def __init__(self, root, paths, prepare):
        self.root, self.paths, self.prepare = root, paths, prepare

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import numpy as np
        return np.asarray(self.prepare(decode_image(os.path.join(self.root, self.paths[i]))))


def build_pixel_cache(stem, root, paths, prepare, out_size, workers=0, force=False):
    """A `PixelCache` of the images `root/paths`, each decoded once and passed through `prepare`
    (PIL -> PIL of size `out_size(w, h)`, from the file's header): built under a lock, written to
    a temporary file renamed into place, reused when it exists and is whole (else rebuilt).

    Used for the weak model's evaluation transform up to its crop (`eval_pixel_steps`, exact) and,
    opt-in, for its training images at a short side of `--train-image-cache` pixels.
    """
    cache = PixelCache(stem)
    refuse_link(f"{stem}.u8")
    with file_lock(f"{stem}.u8"):
        if cache.valid(len(paths)) and not force:
            return cache
        if os.path.exists(f"{stem}.u8") or os.path.exists(f"{stem}.idx.pt"):
            print(f"warning: cache file {stem}.u8 is incomplete or damaged; rebuilding it",
                  file=sys.stderr, flush=True)

        def header_size(rel):
            with Image.open(os.path.join(root, rel)) as im:
                return out_size(*im.size)
        with ThreadPoolExecutor(16) as pool:
            sizes = list(pool.map(header_size, paths, chunksize=256))  # (w, h) after prepare
        lengths = torch.tensor([w * h * 3 for w, h in sizes], dtype=torch.long)
        index = torch.stack([torch.cumsum(lengths, 0) - lengths, torch.tensor([h for _, h in sizes]),
                             torch.tensor([w for w, _ in sizes])], dim=1)
        Path(f"{stem}.idx.pt").unlink(missing_ok=True)  # no old index beside a new data file
        tmp = temp_path(f"{stem}.u8")
        remove_stale_temps(tmp.parent, f"{Path(stem).name}.u8")
        loader = DataLoader(PixelSource(root, paths, prepare), batch_size=64, num_workers=workers,
                            collate_fn=list)
        try:
            with open(tmp, "wb") as f:  # the images back to back, in order: offsets as indexed
                i = 0
                for batch in progress(loader, "decoding images once"):
                    for a in batch:
                        if a.shape != (int(index[i, 1]), int(index[i, 2]), 3):
                            raise UserError(f"image {paths[i]} is {a.shape[1]}x{a.shape[0]} after "
                                            f"the transform, not the {int(index[i, 2])}x"
                                            f"{int(index[i, 1])} its header gave; pass "
                                            f"--no-eval-image-cache or --train-image-cache 0")
                        f.write(a.tobytes())
                        i += 1
            os.replace(tmp, f"{stem}.u8")
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"no space left on {tmp.parent} (writing {Path(stem).name}.u8); "
                                f"free some space, point --cache-dir elsewhere or pass "
                                f"--no-eval-image-cache") from None
            if isinstance(e, OSError) and e.filename is None:  # a write (EFBIG: ulimit -f, quota)
                raise UserError(f"cannot write {Path(stem).name}.u8 in {tmp.parent} "
                                f"({e.strerror or e}); point --cache-dir elsewhere or pass "
                                f"--no-eval-image-cache") from None
            raise
        atomic_save(index, f"{stem}.idx.pt")  # written last: its presence means a whole file
        log_computed(f"{stem}.u8")
    return PixelCache(stem)


def eval_pixel_steps(transform):
    """(steps up to the tensor conversion, the rest) of an evaluation Compose that center-crops
    (timm's and torchvision's: resize, crop, then ToTensor / timm's MaybeToTensor, normalise), so the
    first part's uint8 output can be kept and the rest applied to it bit for bit; None for any
    other transform (a Hugging Face processor)."""
    from torchvision import transforms as T
    steps = getattr(transform, "transforms", None)
    if not steps:
        return None
    cut = next((i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor")),
               None)
    crops = [t for t in steps[:cut or 0] if isinstance(t, T.CenterCrop)]
    if not cut or not crops:
        return None
    return T.Compose(steps[:cut]), T.Compose(steps[cut:]), tuple(crops[-1].size)


def short_side(size):
    """The `prepare` and `out_size` of a cache at short side `size` (PIL bicubic, never enlarged)."""
    def out_size(w, h):
        scale = size / min(w, h)
        return (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))

    def prepare(image):
        return image.resize(out_size(*image.size), Image.BICUBIC)
    return prepare, out_size


# ------------------------------------------------------------------------------------------------
# The cached stages of the protocol: the weak model and its logits (steps 1-2), CLIP's features
# ------------------------------------------------------------------------------------------------
def weak_stage(args, data, seed, device, precision, settings):
    """Steps 1-2: the weak model fine-tuned on D_train, then its logits on all of D_test, [n, k].

    Both are cached under a key of the run's weak-stage settings (`method_settings("weak",
    settings)`: model, training flags, data, device type, precision; not the worker count, as
    augmentation is seeded per sample), the seed and each image's size and time. A cache file
    that cannot be loaded is recomputed.
    Returns:
        (logits [n, k], history: the weak training's per-epoch rows, or None when the model came
        from a cache without them).
    """
    k, root = len(data["classnames"]), os.path.realpath(args.data_root)
    key = cache_key(**method_settings("weak", settings), k=k, seed=seed, images=data.get("images"))
    safe_name = args.weak_model.replace(":", "-").replace("/", "-")  # hf:<org>/<name> in one file name
    cache_dir = Path(args.cache_dir)
    stem = cache_dir / f"weak-{args.domain}-{safe_name}-seed{seed}-{key}"
    data_key = cache_key(root=root, splits=data["digest"], images=data.get("images"))
    history_path = Path(f"{stem}-history.json")
    history = load_cache(history_path) if history_path.exists() and not args.force else None
    logits = load_cache(f"{stem}-logits.pt") if (os.path.exists(f"{stem}-logits.pt")
                                                 and not args.force) else None
    if logits is not None:
        return logits, history
    with file_lock(f"{stem}-logits.pt"):  # one process computes them, a concurrent one waits
        logits = (load_cache(f"{stem}-logits.pt") if os.path.exists(f"{stem}-logits.pt")
                  and not args.force else None)
        if logits is not None:
            return logits, load_cache(history_path) if history_path.exists() else None
        return train_and_label(args, data, seed, device, precision, stem, data_key)


def train_and_label(args, data, seed, device, precision, stem, data_key):
    """weak_stage's work: train (or load) the weak model, then label all of D_test."""
    k, root, cache_dir = len(data["classnames"]), os.path.realpath(args.data_root), Path(args.cache_dir)
    history, history_path = None, Path(f"{stem}-history.json")
    set_seed(seed)
    model, train_tf, eval_tf = load_weak_model(args.weak_model, k, args.weak_pretrained)

    def train():
        nonlocal history
        history = []
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the weak stage's own peak
        pixels = None
        if args.train_image_cache:  # decoded once per domain, shared by seeds and weak models
            prepare, out_size = short_side(args.train_image_cache)
            pixel_key = cache_key(data=data_key, short_side=args.train_image_cache)
            pixels = build_pixel_cache(cache_dir / f"pixels-{args.domain}-train-{pixel_key}", root,
                                       data["train_paths"], prepare, out_size, args.workers)
        loader = make_loader(ImageList(root, data["train_paths"], data["train_labels"], train_tf,
                                       seed=seed, pixels=pixels), args.batch_size, device,
                             args.workers, shuffle=True, seed=seed)
        state = train_weak_model(model, loader, args.weak_epochs, args.weak_lr, args.warmup_ratio,
                                 device, args.weight_decay, args.lr_schedule, args.max_grad_norm,
                                 precision, history, args.weak_micro_batch).cpu().state_dict()
        atomic_save(history, history_path)
        return state

    model.load_state_dict(cached(f"{stem}-model.pt", train, args.force))
    pixels, steps = None, eval_pixel_steps(eval_tf) if args.eval_image_cache else None
    if steps:  # up to the crop once per domain and transform; each seed reads it
        pre, eval_tf, (h, w) = steps
        pixel_key = cache_key(data=data_key, transform=repr(pre))
        pixels = build_pixel_cache(cache_dir / f"pixels-{args.domain}-eval-{pixel_key}", root,
                                   data["test_paths"], pre, lambda *_: (w, h), args.workers)
    loader = make_loader(ImageList(root, data["test_paths"], data["test_labels"], eval_tf,
                                   pixels=pixels), args.batch_size, device, args.workers)
    logits = predict_logits(model, loader, device)
    atomic_save(logits, f"{stem}-logits.pt")
    log_computed(f"{stem}-logits.pt")
    return logits, history if history is not None else (
        load_cache(history_path) if history_path.exists() else None)


def clip_identity(model_name, pretrained):
    """(model, weights) as cache keys use them: a config file's or a checkpoint's digest, else the
    open_clip name and tag."""
    pretrained = None if pretrained.lower() == "none" else pretrained
    model_id = file_digest(model_name) if model_name.endswith(".json") else model_name
    return model_id, file_digest(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained


def feature_stage(args, data, device, precision, settings):
    """{"clip": the CLIP model, "tokenizer", "feats": its image features of all of D_test [n, d] on
    `device`}; the features are cached under a key of the run's CLIP settings (CLIP_SETTINGS: model
    and weights by content, data, device type, precision), the transform and the images."""
    pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    clip_model, preprocess, tokenizer = load_clip(args.clip_model, pretrained, device)
    root = os.path.realpath(args.data_root)
    key = cache_key(**{k: settings[k] for k in CLIP_SETTINGS}, transform=repr(preprocess),
                    images=data.get("images"))
    path = Path(args.cache_dir) / f"clip-{args.domain}-{Path(args.clip_model).stem}-{key}.pt"
    loader = make_loader(ImageList(root, data["test_paths"], data["test_labels"], preprocess),
                         args.batch_size, device, args.workers)
    feats = cached(path, lambda: encode_images(clip_model, loader, device, precision), args.force)
    return {"clip": clip_model, "tokenizer": tokenizer, "feats": feats.to(device)}


# ------------------------------------------------------------------------------------------------
# Settings: what a result depends on, and when an existing one is stale
# ------------------------------------------------------------------------------------------------
RUN_FLAGS = ("seeds", "method", "device", "out_dir", "cache_dir", "force", "workers",
             "eval_image_cache", "build_tables", "tables_dir", "make_demo")  # do not change a result


def run_settings(args, data, device, precision="fp32"):
    """Everything besides the seed and method that shapes a result, as a JSON dict: the flags
    (not --workers: augmentation is seeded per sample), the data's real path and split files, the
    device type and the precision in use, and the CLIP config and checkpoint contents. Paths are
    real paths: a relative and an absolute path to one file are one setting."""
    flags = {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}
    if not flags.get("train_image_cache"):  # off: as before the flag existed
        flags.pop("train_image_cache", None)
    if flags.get("dataset") == "domainnet":  # DomainNet: as before the data-set flags existed
        flags.pop("dataset")
    if args.dataset != "officehome":  # the split flags apply to Office-Home only
        flags.pop("split_share", None)
        flags.pop("split_seed", None)
    if args.prototype_init != "cpe":  # CPE's flags apply to CPE only
        flags.pop("cpe_k", None)
        flags.pop("class_descriptions", None)
    elif args.class_descriptions:  # the file's contents, not its name
        flags["class_descriptions"] = file_digest(args.class_descriptions)
    flags["precision"] = precision  # what "auto" became on this device
    real = lambda path, is_file: os.path.realpath(path) if is_file else path
    if args.weak_model.startswith("hf:") and os.path.isdir(args.weak_model[3:]):  # a local folder
        flags["weak_model"] = "hf:" + os.path.realpath(args.weak_model[3:])
    flags.update(data_root=os.path.realpath(args.data_root), splits=data["digest"],
                 clip_model=real(args.clip_model, args.clip_model.endswith(".json")),
                 clip_pretrained=real(args.clip_pretrained, os.path.isfile(args.clip_pretrained)),
                 device=torch.device(device).type, clip=clip_identity(args.clip_model, args.clip_pretrained))
    return json.loads(json.dumps(flags, default=str))  # as results.json holds it


CLIP_SETTINGS = ("clip", "data_root", "splits", "domain", "device", "precision")  # CLIP's features
WEAK_SETTINGS = ("weak_model", "weak_pretrained", "weak_epochs", "weak_lr", "batch_size",
                 "warmup_ratio", "weight_decay", "lr_schedule", "max_grad_norm", "weak_micro_batch",
                 "train_image_cache", "data_root", "splits", "domain", "dataset", "split_share",
                 "split_seed", "device", "precision")  # all that decides a weak run (weak_stage)


def unused_flags(method):
    """The flags of run_settings that `method`'s result does not depend on: the hyperparameters
    (and grids) of the losses it does not use, the text tower's lr outside cpl-text, the
    ceiling's data outside the ceiling, the tuning flags for zero-shot and the ceiling (nothing
    tuned), and for zero-shot (the head before any step) the head's training flags that the weak
    model does not share."""
    if method in METHOD_HEAD_LOSS:
        kinds, losses = [METHOD_HEAD_LOSS[method][0]], [METHOD_HEAD_LOSS[method][1]]
    else:  # weak: none; zero-shot: CPL's head and loss (its hold-val loss); ceiling: CE
        kinds, losses = {"zero-shot": (["cpl"], ["cpl"]), "ceiling": (["lp", "tp", "cpl"], ["ce"])
                         }.get(method, ([], []))
    used = {h for loss in losses for h in LOSSES[loss][1].values()}
    unused = {h for h in HYPERPARAMETERS if h not in used}
    unused |= {f"{h}_grid" for h in unused}
    if "cpl-text" not in kinds:
        unused |= {"text_lr", "text_lr_grid"}
    if method != "ceiling":
        unused.add("ceiling_data")
    if method in ("zero-shot", "ceiling"):  # nothing tuned: no grid, no tuning criterion
        unused |= {f"{h}_grid" for h in HYPERPARAMETERS} | {"text_lr_grid", "tune", "tune_by"}
    if method == "zero-shot":  # CPL's head before any step: no step size, epoch or choice
        unused |= {"lr", "strong_epochs", "select_by", "select_from"}
    return unused


@functools.lru_cache(maxsize=None)
def _flag_defaults():
    return json.dumps({k: v for k, v in vars(parse_args([])).items() if k not in RUN_FLAGS},
                      default=str)


def filled_settings(settings):
    """`settings` (run_settings' dict) with each flag it lacks (one newer than its file) at its
    default."""
    return {**json.loads(_flag_defaults()), **settings}


def method_settings(method, settings):
    """The settings (run_settings' dict) that a result of `method` depends on: for the weak model
    the weak stage's (WEAK_SETTINGS), for the others all but `unused_flags`; a flag the dict lacks
    (newer than its file) counts at its default. A hash (an older file) is returned as it is."""
    if not isinstance(settings, dict):
        return settings
    filled = filled_settings(settings)
    if method == "weak":
        return {k: v for k, v in filled.items() if k in WEAK_SETTINGS}
    unused = unused_flags(method)
    return {k: v for k, v in filled.items() if k not in unused}


def same_settings(old, new, method):
    """Whether a result made with settings `old` is valid under `new` (both run_settings' dicts)
    for `method`: the settings it depends on agree. An older file's `old` is only a hash of all
    its settings, compared with the hash of all of `new`."""
    if isinstance(old, str):
        return old == settings_key(new)
    key = settings_key(old, method)
    return key is not None and key == settings_key(new, method)


def settings_key(settings, method=None):
    """The hash of a run's settings (run_settings' dict, as results.json holds it), of the part
    `method`'s result depends on if given (`method_settings`); an older results.json holds only
    a hash, a str, which is returned as it is; else None."""
    if isinstance(settings, dict):
        return cache_key(**(method_settings(method, settings) if method else settings))
    return settings if isinstance(settings, str) else None


def describe_difference(old, new, ignore=(), method=None):
    """`name: old -> new` for each setting in which dicts `old` and `new` differ (values cut to
    40 characters), among those `method`'s result depends on if given; for an `old` that is not a
    dict, says it holds only a hash."""
    if not isinstance(old, dict):
        return ("an older results.json that records only a hash of its settings"
                if isinstance(old, str) else "a results.json that records no settings")
    if method:
        old, new = method_settings(method, old), method_settings(method, new)
    cut = lambda v: (str(v)[:37] + "...") if len(str(v)) > 40 else str(v)
    names = sorted(k for k in old.keys() | new.keys() if k not in ignore and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {cut(old.get(k))} -> {cut(new.get(k))}" for k in names)


# ------------------------------------------------------------------------------------------------
# Results: one results.json per (domain, method, seed), written whole; the one reader of them
# ------------------------------------------------------------------------------------------------
def result_path(out_dir, domain, method, seed):
    """Where a run's results.json goes."""
    return Path(out_dir) / domain / method / f"seed{seed}" / "results.json"


RESULT_KEYS = ("domain", "method", "seed", "test_accuracy", "worst10_accuracy", "config")
CURVE_ACCURACIES = ("train_true_acc", "train_agreement", "test_acc",
                    "train_acc")  # per epoch; train_acc: train_true_acc in files before the rename


def result_problems(r):
    """What keeps a parsed results.json from being read by the tables: a list of short reasons
    (missing keys, wrong types, a value out of range; an empty list for a good file)."""
    if not isinstance(r, dict):
        return ["not a JSON object"]
    missing = [k for k in RESULT_KEYS if k not in r]
    if missing:
        return [f"no {', '.join(missing)}"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    problems = [f"{k} is {r[k]!r}, not a fraction in [0, 1]" for k in ("test_accuracy",
                "worst10_accuracy") if not (number(r[k]) and 0 <= r[k] <= 1)]
    if not (isinstance(r["domain"], str) and r["domain"]):
        problems.append(f"domain is {r['domain']!r}")
    if not (isinstance(r["method"], str) and r["method"]):  # any: a loss added later has a row
        problems.append(f"method is {r['method']!r}")
    if not (isinstance(r["seed"], int) and not isinstance(r["seed"], bool) and r["seed"] >= 0):
        problems.append(f"seed is {r['seed']!r}")
    cfg = r["config"]
    if not (isinstance(cfg, dict) and all(isinstance(cfg.get(k), str)
                                          for k in ("weak_model", "clip_model"))):
        problems.append("config lacks the weak_model and clip_model names")
    n = r.get("n_predicted_classes")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        problems.append(f"n_predicted_classes is {n!r}")
    curves = r.get("curves", [])
    if not (isinstance(curves, list) and all(
            isinstance(row, dict) and all(number(row.get(k)) for k in ("epoch", "step"))
            and all(number(row[k]) for k in CURVE_ACCURACIES if k in row)
            for row in curves)):
        problems.append("curves is not a list of per-epoch rows")
    if not isinstance(r.get("settings"), (dict, str, type(None))):
        problems.append("settings is neither an object nor a hash")
    problems += [f"{k} is {r[k]!r}, not a fraction in [0, 1] or null" for k in (
        "agreement_with_weak", "accuracy_where_weak_right", "accuracy_where_weak_wrong")
        if r.get(k) is not None and not (number(r[k]) and 0 <= r[k] <= 1)]
    per_image = [r.get(k) for k in ("d_test_index", "d_test_labels", "predictions")]
    if any(v is not None for v in per_image) and not (
            all(isinstance(v, list) for v in per_image) and len({len(v) for v in per_image}) == 1
            and all(isinstance(x, int) and not isinstance(x, bool) for v in per_image for x in v)):
        problems.append("d_test_index, d_test_labels and predictions are not lists of integers "
                        "of one length")
    return problems


def read_result(path, then="skipped"):
    """A results.json as a dict, or None with a one-line warning naming it, the reason and `then`
    if it cannot be parsed or does not hold what the tables read (`result_problems`)."""
    try:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
        problems = result_problems(r)
        if problems:
            raise ValueError("; ".join(problems))
        return r
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        print(f"warning: {path} cannot be read as a results file ({one_line(e, 200)}); {then}",
              file=sys.stderr, flush=True)
        return None


def result_files(out_dir):
    """Every results.json under `out_dir`, following the symbolic links to folders that the user
    made (`runs/sketch -> /scratch/...`; a link back to a folder above is not followed again),
    each file once, under its path through the fewest links, then the nearest `out_dir`, then by
    name. An unreadable folder is passed over, as os.walk does."""
    found = {}  # real path -> (links, parts, path)
    stack = [(Path(out_dir), frozenset(), 0)]
    while stack:
        folder, above, links = stack.pop()
        real = os.path.realpath(folder)
        if real in above:
            continue
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            link = links + e.is_symlink()
            if e.is_dir():
                stack.append((Path(e.path), above | {real}, link))
            elif e.name == "results.json":
                path = Path(e.path)
                key = (link, len(path.parts), str(path))
                found[os.path.realpath(path)] = min(found.get(os.path.realpath(path), key), key)
    return [Path(p) for _, _, p in sorted(found.values(), key=lambda k: (k[1], k[2]))]


def pending_runs(args, methods, settings):
    """{seed: the methods of `methods` still to run}: a finished results.json made with the same
    `settings` is kept (resumed); one made with other settings stops the command (unless --force)."""
    todo = {}
    for seed in args.seeds:
        todo[seed] = []
        for m in methods:
            path = result_path(args.out_dir, args.domain, m, seed)
            old = read_result(path, "the run is redone") if path.exists() and not args.force else None
            if old is not None:
                if not same_settings(old.get("settings"), settings, m):
                    raise UserError(f"{path} was made with other settings "
                                    f"({describe_difference(old.get('settings'), settings, method=m)}); "
                                    f"pass --force to replace it or use another --out-dir")
                continue
            for name in ("head.pt", "results.json", "epochs.csv"):  # before hours of training
                refuse_link(path.with_name(name))
            todo[seed].append(m)
    return todo


EPOCH_FIELDS = ("head", *(name for name, h in HYPERPARAMETERS.items() if h[1]), "text_lr", "epoch",
                "step", "loss", "val_loss", "val_score", "train_true_acc", "train_agreement",
                "test_acc")  # epochs.csv


@contextlib.contextmanager
def epochs_log(path):
    """A function that appends one row to the epochs.csv of results `path`, as training goes: the
    rows go to a temporary file, removed if the block fails, renamed by `save_run`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, "epochs.csv")  # the log of a run killed earlier
    log_path = temp_path(path.with_name("epochs.csv"))
    try:
        with open(log_path, "w", newline="") as log:
            writer = csv.DictWriter(log, EPOCH_FIELDS, extrasaction="ignore")
            writer.writeheader()

            def write(row):
                try:
                    writer.writerow(row)
                    log.flush()
                except OSError as e:  # a full disk while training: name the log
                    raise UserError(f"cannot write {path.with_name('epochs.csv')} ({e.strerror}); "
                                    f"free some space or point --out-dir elsewhere") from None
            yield write
    except BaseException:  # no log without its results.json
        log_path.unlink(missing_ok=True)
        raise


def save_run(path, result, head, settings, force=False):
    """Write a run's head.pt, results.json and epochs.csv under a lock, so that a concurrent
    command loses nothing: a results.json written meanwhile with other settings is kept (a
    UserError) unless `force`."""
    log_path = temp_path(path.with_name("epochs.csv"))
    with file_lock(path):
        for name in ("head.pt", "results.json", "epochs.csv"):  # all three or none
            try:
                refuse_link(path.with_name(name))
            except UserError:
                log_path.unlink(missing_ok=True)
                raise
        other = read_result(path, "replaced") if path.exists() else None
        if (other is not None and not force
                and not same_settings(other.get("settings"), settings, result["method"])):
            log_path.unlink(missing_ok=True)
            raise UserError(f"{path} was written by another command meanwhile, with other settings "
                            f"({describe_difference(other.get('settings'), settings, method=result['method'])}"
                            f"); kept it: rerun with another --out-dir")
        try:
            if head is not None:  # before results.json: a finished run has its head
                atomic_save(head, path.with_name("head.pt"))
            atomic_save(result, path)
        except BaseException:  # a full disk: no log without its results.json
            log_path.unlink(missing_ok=True)
            raise
        os.replace(log_path, path.with_name("epochs.csv"))  # the log of this result
