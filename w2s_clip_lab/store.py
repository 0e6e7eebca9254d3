"""What the package adds to the file's caches and results on disk: decoded-image caches (the weak
model's evaluation images, opt-in its training images) as `w2s_clip.weak_stage`'s datasets, a stamp
for images already checked, the settings of the package's own flags, and the thorough reader of
results.json files for the tables. The settings' keys, the cached stages and the results writers
are w2s_clip.py's, re-exported here; a damaged cache is recomputed, a result written whole or not.
"""
import errno
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

import w2s_clip
from w2s_clip import (CLIP_SETTINGS, EPOCH_FIELDS, RUN_FLAGS, WEAK_SETTINGS,  # noqa: F401 (re-exported)
                      UserError, atomic_save, cache_key, check_images, decode_image,
                      describe_difference, epochs_log, feature_stage, file_digest, file_lock,
                      filled_settings, fsync_path, image_stats_digest, log_computed, method_settings,
                      pending_runs, progress, refuse_link, remove_stale_temps, result_path,
                      same_settings, save_run, settings_key, temp_path, unused_flags, weak_stage)
from w2s_clip_lab.checks import one_line


# ------------------------------------------------------------------------------------------------
# Decoded images kept: each image decoded once for the weak model's evaluation (and training)
# ------------------------------------------------------------------------------------------------
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
        atomic_save(b"", stamp)  # flushed, renamed, the folder flushed
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
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, f"{stem}.u8")
            fsync_path(Path(stem).parent)
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
# The weak model's images through the pixel caches (`w2s_clip.weak_stage`'s `datasets`)
# ------------------------------------------------------------------------------------------------
def cached_datasets(args, data, seed, train_tf, eval_tf):
    """`w2s_clip.image_datasets` with the images read from pixel caches in --cache-dir: the
    evaluation images kept up to their center crop (--eval-image-cache, the same tensors bit for
    bit), the training images at --train-image-cache pixels (opt-in, deviation 22)."""
    root, cache_dir = os.path.realpath(args.data_root), Path(args.cache_dir)
    data_key = cache_key(root=root, splits=data["digest"], images=data.get("images"))
    train_pixels = eval_pixels = None
    if args.train_image_cache:  # decoded once per domain, shared by seeds and weak models
        prepare, out_size = short_side(args.train_image_cache)
        pixel_key = cache_key(data=data_key, short_side=args.train_image_cache)
        train_pixels = build_pixel_cache(cache_dir / f"pixels-{args.domain}-train-{pixel_key}", root,
                                         data["train_paths"], prepare, out_size, args.workers)
    steps = eval_pixel_steps(eval_tf) if args.eval_image_cache else None
    if steps:  # up to the crop once per domain and transform; each seed reads it
        pre, eval_tf, (h, w) = steps
        pixel_key = cache_key(data=data_key, transform=repr(pre))
        eval_pixels = build_pixel_cache(cache_dir / f"pixels-{args.domain}-eval-{pixel_key}", root,
                                        data["test_paths"], pre, lambda *_: (w, h), args.workers)
    return (w2s_clip.ImageList(root, data["train_paths"], data["train_labels"], train_tf, seed=seed,
                               pixels=train_pixels),
            w2s_clip.ImageList(root, data["test_paths"], data["test_labels"], eval_tf,
                               pixels=eval_pixels))


# ------------------------------------------------------------------------------------------------
# Settings: the file's, with the package's own flags where they change a result
# ------------------------------------------------------------------------------------------------
PACKAGE_RUN_FLAGS = ("eval_image_cache", "build_tables", "tables_dir", "make_demo")  # no effect


def run_settings(args, data, device, precision="fp32"):
    """`w2s_clip.run_settings` for the package's command: its own flags kept only where they are
    not at their defaults (so that the file and the package share settings and cache keys), a
    --class-descriptions file by its contents, a Hugging Face weak model's folder by its real path."""
    flags = w2s_clip.run_settings(args, data, device, precision)
    for name in PACKAGE_RUN_FLAGS:
        flags.pop(name, None)
    for name in ("train_image_cache", "hold_train_per_class", "weak_input_size"):
        if not flags.get(name):  # at its default: the file's settings
            flags.pop(name, None)
    if flags.get("dataset") == "domainnet":
        flags.pop("dataset")
    if flags.get("dataset") != "officehome":  # the split flags apply to Office-Home only
        flags.pop("split_share", None)
        flags.pop("split_seed", None)
    if flags.get("prototype_init") != "cpe":  # CPE's flags apply to CPE only
        flags.pop("cpe_k", None)
        flags.pop("class_descriptions", None)
    elif getattr(args, "class_descriptions", None):  # the file's contents, not its name
        flags["class_descriptions"] = w2s_clip.file_digest(args.class_descriptions)
    if args.weak_model.startswith("hf:") and os.path.isdir(args.weak_model[3:]):  # a local folder
        flags["weak_model"] = "hf:" + os.path.realpath(args.weak_model[3:])
    return flags


# ------------------------------------------------------------------------------------------------
# Results: the one thorough reader of results.json files, for the tables
# ------------------------------------------------------------------------------------------------
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


