"""Weak-to-strong generalization for CLIP-based classification, with class prototype learning (CPL).

Reference implementation of J. Li, S. M. Erfani, L. Feng, J. Bailey and F. Liu, "Exploring
Weak-to-Strong Generalization for CLIP-based Classification", TMLR 2025 (arXiv:2511.18396).
A weak timm or Hugging Face model, fine-tuned on true labels, labels held-out images; a frozen
open_clip image tower plus one trainable head (LP, TP or CPL) learns from those weak labels only.
Manual: README.md.

    # CPU demo, no download: synthetic DomainNet-layout data, a tiny CLIP pretrained on the spot
    # (minidomainnet.py), weak, zero-shot, ceiling, LP, TP and CPL on two seeds (~1 min)
    make demo
    # one domain and method on DomainNet, five seeds (GPU; `make data DOMAIN=sketch` first)
    python w2s_clip.py --domain sketch --method cpl
    # every method of a domain; image features and weak logits are computed once and cached
    python w2s_clip.py --domain sketch --method all --seeds 0
    # a few methods: python w2s_clip.py --domain sketch --method weak ceiling kd-lp cpl
    # the paper's tables from the results.json files
    python w2s_clip.py --build-tables --out-dir runs --tables-dir results
"""
import argparse
import contextlib
import copy
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")  # DomainNet's
DATASETS = ("domainnet", "officehome", "folder")  # layouts: datasets_w2s_clip.py for the others


def finite(text):
    """argparse type: a float that is neither NaN nor +-inf."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive(kind):
    """argparse type: a finite number of `kind` (int or float) that must be > 0."""
    def parse(text):
        value = finite(text) if kind is float else kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative_int(text):
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def in_range(low, high):
    """argparse type: a finite float in [low, high] (high may be inf: no upper bound)."""
    def parse(text):
        value = finite(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value
    return parse


def prompt_template(text):
    """argparse type: a prompt with exactly one `{}` for the class name."""
    if text.count("{}") != 1 or text.replace("{}", "").count("{") or text.replace("{}", "").count("}"):
        raise argparse.ArgumentTypeError(f"needs exactly one {{}} for the class name and no other "
                                         f"braces, got {text!r}")
    return text


def seed_value(text):
    """argparse type: a seed torch.Generator.manual_seed takes, an int in [0, 2**64 - 1]."""
    value = int(text)
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1] (torch.Generator), got {text}")
    return value


def available_cpus():
    """CPUs this process may run on (its affinity mask, which cgroups and SLURM set), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default shown once: not for None, a switch's off state or a help text that
    already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default" in text
                or isinstance(action, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`error: argument --x: ...; see --help`),
    exit status 2, instead of the usage block and the error."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def parse_args(argv=None):
    """The command line; every flag is documented in docs/reference.md."""
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = p.add_argument_group("data: which images, which domain, which splits")
    data.add_argument("--dataset", choices=DATASETS, default="domainnet",
                      help="layout of --data-root: domainnet (split files), officehome "
                           "(<Domain>/<Class>/<image>, split here) or folder "
                           "(<domain>/{train,test}/<class>/<image>); see datasets_w2s_clip.py")
    data.add_argument("--data-root", default="data/domainnet",
                      help="folder with <domain>/<class>/<file>.jpg and <domain>_{train,test}.txt "
                           "(DomainNet), or of the --dataset layout")
    data.add_argument("--domain", default="sketch",
                      help=f"the data set's domain: for DomainNet one of {', '.join(DOMAINS)}")
    data.add_argument("--split-share", type=in_range(0, 1), default=0.8,
                      help="officehome only (no official split): share of each class's images in the "
                           "weak model's train split, the rest is D_test (DomainBed's 80/20)")
    data.add_argument("--split-seed", type=seed_value, default=0,
                      help="officehome only: seed of that split, the same for every --seeds run")
    data.add_argument("--seeds", type=seed_value, nargs="+", default=[0, 1, 2, 3, 4],
                      help="one run per seed: the D_test split, weak model and head all follow it")
    data.add_argument("--workers", type=int, choices=range(0, 65), metavar="N",
                      default=min(8, available_cpus()),
                      help="data-loader worker processes for image decoding (no effect on results)")
    weak = p.add_argument_group("weak model: fine-tuned on D_train with true labels")
    weak.add_argument("--weak-model", default="resnet18",
                      help="any timm model name, or hf:<Hugging Face id or folder> for a transformers "
                           "image classifier (Table 3: hf:microsoft/resnet-18 ... hf:microsoft/cvt-13)")
    weak.add_argument("--no-weak-pretrained", dest="weak_pretrained", action="store_false",
                      help="random-init weak model instead of ImageNet weights (offline use; for hf: "
                           "random init from the model's config)")
    weak.add_argument("--weak-epochs", type=positive(int), default=3, help="weak fine-tuning epochs on D_train")
    weak.add_argument("--weak-lr", type=positive(float), default=1e-3, help="weak fine-tuning learning rate")
    weak.add_argument("--weak-micro-batch", type=positive(int), default=None, metavar="N",
                      help="run each weak-training batch of --batch-size in parts of N images, "
                           "gradients added up: the paper's batch of 512 on a smaller card "
                           "(BatchNorm then normalises over N images); default: the whole batch")
    weak.add_argument("--train-image-cache", type=non_negative_int, default=0, metavar="PIXELS",
                      help="decode each D_train image once and keep it at this short side (uint8, "
                           "bicubic, never enlarged) for weak training's crops: faster, a slightly "
                           "different augmentation (deviation 22); 0: decode every epoch (paper)")
    weak.add_argument("--eval-image-cache", action=argparse.BooleanOptionalAction, default=True,
                      help="keep the weak model's evaluation images up to their center crop (uint8, "
                           "in --cache-dir) so that each seed's weak logits read them instead of "
                           "decoding again: the same tensors bit for bit (timm models)")
    strong = p.add_argument_group("strong model: open_clip CLIP, image tower frozen")
    strong.add_argument("--clip-model", default="ViT-B-32",
                        help="open_clip model name, or a path to an open_clip JSON model config")
    strong.add_argument("--clip-pretrained", default="openai",
                        help="open_clip pretrained tag or checkpoint file; 'none' = random init")
    heads = p.add_argument_group("methods, heads and losses")
    heads.add_argument("--method", choices=METHODS + ("all",), nargs="+", default=["cpl"],
                       metavar="METHOD", help=f"one or more of {', '.join(METHODS)}; or all")
    heads.add_argument("--tau", type=positive(float), default=1.0,
                       help="CPL temperature tau on both weak and strong logits (Eq. 4); the paper "
                            "gives no value")
    heads.add_argument("--cpl-logit-scale", type=positive(float), default=1.0,
                       help="CPL and cpl-text logits = scale * cos(x, C): 1 = Eq. 3; 100 = CLIP's scale")
    heads.add_argument("--prototype-norm", choices=("raw", "unit"), default="raw",
                       help="CPL's initial prototypes: raw text embeddings (Algorithm 1, line 2) or "
                            "L2-normalised (open_clip's zero-shot classifier)")
    heads.add_argument("--lp-input", choices=("raw", "normalized"), default="raw",
                       help="LP input: the raw image feature (Eq. 1) or the L2-normalised one")
    heads.add_argument("--kd-temperature", type=positive(float), default=1.0, help="KD/AdaptConf temperature T")
    heads.add_argument("--aux-alpha", type=in_range(0, 1), default=0.5, help="AuxConf final alpha")
    heads.add_argument("--adapt-tau", type=positive(float), default=0.5,
                       help="AdaptConf beta temperature (Guo et al.'s code default)")
    heads.add_argument("--prototype-init", choices=("single", "ensemble", "cpe"), default="single",
                       help="CPL init: --prompt-template (Algorithm 1), open_clip's 80 ImageNet "
                            "templates, or those weighted by CPE (Shao et al. 2023: worst-k CMM with "
                            "pseudo-labels on hold-train, no true label)")
    heads.add_argument("--cpe-k", type=positive(int), default=10,
                       help="CPE: the k worst classes whose mean CMM weighs a template")
    heads.add_argument("--class-descriptions", metavar="FILE",
                       help="CPE: JSON {class name: [sentences]}, each sentence one more prompt of its "
                            "class (e.g. written by a language model beforehand)")
    heads.add_argument("--prompt-template", type=prompt_template, default="a photo of a {}",
                       help="CPL's and cpl-text's prompt, one {} for the class name (Algorithm 1, line 2, "
                            "no period)")
    heads.add_argument("--cpl-kl", choices=("summand", "printed"), default="summand",
                       help="CPL loss: KL(p^w || p^s), Eq. 5's summand (Hinton's distillation direction), "
                            "or KL(p^s || p^w), Eq. 5's left-hand side as printed")
    train = p.add_argument_group("training (weak model and heads)")
    train.add_argument("--strong-epochs", type=positive(int), default=10, help="head training epochs")
    train.add_argument("--batch-size", type=positive(int), default=512, help="batch size, weak and strong")
    train.add_argument("--lr", type=positive(float), default=1e-2, help="head learning rate (AdamW)")
    train.add_argument("--text-lr", type=positive(float), default=1e-5,
                       help="learning rate of the text tower for cpl-text (Table 4)")
    train.add_argument("--warmup-ratio", type=in_range(0, 1), default=0.1, help="linear warm-up share of steps")
    train.add_argument("--lr-schedule", choices=("linear", "cosine"), default="linear",
                       help="decay after warm-up, weak and strong: HF Trainer's default linear, or cosine")
    train.add_argument("--max-grad-norm", type=in_range(0, float("inf")), default=1.0,
                       help="clip the gradient norm, weak and strong (HF Trainer default); 0 = off")
    train.add_argument("--select-by", choices=("loss", "agreement"), default="loss",
                       help="best epoch: lowest hold-val loss against the run's supervision (HF Trainer "
                            "metric_for_best_model default), or highest agreement with its labels")
    train.add_argument("--select-from", choices=("epochs", "start-and-epochs"), default="epochs",
                       help="candidates for the best epoch: the head after each epoch (HF Trainer: only "
                            "checkpoints saved after training steps), or also the head before training")
    train.add_argument("--ceiling-data", choices=("hold", "hold-train"), default="hold",
                       help="the ceiling's training set, true labels: all of D_hold (paper Section 5, "
                            "step 5) or hold-train only (the weak-to-strong runs' set)")
    tune = p.add_argument_group("hold-val tuning (Section 5, step 4)")
    tune.add_argument("--tune", choices=("hold-val", "none"), default="hold-val",
                      help="choose each weak-to-strong method's open hyperparameters from the grids "
                           "below on hold-val with weak labels only (Section 5, step 4), or keep the "
                           "fixed --tau, --kd-temperature, --aux-alpha, --text-lr")
    tune.add_argument("--tune-by", choices=("agreement", "weak-kl"), default="agreement",
                      help="tuning criterion on hold-val: agreement with the weak labels, or the lowest "
                           "KL(softmax(w) || the head's own p^s); both comparable across temperatures")
    tune.add_argument("--tau-grid", type=positive(float), nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0],
                      help="CPL and cpl-text tau grid (not stated; 0.01 = CLIP's logit scale 100, 1 = Eq. 4 "
                           "at face value)")
    tune.add_argument("--kd-temperature-grid", type=positive(float), nargs="+", default=[1.0, 2.0, 4.0],
                      help="KD and AdaptConf T grid (not stated; Hinton et al. 2015's usual range)")
    tune.add_argument("--aux-alpha-grid", type=in_range(0, 1), nargs="+", default=[0.25, 0.5, 0.75],
                      help="AuxConf alpha grid (Burns et al. 2023: 0.5 in their code, 0.75 for large "
                           "students)")
    tune.add_argument("--text-lr-grid", type=positive(float), nargs="+", default=[1e-6, 1e-5, 1e-4],
                      help="cpl-text text-tower learning-rate grid (not stated; a decade either side "
                           "of --text-lr)")
    train.add_argument("--weight-decay", type=in_range(0, float("inf")), default=0.0,
                       help="AdamW weight decay")
    device = p.add_argument_group("device")
    device.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ...; none given: cuda if "
                        "available (a GPU this torch build has no kernels for stops the command), "
                        "else cpu")
    device.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="autocast of weak training and CLIP encoding: auto = bf16 on sm_80+, "
                             "fp16 with a gradient scaler below (V100), fp32 on the CPU; weak logits "
                             "and heads are always fp32")
    out = p.add_argument_group("output and caches")
    out.add_argument("--out-dir", default="runs", help="results go to <out-dir>/<domain>/<method>/")
    out.add_argument("--cache-dir", default="cache", help="features, weak models and weak logits")
    out.add_argument("--force", action="store_true", help="recompute caches and finished runs")
    out.add_argument("--build-tables", action="store_true",
                     help="only build Tables 2-4 and Figure 2 from the results under --out-dir")
    out.add_argument("--tables-dir", default="results", help="where --build-tables writes")
    out.add_argument("--make-demo", metavar="DIR",
                     help="only write a synthetic DomainNet-layout dataset and a tiny CLIP config")
    args = p.parse_args(argv)
    if args.dataset == "domainnet" and args.domain not in DOMAINS and not args.build_tables:
        p.error(f"argument --domain: invalid choice: {args.domain!r} (DomainNet has "
                f"{', '.join(DOMAINS)}; another data set needs --dataset officehome or folder)")
    if args.dataset == "officehome":
        args.domain = args.domain.replace(" ", "_")  # "Real World" is run as Real_World
    return args


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a file); main() prints it as one line."""


def one_line(error, limit=160):
    """The first informative line of an exception's message (a heading ending in ':' is joined
    to the line after it), cut to `limit` characters, for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_seed(seed):
    """Seed Python's, torch's and every CUDA device's generators."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# ------------------------------------------------------------------------------------------------
# Data and splits (paper Section 5, step 0)
# ------------------------------------------------------------------------------------------------
def read_split_file(path):
    """Parse an official DomainNet split file, one `<domain>/<class>/<file>.jpg <label>` per line.

    The file must be UTF-8 (a leading byte-order mark is accepted) and list each image once.
    Returns:
        (paths, labels): relative image paths (list of n str) and labels (LongTensor [n]).
    """
    if not os.path.isfile(path):
        raise UserError(f"split file {path} not found; get it with `make data DOMAIN=<domain>`")
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save it as UTF-8 or "
                        f"re-download it")
    paths, labels = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            try:
                label = int(parts[1]) if len(parts) == 2 and parts[0].count("/") >= 2 else None
            except ValueError:
                label = None
            if label is not None and not -2 ** 63 <= label < 2 ** 63:  # beyond torch's int64
                raise UserError(f"{path}:{lineno}: label {parts[1]} is far too large for a class "
                                f"index; re-download the split file")
            if label is None:
                raise UserError(f"{path}:{lineno}: expected '<domain>/<class>/<file> <label>', "
                                f"got {line.strip()!r}; re-download the split file")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise UserError(f"{path} is empty; re-download it with `make data`")
    repeats = len(paths) - len(set(paths))
    if repeats:
        counts = {}
        for p in paths:
            counts[p] = counts.get(p, 0) + 1
        first = next(p for p in paths if counts[p] > 1)  # in file order
        raise UserError(f"{path} lists {first} more than once ({repeats} repeated lines in all); "
                        f"each image must appear once: re-download the split file")
    return paths, torch.tensor(labels)


def classnames_from_splits(paths, labels, source="split files"):
    """Class names in label order, from the class folder of each file (`_` -> space).

    DomainNet's label order is not `sorted(folders)`, so names must come from the split files.
    Returns a list of k names; raises UserError on a label outside 0..k-1 or a folder with 2 labels.
    """
    names = {}
    for p, y in zip(paths, labels.tolist()):
        name = p.split("/")[-2].replace("_", " ")
        if names.setdefault(y, name) != name:
            raise UserError(f"{source}: label {y} is used for both '{names[y]}' and '{name}'")
    k = len(set(names.values()))
    bad = sorted(y for y in names if not 0 <= y < k)
    if bad:
        raise UserError(f"{source}: label {bad[0]} is outside 0..{k - 1} ({k} class folders)")
    return [names[y] for y in range(k)]


def protocol_splits(n_test, seed, hold_frac=0.8, train_frac=0.8):
    """Split D_test into hold-train / hold-val (D_hold = 80%, then 80/20) and D'_test (20%).

    Returns:
        dict of LongTensors of indices into D_test: hold_train, hold_val, test (disjoint, covering).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_test, generator=g)
    n_hold = int(hold_frac * n_test)
    n_train = int(train_frac * n_hold)
    return {"hold_train": perm[:n_train], "hold_val": perm[n_train:n_hold], "test": perm[n_hold:]}


def decode_image(path):
    """The image file at `path` decoded to RGB (PIL), or a UserError naming it."""
    try:
        return Image.open(path).convert("RGB")
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is refused by PIL as a decompression bomb ({e}); "
                        f"shrink it or remove it from the split files")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({e}); re-download with `make data`")


class ImageList(Dataset):
    """Images `root/paths[i]` with labels, through `transform`; a bad file raises UserError.

    With a `seed`, the transform's random draws (torch and Python's `random`, what torchvision and
    timm use) come from a generator seeded by (seed, epoch, i) for each sample, so augmentation does
    not depend on which data-loader worker loads it. Index epoch * n + i is image i in that epoch
    (`EpochSampler`). With `pixels` (a `PixelCache` of the same images), image i is read from it
    instead of decoded.
    """

    def __init__(self, root, paths, labels, transform, seed=None, pixels=None):
        self.root, self.paths, self.labels, self.transform = root, paths, labels, transform
        self.seed, self.pixels = seed, pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        i, epoch = index % len(self.paths), index // len(self.paths)
        image = (self.pixels[i] if self.pixels is not None
                 else decode_image(os.path.join(self.root, self.paths[i])))
        if self.seed is None:
            return self.transform(image), self.labels[i]
        sample_seed = int(hashlib.sha1(f"{self.seed} {epoch} {i}".encode()).hexdigest()[:15], 16)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            x = self.transform(image)
        random.setstate(state)
        return x, self.labels[i]


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle per pass, as indices epoch * n + i, so that each sample knows its epoch."""

    def __init__(self, n, seed):
        self.n, self.g, self.epoch = n, torch.Generator().manual_seed(seed), 0

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.g) + self.epoch * self.n
        self.epoch += 1
        return iter(order.tolist())


def check_images(root, paths, workers=16):
    """Stop before any training if a listed image is missing, not an image (header check) or
    larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)."""
    def bad(rel):
        try:
            with Image.open(os.path.join(root, rel)):
                return None
        except Image.DecompressionBombError:
            return rel, "bomb"
        except (OSError, ValueError):
            return rel, "bad"
    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(bad, paths, chunksize=256):
            if found is None:
                continue
            path = os.path.join(root, found[0])
            if found[1] == "bomb":
                raise UserError(f"image {path} has more pixels than PIL opens (decompression-bomb "
                                f"limit, 2 x Image.MAX_IMAGE_PIXELS); shrink it or remove it from "
                                f"the split files")
            what = "missing" if not os.path.exists(path) else "unreadable"
            raise UserError(f"image {path} is {what}; re-download the domain with `make data`")


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
        tmp = Path(stem).with_name(f".{Path(stem).name}.u8.{os.getpid()}.tmp")
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


def load_domain(data_root, domain, split_root=None):
    """Read `<domain>_train.txt` and `<domain>_test.txt` (in `split_root`, default `data_root`;
    image paths relative to `data_root`); return a dict with paths, labels, names."""
    get = f"`make data DOMAIN={domain} DATA={data_root}`"
    if split_root is not None:
        data_root = split_root  # written by datasets_w2s_clip from the images under data_root
    if os.path.exists(data_root) and not os.path.isdir(data_root):
        raise UserError(f"--data-root {data_root} is a file, not a folder; pass the folder that "
                        f"holds <domain>_train.txt and <domain>_test.txt")
    if not os.path.isdir(data_root):
        raise UserError(f"data root {data_root} not found; run {get} or pass --data-root")
    for split in ("train", "test"):
        if not os.path.isfile(os.path.join(data_root, f"{domain}_{split}.txt")):
            raise UserError(f"split file {os.path.join(data_root, f'{domain}_{split}.txt')} "
                            f"not found; get it with {get}")
    splits = {s: read_split_file(os.path.join(data_root, f"{domain}_{s}.txt"))
              for s in ("train", "test")}
    (tr_paths, tr_labels), (te_paths, te_labels) = splits["train"], splits["test"]
    both = set(tr_paths).intersection(te_paths)
    if both:  # the weak model would be trained on images it then labels
        first = next(p for p in te_paths if p in both)
        raise UserError(f"{len(both)} images are listed in both {domain}_train.txt and "
                        f"{domain}_test.txt under {data_root}, first {first}; the splits must "
                        f"be disjoint: re-download them")
    names = classnames_from_splits(tr_paths + te_paths, torch.cat([tr_labels, te_labels]),
                                   source=f"{domain}_train.txt + {domain}_test.txt")
    return {"train_paths": tr_paths, "train_labels": tr_labels, "test_paths": te_paths,
            "test_labels": te_labels, "classnames": names,
            "digest": file_digest(os.path.join(data_root, f"{domain}_train.txt"),
                                  os.path.join(data_root, f"{domain}_test.txt"))}


def make_loader(dataset, batch_size, device, workers, shuffle=False, seed=0):
    """A DataLoader that keeps an accelerator busy: workers, pinned memory, and for training a
    seeded shuffle (`EpochSampler`) that does not depend on the number of workers; the dataset
    must then take indices epoch * n + i, as ImageList does. Its own generator seeds the workers,
    so the global RNG is not drawn from (a model with dropout sees the same stream however many
    workers load its data)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=EpochSampler(len(dataset), seed) if shuffle else None,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0 and shuffle, drop_last=False)


def progress(iterable, desc, total=None, quiet_seconds=10.0):
    """tqdm on a terminal; elsewhere (nohup, SLURM) a line on stderr every 10% of `total` steps,
    once the stage has run `quiet_seconds` (short stages stay silent)."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, total=total)
        return
    total = total if total is not None else len(iterable)
    start, shown = time.time(), 0
    for i, item in enumerate(iterable, 1):
        yield item
        tenth = 10 * i // max(1, total)
        if tenth > shown and time.time() - start >= quiet_seconds:
            shown = tenth
            print(f"{desc}: {i}/{total} ({100 * i // max(1, total)}%) in {time.time() - start:.0f} s",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Weak model (step 1): a timm or Hugging Face model fine-tuned on D_train with true labels
# ------------------------------------------------------------------------------------------------
def create_weak_model(name, num_classes, pretrained=True):
    """A timm classifier (or, for `hf:<hub id or folder>`, a transformers one) with a fresh k-way
    head, plus its library's own train and eval transforms."""
    if name.startswith("hf:"):
        return create_hf_weak_model(name[3:], num_classes, pretrained)
    import timm
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as e:  # no network, no weights, a bad file
        raise UserError(f"cannot load timm model {name} (pretrained={pretrained}): "
                        f"{str(e).splitlines()[0]}; check the network or pass --no-weak-pretrained")
    cfg = timm.data.resolve_model_data_config(model)
    return (model, timm.data.create_transform(**cfg, is_training=True),
            timm.data.create_transform(**cfg))


def import_transformers(flag_value):
    """The optional `transformers` package, or a UserError naming it and the flag that needs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"--weak-model {flag_value} needs the transformers package; "
                        f"`pip install transformers` or pick a timm model")
    return transformers


class HFLogits(nn.Module):
    """A transformers image classifier called like a timm one: images [n, 3, H, W] -> logits [n, k]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


class HFEvalTransform:
    """A transformers image processor as a per-image transform: PIL image -> FloatTensor [3, H, W]."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


def create_hf_weak_model(hub_id, num_classes, pretrained=True):
    """A Hugging Face image classifier with a fresh k-way head (`ignore_mismatched_sizes`), wrapped to
    return logits [n, k], and transforms from its own image processor.

    Eval: the processor itself (resize, crop, rescale, normalise as the checkpoint was trained).
    Train: RandomResizedCrop to the processor's output size, horizontal flip, the processor's mean
    and std (transformers' `run_image_classification` example). pretrained=False: random init from
    the checkpoint's config.
    """
    from torchvision import transforms as T
    transformers = import_transformers(f"hf:{hub_id}")
    try:
        if pretrained:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                hub_id, num_labels=num_classes, ignore_mismatched_sizes=True)
        else:
            config = transformers.AutoConfig.from_pretrained(hub_id, num_labels=num_classes)
            model = transformers.AutoModelForImageClassification.from_config(config)
        processor = transformers.AutoImageProcessor.from_pretrained(hub_id)
    except (OSError, ValueError, KeyError) as e:  # no network, unknown id, not an image classifier
        raise UserError(f"cannot load Hugging Face model {hub_id} (pretrained={pretrained}): "
                        f"{str(e).splitlines()[0]}; check the id and the network")
    eval_tf = HFEvalTransform(processor)
    size = tuple(eval_tf(Image.new("RGB", (64, 48))).shape[-2:])  # (H, W) the model is fed
    steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]
    if getattr(processor, "do_normalize", True) and getattr(processor, "image_mean", None) is not None:
        steps.append(T.Normalize(processor.image_mean, processor.image_std))
    return HFLogits(model), T.Compose(steps), eval_tf


def warmup_linear(step, total_steps, warmup_ratio):
    """LR multiplier of the Hugging Face Trainer's default schedule (the paper's "warm-up ratio of
    0.1"): step / w for step < w = ceil(warmup_ratio * total_steps), then linear decay to 0 at
    total_steps. The closed form of transformers.get_linear_schedule_with_warmup."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def warmup_cosine(step, total_steps, warmup_ratio):
    """LR multiplier: the warm-up of `warmup_linear`, then cosine decay to 0 at total_steps
    (the closed form of transformers.get_cosine_schedule_with_warmup)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


SCHEDULES = {"linear": warmup_linear, "cosine": warmup_cosine}


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(requested, device_type, capability=None):
    """The autocast precision of weak training and CLIP encoding: "auto" is bf16 on CUDA sm_80 and
    newer (native bf16), fp16 below (a V100 emulates bf16, slowly), fp32 on the CPU; an explicit
    choice is kept. bf16 or fp16 on a CPU is a UserError."""
    if device_type != "cuda":
        if requested in ("bf16", "fp16"):
            raise UserError(f"--precision {requested} needs a CUDA device; pass --precision fp32 "
                            f"or auto on the {device_type}")
        return "fp32"
    if requested == "auto":
        return "bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16"
    return requested


def amp_dtype(precision, device):
    """The autocast dtype of `precision` ("auto", "bf16", "fp16", "fp32") on `device`: None (float32)
    off CUDA or for fp32; "auto" as `resolve_precision` picks it for the GPU's compute capability."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return AMP_DTYPES[resolve_precision(precision, "cuda", torch.cuda.get_device_capability(dev))]


def train_weak_model(model, loader, epochs, lr, warmup_ratio, device, weight_decay=0.0,
                     schedule="linear", max_grad_norm=1.0, precision="auto", history=None,
                     micro_batch=None):
    """Fine-tune all of `model` with cross-entropy on true labels (paper: 3 epochs, lr 1e-3), with
    the strong heads' schedule (`warmup_linear` or `warmup_cosine`) and gradient-norm clipping.

    precision: autocast on CUDA (`amp_dtype`: "auto" is bf16 on sm_80+, fp16 below; fp16 with a
    gradient scaler, the gradients unscaled before clipping); float32 on the CPU. micro_batch: run each batch in parts of this many images
    and add up their gradients (each part's loss weighted by its share of the batch): the same step
    in less memory, except that BatchNorm normalises over each part. `history`, a list, gets one
    dict per epoch: mean training loss, training accuracy (augmented batches), seconds and, on
    CUDA, the peak allocated memory so far.
    """
    cuda = torch.device(device).type == "cuda"
    dtype = amp_dtype(precision, device)
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    total = epochs * len(loader)
    multiplier = SCHEDULES[schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: multiplier(s, total, warmup_ratio))
    batches = progress(((e, b) for e in range(epochs) for b in loader), "weak model", total)
    sums = {}
    for epoch, (images, labels) in batches:
        if epoch not in sums:
            sums[epoch] = {"loss": 0.0, "hits": 0, "n": 0, "start": time.time()}
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        loss, hits = 0.0, 0
        for part, part_labels in zip(images.split(micro_batch or len(labels)),
                                     labels.split(micro_batch or len(labels))):
            with torch.autocast(torch.device(device).type, dtype or torch.float32,
                                enabled=dtype is not None):
                logits = model(part)
                part_loss = F.cross_entropy(logits, part_labels) * (len(part_labels) / len(labels))
            if not torch.isfinite(part_loss):
                raise FloatingPointError(f"the weak model's training loss became "
                                         f"{part_loss.item()} at epoch {epoch + 1}")
            scaler.scale(part_loss).backward()
            loss += part_loss.item()
            hits += (logits.argmax(dim=-1) == part_labels).sum().item()
        if max_grad_norm > 0:  # HF Trainer: clip before the step (fp16: on unscaled gradients)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        acc = sums[epoch]
        acc["loss"] += loss * len(labels)
        acc["hits"] += hits
        acc["n"] += len(labels)
        acc["end"] = time.time()
        if cuda:
            acc["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if history is not None:
        history.extend({"epoch": e + 1, "loss": a["loss"] / a["n"], "train_accuracy": a["hits"] / a["n"],
                        "seconds": a["end"] - a["start"],
                        **({"peak_gpu_memory_gib": a["peak_gpu_memory_gib"]} if cuda else {})}
                       for e, a in sorted(sums.items()))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Weak labels (step 2): the weak model's logits on D_hold
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model, loader, device, desc="weak logits"):
    """Logits of `model` on every batch of `loader`, in order: FloatTensor [n, k] on the CPU.

    In float32 (no autocast): the logits are the soft targets of KD, AdaptConf and CPL.
    """
    model.eval().to(device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
    try:
        out = [model(images.to(device, non_blocking=True)).float().cpu()
               for images, _ in progress(loader, desc)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# CLIP features: the image tower is frozen for every head, so each image is encoded once
# ------------------------------------------------------------------------------------------------
def load_clip(model_name, pretrained, device="cpu"):
    """An open_clip model (eval, frozen), its eval preprocessing and its tokenizer.

    `model_name` is an open_clip name or a JSON config file; `pretrained` a tag, a file or None
    (random init, always from seed 0). A tag trained with QuickGELU (OpenAI's) gets QuickGELU.
    """
    import open_clip
    name = Path(model_name).stem if model_name.endswith(".json") else model_name
    try:
        if model_name.endswith(".json"):
            open_clip.add_model_config(model_name)
        cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random-init model is then the same model in every run
            if not pretrained:  # asked for: open_clip's "no pretrained weights" warning is noise
                logging.disable(logging.WARNING)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, force_quick_gelu=cfg.get("quick_gelu", False))
            finally:
                logging.disable(logging.NOTSET)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            pickle.UnpicklingError) as e:  # no network, bad tag, config or checkpoint file
        raise UserError(f"cannot load open_clip {name} with weights {pretrained}: "
                        f"{str(e).splitlines()[0]}; check the network or the --clip-* flags")
    return model.to(device).eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def encode_images(clip_model, loader, device, precision="auto"):
    """CLIP image features (not normalised) of every image in `loader`: FloatTensor [n, d].
    On CUDA the tower runs under `amp_dtype(precision)` autocast (auto: bf16 on sm_80+, fp16
    below); the features are returned in float32."""
    cuda = torch.device(device).type == "cuda"
    dtype = amp_dtype(precision, device)
    clip_model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    out = []
    for images, _ in progress(loader, "CLIP features"):
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(torch.device(device).type, dtype or torch.float32, enabled=dtype is not None):
            out.append(clip_model.encode_image(images).float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# Heads: LP (Eq. 1), TP as CoOp (Eq. 2), CPL prototypes (Eq. 3), text-encoder tuning (Table 4)
# ------------------------------------------------------------------------------------------------
class LinearHead(nn.Module):
    """LP, Eq. 1: logits = W x + b on frozen image features x [n, d] -> [n, k].

    `normalize_input=True` uses x / |x| instead (not in the paper; `--lp-input normalized`).
    """

    def __init__(self, dim, num_classes, normalize_input=False):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.normalize_input = normalize_input

    def forward(self, image_features):
        x = F.normalize(image_features, dim=-1) if self.normalize_input else image_features
        return self.fc(x)


class TextTower(nn.Module):
    """The parts of an open_clip CLIP's text tower after the token embedding (shared, not copied).

    `tower(x, eot)` is the plain path: padded prompts, every position. `tower.encode_prefixed(...)`
    runs the first tokens that all prompts share once and each prompt's own tokens packed
    (`packed_text_block`). It takes the plain path instead while `tower.packed` is False:
    set it to force that, and it starts False for any block other than open_clip's
    ResidualAttentionBlock (e.g. its CustomResidualAttentionBlock: qk-norm, cosine attention) or a
    mask other than the causal one (`packable_blocks`).
    """

    def __init__(self, clip_model):
        super().__init__()
        if getattr(clip_model, "attn_mask", None) is None or not hasattr(clip_model, "transformer"):
            raise UserError("TextTower needs open_clip's CLIP with a causal text transformer")
        if getattr(clip_model, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise UserError(f"text pooling '{clip_model.text_pool_type}' is not supported; "
                            f"use a CLIP with an end-of-text token (argmax/eos pooling)")
        self.transformer, self.ln_final = clip_model.transformer, clip_model.ln_final
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.packed = packable_blocks(clip_model.transformer, clip_model.attn_mask)

    def project(self, x):
        """Final-norm states x [k, w] -> text features [k, d] through the text projection."""
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x if proj is None else x @ proj

    def forward(self, x, eot):
        """Token embeddings x [k, L, w] -> text features [k, d] read at end-of-text positions eot.

        Only the first L positions run: under the causal mask the tokens after the end-of-text
        token cannot change its feature, so L = max(eot) + 1 equals open_clip's 77-token result.
        """
        L = x.shape[1]
        x = x + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:L, :L]))
        return self.project(x[torch.arange(x.shape[0], device=x.device), eot])  # (k, w) -> (k, d)

    def encode_prefixed(self, prefix, own, lengths):
        """Text features [k, d] of k prompts that all start with the same p token embeddings.

        Args:
            prefix: [p, w] embeddings every prompt starts with (SOS, then context or template).
            own: [T, w] each prompt's own embeddings, packed in prompt order, lengths[i] rows for
                prompt i, the last one its end-of-text token (`split_prompts`).
            lengths: [k] long, T = lengths.sum().
        Equals the plain path on prompt i = [prefix, own rows of i] up to float rounding.
        """
        p, (T, w), k = prefix.shape[0], own.shape, len(lengths)
        layout = prompt_layout(lengths)
        if not self.packed:  # plain path: [k, p + max(lengths), w], zeros after each end-of-text
            padded = torch.cat([own, own.new_zeros(1, w)])[layout["gather"]]
            return self(torch.cat([prefix.expand(k, p, w), padded], dim=1), p + lengths - 1)
        pos = self.positional_embedding
        h = torch.cat([prefix + pos[:p], own + pos[p + layout["position"]]])  # (p + T, w)
        blocks = self.transformer.resblocks
        for i, blk in enumerate(blocks):
            h = packed_text_block(blk, h, p, layout, last=i == len(blocks) - 1)
        return self.project(self.ln_final(h))  # h: (k, w), the end-of-text rows


def tokenize_prompts(clip_model, tokenizer, prompts):
    """Token ids [k, L] cut after the longest prompt's end-of-text token, and each eot index [k]."""
    tokens = tokenizer(list(prompts)).to(clip_model.positional_embedding.device)
    eos = getattr(clip_model, "text_eos_id", None)
    if getattr(clip_model, "text_pool_type", "argmax") == "eos" and eos is not None:
        eot = (tokens == eos).int().argmax(dim=-1)
    else:
        eot = tokens.argmax(dim=-1)  # OpenAI BPE: end-of-text has the largest id
    return tokens[:, : int(eot.max()) + 1], eot


def packable_blocks(transformer, attn_mask):
    """Whether `packed_text_block` reproduces every block of an open_clip text transformer.

    True for open_clip's ResidualAttentionBlock with plain self-attention (nn.MultiheadAttention
    with one in-projection, no bias_k/v, no zero-attention, no dropout) under the causal float mask;
    False for anything else (CustomResidualAttentionBlock, cross-attention, another mask).
    """
    from open_clip.transformer import ResidualAttentionBlock
    blocks, L = getattr(transformer, "resblocks", []), attn_mask.shape[-1]
    upper = torch.ones(L, L, dtype=torch.bool, device=attn_mask.device).triu(1)
    causal = (attn_mask.is_floating_point() and attn_mask.shape == (L, L)
              and torch.equal(attn_mask.isneginf(), upper) and not attn_mask[~upper].any())

    def plain(b):
        a = getattr(b, "attn", None)
        return (type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                and isinstance(a, nn.MultiheadAttention) and a._qkv_same_embed_dim
                and a.bias_k is None and not a.add_zero_attn and a.dropout == 0.0)
    return bool(causal) and len(blocks) > 0 and all(plain(b) for b in blocks)


def prompt_layout(lengths):
    """Index tensors that move k prompts' own tokens between packed rows [T] and a padded [k, L].

    Args:
        lengths: [k] long, own tokens of each prompt (>= 1, the last its end-of-text token).
    Returns:
        dict: gather [k, L], the packed row of each padded slot (T past a prompt's end: the
        caller appends a zero row); keep [T], each packed row's slot in the flattened [k * L];
        position [T], each row's index within its prompt's own tokens; last [k], each prompt's
        end-of-text row; lengths [k].
    """
    L = int(lengths.max())
    start = torch.cumsum(lengths, dim=0) - lengths  # (k,)
    j = torch.arange(L, device=lengths.device)
    valid = j < lengths[:, None]  # (k, L)
    keep = valid.flatten().nonzero().squeeze(1)  # (T,)
    return {"gather": torch.where(valid, start[:, None] + j, int(lengths.sum())), "keep": keep,
            "position": keep % L, "last": start + lengths - 1, "lengths": lengths}


def packed_text_block(blk, h, p, layout, last=False):
    """One open_clip ResidualAttentionBlock on a shared prefix and packed per-prompt tokens.

    Rows h[:p] are the prefix every prompt starts with, rows h[p:] the prompts' own tokens packed
    (`prompt_layout`). Layer norms, projections and the MLP run once per row. Attention gives what
    the causal mask gives each whole prompt: prefix row t sees prefix rows <= t, own row j of
    prompt i sees the whole prefix (keys/values shared by all prompts: their gradients add up)
    and its own rows <= j. With last=True only each prompt's end-of-text row is computed.
    Args:
        blk: a block that `packable_blocks` accepts; h: [p + T, w]; p: prefix length.
    Returns:
        [p + T, w], or [k, w] (the end-of-text rows) when last.
    """
    attn, w, (k, L) = blk.attn, h.shape[1], layout["gather"].shape
    W, b = attn.in_proj_weight, attn.in_proj_bias
    y = blk.ln_1(h)
    key, val = F.linear(y, W[w:], None if b is None else b[w:]).chunk(2, dim=-1)  # (p + T, w)
    q = F.linear(y[p + layout["last"]] if last else y, W[:w], None if b is None else b[:w])
    heads = lambda t: t.unflatten(-1, (attn.num_heads, -1)).transpose(-3, -2)  # (.., H, n, w/H)
    pad = lambda t: torch.cat([t[p:], t.new_zeros(1, w)])[layout["gather"]]  # (k, L, w)
    kv = [heads(torch.cat([t[:p].expand(k, p, w), pad(t)], dim=1)) for t in (key, val)]
    j = torch.arange(p + L, device=h.device)
    qpos = (layout["lengths"] - 1)[:, None] if last else j[:L].expand(k, L)  # (k, Lq) query rows
    see = j <= p + qpos[..., None]  # (k, Lq, p + L): the prefix, own rows up to the query's
    out = F.scaled_dot_product_attention(heads(q[:, None] if last else pad(q)), *kv,
                                         attn_mask=see[:, None]).transpose(1, 2).flatten(2)
    if last:  # (k, 1, w): the end-of-text rows only
        x = h[p + layout["last"]] + blk.ls_1(attn.out_proj(out[:, 0]))
    else:
        pre = F.scaled_dot_product_attention(*(heads(t[:p]) for t in (q, key, val)), is_causal=True)
        out = torch.cat([pre.transpose(0, 1).flatten(1), out.flatten(0, 1)[layout["keep"]]])
        x = h + blk.ls_1(attn.out_proj(out))  # (p + T, w)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def shared_prefix_length(tokens, eot):
    """Leading positions whose ids all prompts [k, L] share, leaving each its end-of-text token."""
    same = (tokens == tokens[:1]).all(dim=0).long().cumprod(dim=0)  # (L,) 1 while all agree
    return min(int(same.sum()), int(eot.min()))


def split_prompts(emb, eot, p):
    """Token embeddings [k, L, w] of prompts sharing their first p rows -> encode_prefixed's inputs.

    Returns:
        prefix [p, w] (prompt 0's), own [T, w] (rows p..eot[i] of each prompt, packed in order),
        lengths [k] = eot - p + 1.
    """
    lengths = eot - p + 1
    mine = torch.arange(emb.shape[1] - p, device=emb.device) < lengths[:, None]  # (k, L - p)
    return emb[0, :p], emb[:, p:][mine], lengths


@torch.no_grad()
def text_prototypes(clip_model, tokenizer, classnames, templates, batch_size=256, normalize=False):
    """Zero-shot class embeddings [k, d], one per class name, averaged over the templates.

    Args:
        templates: format strings with `{}` or callables, e.g. open_clip.OPENAI_IMAGENET_TEMPLATES.
        normalize: False (the paper's CPL): the mean of the raw embeddings (Algorithm 1, line 2:
            C_i = f_text(prompt_i); for one template exactly `encode_text(..., normalize=False)`);
            True: the L2-normalised mean of normalised prompt embeddings, which equals
            `open_clip.build_zero_shot_classifier(...).T`.
    Runs only the prompts' real tokens, not all 77.
    """
    emb = prompt_embeddings(clip_model, tokenizer, classnames, templates, batch_size)
    feats = (F.normalize(emb, dim=-1) if normalize else emb).mean(dim=1)
    return F.normalize(feats, dim=-1) if normalize else feats


def prompt_embeddings(clip_model, tokenizer, classnames, templates, batch_size=256):
    """The raw text embedding of every (class, template) prompt: [k, T, d]."""
    tower = TextTower(clip_model)
    prompts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens, eot = tokenize_prompts(clip_model, tokenizer, prompts[i:i + batch_size])
        feats.append(tower(clip_model.token_embedding(tokens), eot))  # (prompts, d)
    return torch.cat(feats).view(len(classnames), len(templates), -1)


def cpe_weights(embeddings, features, k_worst=10):
    """CPE's template weights (Shao et al. 2023, the weighted prompt ensemble), without labels.

    Pseudo-labels are the uniform ensemble's zero-shot predictions on unlabeled `features` [n, d];
    each template t gets its worst-k CMM m_t (`class_matching_margin` of its own prototypes with
    those pseudo-labels, mean of the k lowest classes) and the weight
    w_t = (m_t - min m) / sum(m - min m): the weakest template drops out, the others count by how
    far they beat it (uniform when all tie). The paper's exact rule is not available here; this is
    the simplest one consistent with "weighted by worst-k CMM" (docs/deviations.md, 23).
    Args:
        embeddings: prompt embeddings [k, T, d] (`prompt_embeddings`).
    Returns:
        (weights [T], worst-k CMM per template [T]).
    """
    k, T = embeddings.shape[:2]
    unit = F.normalize(embeddings.float(), dim=-1)
    feats = F.normalize(features.float(), dim=-1)
    pseudo = (feats @ F.normalize(unit.mean(dim=1), dim=-1).T).argmax(dim=1)
    worst = torch.empty(T)
    for t in range(T):
        margins, _ = class_matching_margin(feats, unit[:, t], pseudo, k)
        margins = margins[~margins.isnan()].sort().values
        worst[t] = margins[:k_worst].mean()
    gap = worst - worst.min()
    weights = gap / gap.sum() if gap.sum() > 0 else torch.full((T,), 1.0 / T)
    return weights, worst


def weighted_prototypes(embeddings, weights, normalize=False, descriptions=None):
    """Class prototypes [k, d] as the `weights`-weighted mean of the templates' embeddings [k, T, d]
    (each L2-normalised first, and the mean too, when `normalize`). `descriptions` ({class index:
    embeddings [m, d]}) adds each sentence as one more prompt of its class at the mean template
    weight 1/T (docs/deviations.md, 23)."""
    unit = lambda x: F.normalize(x, dim=-1) if normalize else x  # noqa: E731
    protos = torch.einsum("ktd,t->kd", unit(embeddings), weights.to(embeddings))
    for i, extra in (descriptions or {}).items():
        T = embeddings.shape[1]
        protos[i] = (protos[i] + unit(extra).sum(dim=0) / T) / (1 + len(extra) / T)
    return unit(protos)


class PromptHead(nn.Module):
    """TP as CoOp (Zhou et al. 2022): one shared learnable context before each class name.

    Prompt i is [SOS][ctx_1..ctx_m][name_i][.][EOS]; the context starts as the embedding of
    `ctx_init` and is the only trainable tensor. logits = logit_scale * cos(x, text_i), [n, k].
    The text tower is shared with `clip_model`, not copied, and is frozen in place; [SOS][ctx]
    runs once for all classes and each class's own tokens packed (`TextTower.encode_prefixed`).
    """

    def __init__(self, clip_model, tokenizer, classnames, ctx_init="a photo of a"):
        super().__init__()
        m = int((tokenizer([ctx_init])[0] != 0).sum()) - 2  # context tokens, no SOS/EOS
        tokens, eot = tokenize_prompts(clip_model, tokenizer,
                                       [f"{ctx_init} {c}." for c in classnames])
        with torch.no_grad():
            emb = clip_model.token_embedding(tokens)  # (k, L, w)
        self.ctx = nn.Parameter(emb[0, 1:1 + m].clone())  # (m, w)
        prefix, own, lengths = split_prompts(emb, eot, 1 + m)
        self.register_buffer("sos", prefix[:1].clone())  # (1, w)
        self.register_buffer("own", own.clone())  # (T, w): name tokens, ".", EOS of each class
        self.register_buffer("lengths", lengths)  # (k,)
        self.text = TextTower(clip_model).requires_grad_(False)
        self.logit_scale = clip_model.logit_scale.detach().exp().item()

    def text_features(self):
        """L2-normalised class embeddings through the frozen text tower, [k, d]."""
        prefix = torch.cat([self.sos, self.ctx])  # (1 + m, w)
        return F.normalize(self.text.encode_prefixed(prefix, self.own, self.lengths), dim=-1)

    def forward(self, image_features):
        return self.logit_scale * F.normalize(image_features, dim=-1) @ self.text_features().T


class PrototypeHead(nn.Module):
    """CPL, Eq. 3: learnable class prototypes C [k, d]; logits = logit_scale * cos(x, C), [n, k].

    The prototypes are kept as given (Algorithm 1: the raw text embeddings, whose norm is the
    step size's reference under Adam); logit_scale = 1 is Eq. 3's plain cosine, 100 CLIP's scale.
    """

    def __init__(self, prototypes, logit_scale=1.0):
        super().__init__()
        self.prototypes = nn.Parameter(prototypes.detach().clone())
        self.logit_scale = logit_scale

    def forward(self, image_features):
        x, c = F.normalize(image_features, dim=-1), F.normalize(self.prototypes, dim=-1)
        return self.logit_scale * x @ c.T


class TextEncoderHead(nn.Module):
    """Table 4's alternative to CPL: fixed prompts, a trainable copy of the text tower.

    The token-embedding table stays frozen (prompt embeddings are precomputed); the transformer,
    positional embedding, final norm and projection train. logits = logit_scale * cos, [n, k].
    The tokens all prompts share ([SOS] a photo of a) run once, each class's own ones packed.
    """

    def __init__(self, clip_model, tokenizer, classnames, template="a photo of a {}",
                 logit_scale=100.0):
        super().__init__()
        tokens, eot = tokenize_prompts(clip_model, tokenizer, [template.format(c) for c in classnames])
        with torch.no_grad():
            emb = clip_model.token_embedding(tokens)  # (k, L, w)
        prefix, own, lengths = split_prompts(emb, eot, shared_prefix_length(tokens, eot))
        self.register_buffer("prefix", prefix.clone())  # (p, w)
        self.register_buffer("own", own.clone())  # (T, w)
        self.register_buffer("lengths", lengths)  # (k,)
        self.text = copy.deepcopy(TextTower(clip_model)).requires_grad_(True)
        self.logit_scale = logit_scale

    def text_features(self):
        return F.normalize(self.text.encode_prefixed(self.prefix, self.own, self.lengths), dim=-1)

    def forward(self, image_features):
        return self.logit_scale * F.normalize(image_features, dim=-1) @ self.text_features().T


# ------------------------------------------------------------------------------------------------
# Losses: fn(strong_logits [n, k], weak_logits [n, k], **hyper) -> scalar mean over the batch
# ------------------------------------------------------------------------------------------------
def ce_loss(strong_logits, weak_logits):
    """CE to the weak model's hard labels argmax(weak_logits)."""
    return F.cross_entropy(strong_logits, weak_logits.argmax(dim=-1))


def kd_loss(strong_logits, weak_logits, T=1.0):
    """Hinton et al. 2015: T^2 * KL(softmax(w/T) || softmax(s/T))."""
    return T * T * F.kl_div(F.log_softmax(strong_logits / T, dim=-1),
                            F.log_softmax(weak_logits / T, dim=-1),
                            reduction="batchmean", log_target=True)


def auxconf_loss(strong_logits, weak_logits, alpha=0.5):
    """Burns et al. 2023, aux. confidence loss (multiclass): (1-a) CE(s, softmax w) + a CE(s, argmax s)."""
    soft = F.cross_entropy(strong_logits, F.softmax(weak_logits, dim=-1))
    self_hard = F.cross_entropy(strong_logits, strong_logits.argmax(dim=-1).detach())
    return (1 - alpha) * soft + alpha * self_hard


def adaptconf_loss(strong_logits, weak_logits, T=1.0, tau=0.5):
    """Guo et al. 2024, adaptive confidence distillation, weak-to-strong form (no true labels).

    beta = e^{CE(s, argmax s)/tau} / (e^{CE(s, argmax s)/tau} + e^{CE(s, argmax w)/tau}), per sample,
    detached; loss = mean((1 - beta) T^2 KL(softmax(w/T) || softmax(s/T)) + beta CE(s, argmax s)).
    """
    ce_self = F.cross_entropy(strong_logits, strong_logits.argmax(dim=-1), reduction="none")
    ce_weak = F.cross_entropy(strong_logits, weak_logits.argmax(dim=-1), reduction="none")
    beta = torch.sigmoid((ce_self - ce_weak) / tau).detach()  # the two-way softmax above
    kl = T * T * F.kl_div(F.log_softmax(strong_logits / T, dim=-1),
                          F.log_softmax(weak_logits / T, dim=-1),
                          reduction="none", log_target=True).sum(dim=-1)
    return ((1 - beta) * kl + beta * ce_self).mean()


def cpl_loss(strong_logits, weak_logits, tau=1.0, direction="summand"):
    """CPL, Eq. 4-5, one tau on both sides (p = softmax(logits / tau)).

    Eq. 5 prints KL(p^s || p^w) but sums p^w log(p^w / p^s) = KL(p^w || p^s). direction="summand"
    (default) computes the sum, the weak distribution as target (Hinton et al.'s direction);
    "printed" computes KL(p^s || p^w) = sum p^s log(p^s / p^w).
    """
    log_s = F.log_softmax(strong_logits / tau, dim=-1)
    log_w = F.log_softmax(weak_logits / tau, dim=-1)
    if direction == "printed":
        return F.kl_div(log_w, log_s, reduction="batchmean", log_target=True)
    return F.kl_div(log_s, log_w, reduction="batchmean", log_target=True)


def warmed_up(value, step, total, share=0.2):
    """`value` reached linearly from 0 over the first `share` of the steps (AuxConf's alpha,
    Burns et al.)."""
    return value * (min(1.0, step / (share * total)) if total else 1.0)


# Every loss in one place: its function, its keyword arguments at (step, total steps) from the
# run's hyperparameters h (the flags or a tuning grid point), and the ones hold-val tuning chooses.
# A new baseline is its function and one entry in BASELINES: it becomes the methods <name>-lp and
# <name>-tp, rows of Tables 2 and 3, a tuning grid and a choice of --method.
BASELINES = {
    "ce": (ce_loss, lambda h, step, total: {}, ()),
    "kd": (kd_loss, lambda h, step, total: {"T": h["kd_temperature"]}, ("kd_temperature",)),
    "auxconf": (auxconf_loss, lambda h, step, total: {"alpha": warmed_up(h["aux_alpha"], step, total)},
                ("aux_alpha",)),
    "adaptconf": (adaptconf_loss, lambda h, step, total: {"T": h["kd_temperature"],
                                                          "tau": h["adapt_tau"]}, ("kd_temperature",)),
}
ALL_LOSSES = {**BASELINES,
              "cpl": (cpl_loss, lambda h, step, total: {"tau": h["tau"], "direction": h["cpl_kl"]},
                      ("tau",))}
LOSS_NAMES = tuple(BASELINES)
LOSSES = {name: entry[0] for name, entry in ALL_LOSSES.items()}
# Section 5, step 4: the 20% of D'_hold "for parameter tuning". The paper names no parameter;
# these are the ones each loss leaves open (and the text tower's lr for cpl-text, `tuning_grid`).
TUNED_PARAMS = {name: entry[2] for name, entry in ALL_LOSSES.items()}
METHOD_HEAD_LOSS = {"cpl": ("cpl", "cpl"), "cpl-text": ("cpl-text", "cpl"),  # weak-to-strong
                    **{f"{loss}-{head}": (head, loss) for head in ("lp", "tp") for loss in LOSS_NAMES}}
METHODS = ("weak", "zero-shot", "ceiling") + tuple(METHOD_HEAD_LOSS)


def loss_hyper(loss, tau=1.0, kd_temperature=1.0, aux_alpha=0.5, adapt_tau=0.5, cpl_kl="summand"):
    """The hyperparameters of `loss` as a function (step, total_steps) -> kwargs (ALL_LOSSES)."""
    h = {"tau": tau, "kd_temperature": kd_temperature, "aux_alpha": aux_alpha,
         "adapt_tau": adapt_tau, "cpl_kl": cpl_kl}
    hyper = ALL_LOSSES[loss][1]
    return lambda step, total: hyper(h, step, total)


# ------------------------------------------------------------------------------------------------
# Training and evaluation of a head on cached features (step 3; step 4 with true labels)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(head, features, batch_size=65536):
    """Head logits for features [n, d] in chunks (a prompt head encodes its text once a chunk)."""
    head.eval()
    return torch.cat([head(features[i:i + batch_size]) for i in range(0, len(features), batch_size)])


def accuracy(logits, labels):
    """Fraction of rows whose argmax equals labels [n]."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def train_head(head, loss_fn, hyper, x, targets, x_val, val_targets, *, epochs, batch_size, lr,
               warmup_ratio=0.1, weight_decay=0.0, seed=0, param_lrs=None, probes=None,
               schedule="linear", max_grad_norm=1.0, select_by="loss", start_candidate=False,
               on_epoch=None):
    """Train `head` on features x [n, d] against target logits [n, k]; keep the best epoch.

    The loop of the Hugging Face Trainer the paper names (eval_strategy="epoch",
    load_best_model_at_end): AdamW, warm-up then `schedule` decay (SCHEDULES), gradient norm
    clipped to `max_grad_norm` (0: off), the best state loaded at the end. Candidates are the
    heads after each epoch, as the Trainer only loads checkpoints saved after training steps; the
    head before the first step is evaluated (curves' epoch 0, like `eval_on_start`) and is a
    candidate only with start_candidate=True (not the Trainer) or epochs=0. The best has the
    lowest loss_fn on x_val against val_targets [n_val, k] (select_by="loss", the Trainer's
    default; ties keep the earlier epoch, as its strict `np.less`) or the highest agreement with
    argmax(val_targets) ("agreement"). `hyper(step, total)` gives the loss's kwargs (hold-val losses
    use the final ones). `param_lrs` maps a parameter-name prefix to its own lr; `probes` maps a
    name to (features, labels) measured every epoch (Figure 2), never for selection; `on_epoch`,
    if given, is called with each epoch's row as it is made (a log written as training goes).
    Returns:
        dict with best_epoch, val_score (agreement), val_loss, curves (one row per epoch from 0),
        start_would_win (the head before training beats the best, a candidate or not) and
        warnings (no step with a positive lr; a hold-val loss that never moved); `head` holds the
        best state. A training or hold-val loss that is NaN or inf raises FloatingPointError.
    """
    g = torch.Generator().manual_seed(seed)
    params = [p for p in head.parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in head.named_parameters() if p.requires_grad
                          and n.startswith(pre)], "lr": plr} for pre, plr in (param_lrs or {}).items()]
    grouped = {id(p) for grp in groups for p in grp["params"]}
    groups.append({"params": [p for p in params if id(p) not in grouped]})
    opt = torch.optim.AdamW([grp for grp in groups if grp["params"]], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    multiplier = SCHEDULES[schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: multiplier(s, total, warmup_ratio))
    sets = {"val_score": (x_val, val_targets.argmax(dim=-1)), **(probes or {})}
    better = lambda a, b: (a["val_loss"] < b["val_loss"] if select_by == "loss"
                           else a["val_score"] > b["val_score"])  # strict: ties keep the earlier
    best, curves, step, stepped = None, [], 0, 0
    for epoch in tqdm(range(epochs + 1), desc="head", disable=not sys.stderr.isatty()):
        if epoch > 0:
            head.train()
            loss_sum = 0.0
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                loss = loss_fn(head(x[idx]), targets[idx], **hyper(step, total))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss.item()} at epoch "
                                             f"{epoch}, step {step + 1}")
                stepped += any(grp["lr"] > 0 for grp in opt.param_groups)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm > 0:  # HF Trainer: clip the norm over all parameters, then step
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                try:
                    opt.step()
                except RuntimeError as e:  # AdamW's step size lr / (1 - beta1^t) beyond float
                    if "overflow" not in str(e):
                        raise
                    raise FloatingPointError(f"the optimiser step overflowed at epoch {epoch}, "
                                             f"step {step + 1}") from None
                sched.step()
                step += 1
                loss_sum += loss.item() * len(idx)
            loss_mean = loss_sum / len(x)  # mean over the epoch
        feats = ([x] if epoch == 0 else []) + [f for f, _ in sets.values()]
        logits = predict(head, torch.cat(feats)).split([len(f) for f in feats])  # one text pass
        if epoch == 0:  # the starting point is a candidate; its loss is that of the whole set
            loss_mean = loss_fn(logits[0], targets, **hyper(0, total)).item()
            logits = logits[1:]
        row = {"epoch": epoch, "step": step, "loss": loss_mean,
               "val_loss": loss_fn(logits[0], val_targets, **hyper(total, total)).item(),
               **{name: accuracy(z, y) for (name, (_, y)), z in zip(sets.items(), logits)}}
        if not math.isfinite(row["val_loss"]):
            raise FloatingPointError(f"the hold-val loss became {row['val_loss']} at epoch {epoch}")
        curves.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if epoch == 0 and not (start_candidate or epochs == 0):
            continue
        if best is None or better(row, best):
            best = {"val_score": row["val_score"], "val_loss": row["val_loss"], "best_epoch": epoch,
                    "state": {n: p.detach().clone() for n, p in head.named_parameters()
                              if p.requires_grad}}  # the frozen text tower needs no copy
    head.load_state_dict(best.pop("state"), strict=False)
    start_would_win = best["best_epoch"] == 0 or better(curves[0], best)
    warnings = []
    if epochs > 0 and not stepped:
        warnings.append(f"none of the {step} optimiser steps had a positive learning rate "
                        f"(all in warm-up, or lr 0): the head is untrained")
    elif epochs > 0 and all(row["val_loss"] == curves[0]["val_loss"] for row in curves):
        warnings.append("the hold-val loss never moved: the head did not learn")
    return {**best, "curves": curves, "start_would_win": start_would_win, "warnings": warnings}


def tuning_grid(kind, loss, grids):
    """The hyperparameter points tried for a head and loss: the product of `grids[name]` over the
    parameters the method leaves open (TUNED_PARAMS, plus text_lr for cpl-text), in grid order.

    Args:
        grids: {"tau": [...], "kd_temperature": [...], "aux_alpha": [...], "text_lr": [...]}.
    Returns:
        list of dicts, e.g. [{"tau": 0.01}, {"tau": 0.1}]; [{}] for CE, which has none.
    """
    points = [{}]
    for name in TUNED_PARAMS[loss] + (("text_lr",) if kind == "cpl-text" else ()):
        points = [{**point, name: value} for point in points for value in grids[name]]
    return points


@torch.no_grad()
def tuning_score(val_logits, weak_val_logits, criterion="agreement", temperature=1.0):
    """How well a trained head fits hold-val's weak supervision, higher is better, on one scale for
    every grid point (a loss at temperature T is not comparable with one at another T).

    Args:
        val_logits, weak_val_logits: [n_val, k], the head's and the weak model's.
        criterion: "agreement", the share of rows where the argmaxes agree; or "weak-kl",
            -KL(softmax(w) || softmax(s / temperature)): the head's own class probabilities
            (temperature = tau for CPL, whose p^s is Eq. 4's, else 1) against the weak model's.
    """
    if criterion == "agreement":
        return accuracy(val_logits, weak_val_logits.argmax(dim=-1))
    return -F.kl_div(F.log_softmax(val_logits / temperature, dim=-1),
                     F.log_softmax(weak_val_logits, dim=-1), reduction="batchmean",
                     log_target=True).item()


def per_class_accuracy(logits, labels, num_classes):
    """Accuracy of each class [k] (nan for a class with no example)."""
    hits = (logits.argmax(dim=-1) == labels).float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.zeros(num_classes).index_add_(0, labels, hits) / counts


def worst_k_accuracy(class_acc, k=10):
    """Mean of the k lowest per-class accuracies (classes with no example are skipped)."""
    acc = class_acc[~class_acc.isnan()]
    return acc.sort().values[:k].mean().item()


@torch.no_grad()
def class_matching_margin(features, prototypes, labels, num_classes):
    """Class-wise matching margin (Shao et al. 2023, "the worst-performing categories" of CLIP).

    For image i of class y: cos(x_i, c_y) - max_{j != y} cos(x_i, c_j), averaged per class.
    Returns:
        (margins [k], nan for a class with no image; confused_with [k], the class that most often
        holds that max for the class's images).
    """
    cos = F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T  # (n, k)
    own = cos.gather(1, labels[:, None]).squeeze(1)
    rival = cos.scatter(1, labels[:, None], float("-inf")).max(dim=1)
    counts = torch.bincount(labels, minlength=num_classes).float()
    margins = torch.zeros(num_classes).index_add_(0, labels, (own - rival.values).float()) / counts
    pairs = torch.bincount(labels * num_classes + rival.indices, minlength=num_classes ** 2)
    return margins, pairs.view(num_classes, num_classes).argmax(dim=1)


def pgr(weak, strong, ceiling):
    """Performance gap recovered (Burns et al. 2023): (w2s - weak) / (ceiling - weak)."""
    return (strong - weak) / (ceiling - weak) if ceiling != weak else float("nan")


def pgr_text(weak, strong, ceiling):
    """PGR with two decimals, or `n/a` when ceiling <= weak: there is no gap to recover, and the
    ratio's sign flips so that the worst method would score highest."""
    return f"{pgr(weak, strong, ceiling):.2f}" if ceiling > weak else "n/a"


def agreement_report(logits, weak_logits, labels):
    """How a student relates to its supervisor on the same images (Burns et al. 2023's
    student-supervisor agreement): the share of predictions equal to the weak model's, and the
    accuracy where the weak model is right and where it is wrong (None where that set is empty).
    weak accuracy * right + (1 - weak accuracy) * wrong = accuracy."""
    pred, weak = logits.argmax(dim=-1), weak_logits.argmax(dim=-1)
    right = weak == labels
    acc = lambda m: (pred[m] == labels[m]).float().mean().item() if m.any() else None  # noqa: E731
    return {"agreement_with_weak": (pred == weak).float().mean().item(),
            "accuracy_where_weak_right": acc(right), "accuracy_where_weak_wrong": acc(~right)}


def n_predicted_classes(logits):
    """How many distinct classes the argmax of logits [n, k] predicts (1 = a collapsed head)."""
    return int(logits.argmax(dim=-1).unique().numel())


# ------------------------------------------------------------------------------------------------
# Caches and results: keyed by everything that determines them, written atomically
# ------------------------------------------------------------------------------------------------
def file_digest(*paths):
    """SHA-1 of the files' bytes, in order (16 hex digits)."""
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # a checkpoint can be gigabytes
                h.update(block)
    return h.hexdigest()[:16]


def cache_key(**parts):
    """A short stable hash of keyword arguments (anything json can print with str as fallback)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remove_stale_temps(folder, name="*"):
    """Delete the `.<name>.<pid>.tmp` files that atomic_save left in `folder` (not recursive) when
    a write failed or its process was killed; a file of a process still running is kept."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        match = re.fullmatch(r"\..+\.(\d+)\.tmp", tmp.name)
        if not match or int(match[1]) == os.getpid():
            continue
        try:
            os.kill(int(match[1]), 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (OSError, OverflowError):
            pass  # another user's process, or not a pid: leave it


def atomic_save(obj, path):
    """torch.save (JSON for a .json path; the bytes themselves for str or bytes) to a temporary
    file, then rename it into place.

    On a failed write the temporary file is removed; a full disk becomes a UserError naming the
    folder. Stale temporary files of `path` from dead processes are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == ".json":
            data = json.dumps(obj, indent=1, default=str).encode()
        elif isinstance(obj, (str, bytes)):  # a table, a figure
            data = obj.encode() if isinstance(obj, str) else obj
        else:
            buffer = io.BytesIO()  # torch's own writer hides the errno of a failed write
            torch.save(obj, buffer)
            data = buffer.getbuffer()
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on {path.parent} (writing {path.name}); free some "
                            f"space or point --cache-dir / --out-dir elsewhere") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); check the folder") from None
        raise


@contextlib.contextmanager
def file_lock(path):
    """An exclusive advisory lock (fcntl.flock) on the hidden file `.<name>.lock` beside `path`,
    held for the block: processes writing the same file take turns."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (some NFS, Lustre mounts)
            print(f"warning: cannot lock {path} ({e.strerror}); writing it without a lock",
                  file=sys.stderr, flush=True)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cache(path):
    """The object in cache file `path` (torch or .json), or None, with a one-line warning on
    stderr, if it cannot be loaded (truncated, damaged): caches are derived data."""
    try:
        if str(path).endswith(".json"):
            return json.loads(Path(path).read_text())
        return torch.load(path, weights_only=True)
    except Exception as e:  # any failure to read derived data means: compute it again
        print(f"warning: cache file {path} cannot be loaded ({one_line(e)}); recomputing it",
              file=sys.stderr, flush=True)
        return None


def cached(path, compute, force=False):
    """Load `path` if it exists (and not `force`) and loads, else compute, save atomically and
    return. Computing holds a lock on `path` (`file_lock`): a second process asking for the same
    entry waits, then loads what the first one wrote (`make jobs` runs share one cache)."""
    if os.path.exists(path) and not force:
        obj = load_cache(path)
        if obj is not None:
            return obj
    with file_lock(path):
        if os.path.exists(path) and not force:  # written while this process waited
            obj = load_cache(path)
            if obj is not None:
                return obj
        obj = compute()
        atomic_save(obj, path)
        log_computed(path)
    return obj


def log_computed(path):
    """Append `path` to the file named by $W2S_CLIP_CACHE_LOG, if set: which process computed
    which cache entry (O_APPEND: whole lines from concurrent processes)."""
    log = os.environ.get("W2S_CLIP_CACHE_LOG")
    if log:
        try:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
        except OSError as e:  # a log that cannot be written must not stop the run
            print(f"warning: W2S_CLIP_CACHE_LOG {log} cannot be written ({e.strerror})",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# The protocol (Section 5): weak model -> weak labels -> features -> heads, per seed
# ------------------------------------------------------------------------------------------------
def weak_stage(args, data, seed, device, precision="fp32"):
    """Steps 1-2: the weak model fine-tuned on D_train, then its logits on all of D_test, [n, k].

    Both are cached; the model under a key of its data (split files, image sizes and times),
    settings, seed, device type and precision (not the worker count: augmentation is seeded per
    sample). A cache file that cannot be loaded is recomputed.
    Returns:
        (logits [n, k], history: the weak training's per-epoch rows, or None when the model came
        from a cache without them).
    """
    k, root = len(data["classnames"]), os.path.realpath(args.data_root)
    key = cache_key(model=args.weak_model, pretrained=args.weak_pretrained, k=k, seed=seed,
                    epochs=args.weak_epochs, lr=args.weak_lr, batch=args.batch_size,
                    warmup=args.warmup_ratio, wd=args.weight_decay, domain=args.domain,
                    schedule=args.lr_schedule, clip=args.max_grad_norm,
                    root=root, splits=data["digest"], images=data.get("images"),
                    device=torch.device(device).type, precision=precision,
                    **({"micro": args.weak_micro_batch} if args.weak_micro_batch else {}),
                    **({"pixels": args.train_image_cache} if args.train_image_cache else {}))
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
    model, train_tf, eval_tf = create_weak_model(args.weak_model, k, args.weak_pretrained)

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


def feature_stage(args, data, device, precision="fp32"):
    """The CLIP model, its tokenizer, and its image features of all of D_test [n, d] (cached under
    a key of model, weights, transform, data, device type and precision)."""
    pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    clip_model, preprocess, tokenizer = load_clip(args.clip_model, pretrained, device)
    model_id, weights = clip_identity(args.clip_model, args.clip_pretrained)
    root = os.path.realpath(args.data_root)
    key = cache_key(model=model_id, pretrained=weights, transform=repr(preprocess),
                    domain=args.domain, root=root, splits=data["digest"],
                    images=data.get("images"),
                    device=torch.device(device).type, precision=precision)
    path = Path(args.cache_dir) / f"clip-{args.domain}-{Path(args.clip_model).stem}-{key}.pt"
    loader = make_loader(ImageList(root, data["test_paths"], data["test_labels"], preprocess),
                         args.batch_size, device, args.workers)
    feats = cached(path, lambda: encode_images(clip_model, loader, device, precision), args.force)
    return clip_model, tokenizer, feats


def zero_shot_prototypes(strong, classnames, prototype_init="single", prototype_norm="raw",
                         template="a photo of a {}", k_worst=10, descriptions=None):
    """CPL's starting prototypes [k, d] (Algorithm 1, line 2): the text embeddings of `template`
    ("a photo of a {y_i}"), the mean over open_clip's 80 templates (`ensemble`), or their CPE
    weighting (`cpe`, on the unlabeled features `strong["hold_features"]`, with `descriptions`
    {class index: sentences}), raw or L2-normalised.

    Computed once and kept in `strong` (one CLIP model, one domain; CPE once per seed): the
    ceiling's CPL head, the cpl and zero-shot runs and the zero-shot CMM report all start from
    this tensor. CPE's weights go to `strong["cpe"]`.
    """
    import open_clip
    if "prototypes" in strong:
        return strong["prototypes"]
    unit = prototype_norm == "unit"
    if prototype_init != "cpe":
        templates = [template] if prototype_init == "single" else open_clip.OPENAI_IMAGENET_TEMPLATES
        strong["prototypes"] = text_prototypes(strong["clip"], strong["tokenizer"], classnames,
                                               templates, normalize=unit)
        return strong["prototypes"]
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES
    emb = prompt_embeddings(strong["clip"], strong["tokenizer"], classnames, templates)
    weights, worst = cpe_weights(emb, strong["hold_features"], k_worst)
    extra = {i: prompt_embeddings(strong["clip"], strong["tokenizer"], [""],
                                  [lambda _, s=s: s for s in sentences])[0]  # each as written
             for i, sentences in (descriptions or {}).items()}
    strong["prototypes"] = weighted_prototypes(emb, weights.to(emb.device), unit, extra)
    strong["cpe"] = {"k_worst": k_worst, "templates": [t("{}") for t in templates],
                     "weights": weights.tolist(), "worst_k_cmm": worst.tolist(),
                     "described_classes": sorted(classnames[i] for i in extra)}
    return strong["prototypes"]


def make_head(kind, clip_model, tokenizer, classnames, dim, prototypes=None, cpl_logit_scale=1.0,
              lp_input="raw", template="a photo of a {}"):
    """The trainable head of a method: lp, tp, cpl (starting from `prototypes` [k, d]) or cpl-text
    (prompts `template`); CPL and cpl-text logits are `cpl_logit_scale` * cos (Eq. 3)."""
    if kind == "lp":
        return LinearHead(dim, len(classnames), normalize_input=lp_input == "normalized")
    if kind == "tp":
        return PromptHead(clip_model, tokenizer, classnames)
    if kind == "cpl-text":
        return TextEncoderHead(clip_model, tokenizer, classnames, template=template,
                               logit_scale=cpl_logit_scale)
    return PrototypeHead(prototypes, logit_scale=cpl_logit_scale)


def fit_head(kind, loss, targets, val_targets, strong, labels, splits, classnames, args, seed,
             epochs=None, values=None, train_idx=None, on_epoch=None):
    """Train one head on `train_idx` (default hold-train; targets [n_train, k]), select it on
    hold-val (val_targets [n_hv, k]), score D'_test; `epochs` (default --strong-epochs) 0 keeps
    the starting head. `values` overrides the flags tau, kd_temperature, aux_alpha, text_lr;
    `on_epoch` gets each epoch's row with the head kind and those values.

    `strong` holds the CLIP model, its tokenizer and the D_test features [n, d] on the device
    (and, once a CPL head needs them, the zero-shot prototypes).
    """
    set_seed(seed)
    v = {"tau": args.tau, "kd_temperature": args.kd_temperature, "aux_alpha": args.aux_alpha,
         "text_lr": args.text_lr, **(values or {})}
    feats = strong["feats"]
    protos = (zero_shot_prototypes(strong, classnames, args.prototype_init, args.prototype_norm,
                                   args.prompt_template, args.cpe_k, strong.get("descriptions"))
              if kind == "cpl" else None)
    head = make_head(kind, strong["clip"], strong["tokenizer"], classnames, feats.shape[1],
                     protos, args.cpl_logit_scale, args.lp_input,
                     args.prompt_template).to(feats.device)
    tr = splits["hold_train"] if train_idx is None else train_idx
    hv, te = splits["hold_val"], splits["test"]
    labels = labels.to(feats.device)
    hyper = loss_hyper(loss, v["tau"], v["kd_temperature"], v["aux_alpha"], args.adapt_tau,
                       args.cpl_kl)
    fit = train_head(head, LOSSES[loss], hyper, feats[tr], targets.to(feats.device),
                     feats[hv], val_targets.to(feats.device),
                     epochs=args.strong_epochs if epochs is None else epochs,
                     batch_size=args.batch_size, lr=args.lr, warmup_ratio=args.warmup_ratio,
                     weight_decay=args.weight_decay, seed=seed, schedule=args.lr_schedule,
                     max_grad_norm=args.max_grad_norm, select_by=args.select_by,
                     start_candidate=args.select_from == "start-and-epochs",
                     param_lrs={"text.": v["text_lr"]} if kind == "cpl-text" else None,
                     probes={"train_acc": (feats[tr], labels[tr]), "test_acc": (feats[te], labels[te])},
                     on_epoch=on_epoch and (lambda row: on_epoch({"head": kind, **(values or {}),
                                                                  **row})))
    return head, fit, predict(head, feats[te]).cpu()


def fit_tuned(kind, loss, weak_logits, strong, labels, splits, classnames, args, seed,
              on_epoch=None):
    """Step 4 with its parameter tuning: one head per point of `tuning_grid` (the flags' values
    under --tune none), each trained on hold-train's weak logits and selected on hold-val's; the
    point whose head scores best on hold-val by `tuning_score` (--tune-by) against the weak logits
    wins, ties to the earlier point. No true label takes part in the choice.

    Returns:
        (head, fit, test_logits, tuned: the winning values, tuning: one row per point with its
        hold-val score and loss, and its D'_test accuracy for analysis, never for selection).
    """
    ht, hv, te = splits["hold_train"], splits["hold_val"], splits["test"]
    grids = ({"tau": args.tau_grid, "kd_temperature": args.kd_temperature_grid,
              "aux_alpha": args.aux_alpha_grid, "text_lr": args.text_lr_grid}
             if args.tune == "hold-val" else
             {"tau": [args.tau], "kd_temperature": [args.kd_temperature],
              "aux_alpha": [args.aux_alpha], "text_lr": [args.text_lr]})
    best, tuning = None, []
    for values in tuning_grid(kind, loss, grids):
        head, fit, test_logits = fit_head(kind, loss, weak_logits[ht], weak_logits[hv], strong,
                                          labels, splits, classnames, args, seed, values=values,
                                          on_epoch=on_epoch)
        temperature = values["tau"] if kind in ("cpl", "cpl-text") else 1.0  # the head's own p^s
        score = tuning_score(predict(head, strong["feats"][hv]).cpu(), weak_logits[hv],
                             args.tune_by, temperature)
        tuning.append({"values": values, "score": score, "val_score": fit["val_score"],
                       "val_loss": fit["val_loss"], "best_epoch": fit["best_epoch"],
                       "test_accuracy": accuracy(test_logits, labels[te])})
        if best is None or score > best[0]:
            best = (score, head, fit, test_logits, values)
        del head  # hold at most the best head and the next (cpl-text copies the text tower)
    return best[1], best[2], best[3], best[4], tuning


def cmm_report(protos, feats, labels, weak_pred, classnames, k_worst=10):
    """CMM of class embeddings [k, d] on D'_test, with true and with weak labels, worst first."""
    report = {}
    for name, y in (("true_labels", labels), ("weak_labels", weak_pred)):
        margins, rival = class_matching_margin(feats.cpu(), protos.detach().cpu(), y, len(classnames))
        order = [int(i) for i in margins.argsort() if not margins[i].isnan()][:k_worst]
        report[name] = [{"class": classnames[i], "margin": margins[i].item(),
                         "confused_with": classnames[int(rival[i])]} for i in order]
    return report


def head_weights(head):
    """A trained head, small enough to keep with every run: its trainable parameters (LP's W and
    b, TP's context, CPL's prototypes) or, for cpl-text, which tunes the whole text tower, the class
    features it ends with (logits = scale * cos(x, features))."""
    if isinstance(head, TextEncoderHead):
        with torch.no_grad():
            return {"class_features": head.text_features().cpu()}
    return {n: p.detach().cpu() for n, p in head.named_parameters() if p.requires_grad}


def run_method(method, args, data, splits, weak_logits, strong, seed, on_epoch=None):
    """Steps 3-5 for one method and seed; returns its results (accuracies in [0, 1]). `on_epoch`
    gets every trained head's rows per epoch (every grid point, every ceiling head)."""
    labels, names, k = data["test_labels"], data["classnames"], len(data["classnames"])
    ht, hv, te = splits["hold_train"], splits["hold_val"], splits["test"]
    out = {}
    if method == "weak":
        test_logits = weak_logits[te]
    elif method == "ceiling":  # step 5: true labels of D_hold; the head most accurate on hold-val
        train = torch.cat([ht, hv]) if args.ceiling_data == "hold" else ht
        runs = {kind: fit_head(kind, "ce", F.one_hot(labels[train], k).float(),
                               F.one_hot(labels[hv], k).float(), strong, labels, splits, names,
                               args, seed, train_idx=train, on_epoch=on_epoch)
                for kind in ("lp", "tp", "cpl")}
        best = max(runs, key=lambda kind: runs[kind][1]["val_score"])
        head, fit, test_logits = runs[best]
        out["ceiling_head"], out["ceiling_data"], out["n_ceiling_train"] = best, args.ceiling_data, len(train)
        out["heads"] = {kind: {"val_score": f["val_score"], "test_accuracy": accuracy(t, labels[te])}
                        for kind, (_, f, t) in runs.items()}
    elif method == "zero-shot":  # CPL's starting head, no step
        kind = "cpl"
        head, fit, test_logits = fit_head(kind, "cpl", weak_logits[ht], weak_logits[hv], strong,
                                          labels, splits, names, args, seed, epochs=0,
                                          on_epoch=on_epoch)
    else:  # step 4: weak-to-strong, tuned and selected on hold-val's weak logits
        kind, loss = METHOD_HEAD_LOSS[method]
        head, fit, test_logits, out["tuned"], out["tuning"] = fit_tuned(
            kind, loss, weak_logits, strong, labels, splits, names, args, seed, on_epoch)
    if method not in ("weak", "ceiling"):
        if kind != "lp":
            with torch.no_grad():
                protos = head.prototypes if kind == "cpl" else head.text_features()
            out["cmm"] = cmm_report(protos, strong["feats"][te], labels[te],
                                    weak_logits[te].argmax(-1), names)
        if method == "cpl":  # the zero-shot prototypes CPL starts from
            zero_shot = zero_shot_prototypes(strong, names, args.prototype_init, args.prototype_norm,
                                             args.prompt_template, args.cpe_k,
                                             strong.get("descriptions"))
            out["cmm_zero_shot"] = cmm_report(zero_shot, strong["feats"][te], labels[te],
                                              weak_logits[te].argmax(-1), names)
    if strong and "cpe" in strong and method != "weak":  # the template weights this seed's prototypes use
        out["cpe"] = strong["cpe"]
    if method != "weak":
        out.update(best_epoch=fit["best_epoch"], val_score=fit["val_score"],
                   val_loss=fit["val_loss"], start_would_win=fit["start_would_win"],
                   warnings=fit["warnings"], curves=fit["curves"])
    out.setdefault("tuned", {})  # weak, zero-shot and the ceiling (CE) have nothing to tune
    out.setdefault("tuning", [])
    if method != "weak":
        out["_head"] = head_weights(head)  # saved as head.pt beside results.json
    out.update(agreement_report(test_logits, weak_logits[te], labels[te]),
               d_test_index=te.tolist(), d_test_labels=labels[te].tolist(),
               predictions=test_logits.argmax(dim=-1).tolist())  # per image, for later analysis
    class_acc = per_class_accuracy(test_logits, labels[te], k)
    return {"test_accuracy": accuracy(test_logits, labels[te]),
            "weak_test_accuracy": accuracy(weak_logits[te], labels[te]),
            "weak_label_accuracy_hold": accuracy(weak_logits[torch.cat([ht, hv])],
                                                 labels[torch.cat([ht, hv])]),
            "worst10_accuracy": worst_k_accuracy(class_acc),
            "n_predicted_classes": n_predicted_classes(test_logits),
            "per_class_accuracy": [None if math.isnan(a) else a for a in class_acc.tolist()],  # JSON
            **out}


# ------------------------------------------------------------------------------------------------
# Reporting: Tables 2-4 and Figure 2 from the results.json files, never from logs
# ------------------------------------------------------------------------------------------------
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


RESULT_KEYS = ("domain", "method", "seed", "test_accuracy", "worst10_accuracy", "config")


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
    if r["method"] not in METHODS:
        problems.append(f"method is {r['method']!r}, not one of w2s_clip's")
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
            and all(number(row[k]) for k in ("train_acc", "test_acc") if k in row)
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
    """Every readable results.json under out_dir as a flat row (`result_row`); unreadable ones are
    named and skipped. Two files of one run (same domain, method, seed and settings, e.g. a copied
    folder) count once: the one nearest out_dir is kept and a note names the other. Runs of other
    settings are all kept: `comparable_runs` decides which ones a table combines."""
    rows, seen = [], {}
    paths = sorted(Path(out_dir).rglob("results.json"), key=lambda p: (len(p.parts), str(p)))
    for path in paths:
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
WEAK_SETTINGS = ("weak_model", "weak_pretrained", "weak_epochs", "weak_lr", "batch_size",
                 "warmup_ratio", "weight_decay", "lr_schedule", "max_grad_norm", "weak_micro_batch",
                 "train_image_cache", "data_root", "splits", "domain", "dataset", "split_share",
                 "split_seed", "device", "precision")  # all that decides a weak run (weak_stage)


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
    def relevant(r):  # a weak run depends on the weak stage's settings only
        s = r["settings"]
        return {k: v for k, v in s.items() if k not in vary
                and (r["method"] != "weak" or k in WEAK_SETTINGS)}

    keys = [cache_key(**relevant(r)) if isinstance(r.get("settings"), dict) else None for r in rows]
    notes, kept, seen, merged = [], [], set(), 0
    groups = {weak: [k for r, k in zip(rows, keys) if k is not None and (r["method"] == "weak") == weak]
              for weak in (False, True)}
    main = {weak: max(sorted(set(ks)), key=ks.count) if ks else None for weak, ks in groups.items()}
    ref = {weak: relevant(next(r for r, k in zip(rows, keys) if k == main[weak]))
           for weak in main if main[weak] is not None}
    other, names = [], set()
    for r, k in zip(rows, keys):
        weak = r["method"] == "weak"
        same = (r["seed"], cache_key(**{n: v for n, v in r["settings"].items() if n in WEAK_SETTINGS})
                ) if weak and k is not None else None  # the whole weak run, table axes included
        if same is not None and same in seen:
            merged += 1  # the same weak run, copied into each folder of a sweep
            continue
        seen.add(same)
        if k not in (None, main[weak]):  # a sweep, or other settings: a row of its own
            mine = relevant(r)
            label = setting_label(mine, ref[weak], ())
            names |= {n for n in mine.keys() | ref[weak].keys() if mine.get(n) != ref[weak].get(n)}
            other.append(r)
            r = {**r, "method": f"{r['method']} ({label})", "variant_of": r["method"]}
        kept.append(r)
    if other:
        plain = ", ".join(f"{n}={short_value(ref[False if False in ref else True].get(n))}"
                          for n in sorted(names))
        notes.append(f"{len(other)} runs made with other settings than the other "
                     f"{len(kept) - len(other)} are rows of their own, named by what differs "
                     f"(the rows without a label have {plain}), e.g. {other[0]['path']}")
    if merged:
        notes.append(f"{merged} weak runs repeat another with the same weak-model settings (a "
                     f"sweep's folders each hold one): counted once")
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
    unchecked = sum(k is None for k in keys)
    if unchecked and any(groups.values()):
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


def is_baseline(method):
    """An LP or TP weak-to-strong row (e.g. `kd-tp`, `kd-tp (tau=0.1)`): what CPL is compared with."""
    return method.split(" (")[0] in METHOD_HEAD_LOSS and not method.startswith("cpl")


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


def differences_table(title, rows, col_key, col_names, baselines):
    """differences.md's section for one table: `+d [low, high]` per column and Avg."""
    diffs = differences(rows, col_key, col_names, baselines)
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
    count = lambda key, value: sum(r[key] == value for r in rows)
    dataset = max(sorted({r["dataset"] for r in rows}), key=lambda d: count("dataset", d))
    other_data = [r for r in rows if r["dataset"] != dataset]
    rows = [r for r in rows if r["dataset"] == dataset]
    clip_model = max(sorted({r["clip_model"] for r in rows}), key=lambda c: count("clip_model", c))
    others = [r for r in rows if r["clip_model"] != clip_model]
    rows = [r for r in rows if r["clip_model"] == clip_model]
    if dataset != "domainnet":  # the paper's numbers belong beside DomainNet runs only
        paper, domains = {}, sorted({r["domain"] for r in rows},
                                    key=lambda d: (d.lower() not in DOMAINS, d))
    rows, notes = comparable_runs(rows)
    variants = {(r["variant_of"], r["method"]) for r in rows if r.get("variant_of")}
    with_variants = lambda names: [v for n in names for v in  # noqa: E731
                                   [n, *sorted(m for base, m in variants if base == n)]]
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
    table4_rows = ("zero-shot", "zero-shot (ensemble init)", "zero-shot (cpe init)", "cpl",
                   "cpl (ensemble init)", "cpl (cpe init)", "cpl-text")
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
            diff_title = f"{title.split(':')[0]}: CPL minus ..., points, 95% interval"
            difference_parts.append(differences_table(
                diff_title, subset, col_key, col_names,
                [n for n in names if is_baseline(n)]))
        files[f"{table_id}.md"] = text
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


TABLE_FILES = ("runs.csv", "table2.md", "table3.md", "table4.md", "paper_gap.md", "figure2.csv",
               "figure2.png", "differences.md", "imitation.csv", "imitation.png")  # build_tables owns them
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
    temps = {}
    try:
        for name, data in files.items():
            remove_stale_temps(folder, name)  # of a killed build
            temps[name] = folder / f".{name}.{os.getpid()}.tmp"
            atomic_save(data, temps[name])
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for name, tmp in temps.items():
        os.replace(tmp, folder / name)
    for name in set(owned) - set(files):
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


def figure2(rows, grid, domains=DOMAINS, methods=("auxconf-tp", "cpl", "auxconf-lp"), paper=None):
    """Figure 2: train/test accuracy per epoch of three methods (mean over seeds, ± std band),
    weak and ceiling levels, on the first of `domains` that has curves (clipart for the full
    grid); the paper's levels (`paper[("figure2", level, domain)]`) in brackets beside ours. Train
    accuracy is against each run's own training labels (weak labels; true ones for a ceiling).
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
            for split in ("train_acc", "test_acc"):
                row[split], row[split.replace("acc", "std")] = mean_std([100 * p[split] for p in pts])
            series.append(row)
    files = {"figure2.csv": csv_text(series, ["domain", "method", "epoch", "step", "seeds",
                                              "train_acc", "train_std", "test_acc", "test_std"])}
    plt = pyplot()
    if plt is None:
        return files
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("train_acc", "test_acc")):
        for m in dict.fromkeys(s["method"] for s in series):  # only methods with curves
            pts = [s for s in series if s["method"] == m]
            x, y = [s["step"] for s in pts], [s[split] for s in pts]
            sd = [s[split.replace("acc", "std")] for s in pts]
            line, = ax.plot(x, y, marker="o", label=f"{m} (n={pts[0]['seeds']})")
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        for level in ("weak", "ceiling"):
            if (level, domain) in grid:
                ours = mean_std(grid[(level, domain)])[0]
                ref = (paper or {}).get(("figure2", level, domain))
                ax.axhline(ours, ls="--", color="gray", lw=1)
                ax.annotate(f"{level} {ours:.2f}" + (f" [{ref:.2f}]" if ref is not None else ""),
                            (0.99, ours), xycoords=("axes fraction", "data"), ha="right",
                            va="bottom", color="gray", fontsize=8)
        what = ("train accuracy (against its training labels: weak)" if split == "train_acc"
                else "test accuracy (D'_test, true labels)")
        ax.set(title=f"{domain}: {what}", xlabel="step", ylabel="accuracy (%), mean ± std")
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=8)
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


# ------------------------------------------------------------------------------------------------
# Checks before any work, and the command line's main()
# ------------------------------------------------------------------------------------------------
def check_models(args):
    """Stop early on an unknown timm/open_clip model name or a pretrained tag it does not have."""
    import open_clip
    import timm
    if args.weak_model.startswith("hf:"):
        import_transformers(args.weak_model)  # its config is checked below, once reachable
    elif not timm.is_model(args.weak_model):
        raise UserError(f"--weak-model {args.weak_model}: not a timm model (see timm.list_models()) "
                        f"nor hf:<Hugging Face id>")
    elif args.weak_pretrained and not timm.list_pretrained(args.weak_model):
        raise UserError(f"--weak-model {args.weak_model} has no pretrained weights; pick a tagged "
                        f"name from timm.list_pretrained() or pass --no-weak-pretrained")
    name, tag = args.clip_model, args.clip_pretrained
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise UserError(f"--clip-model {name}: config file not found")
        if tag.lower() != "none" and not os.path.isfile(tag):
            raise UserError(f"--clip-model {name} is a config: pass --clip-pretrained none or a file")
        try:
            cfg = json.loads(Path(name).read_text(encoding="utf-8-sig"))
        except ValueError as e:
            raise UserError(f"--clip-model {name}: not valid JSON ({e})")
        if not (isinstance(cfg, dict) and isinstance(cfg.get("embed_dim"), int)
                and isinstance(cfg.get("vision_cfg"), dict) and isinstance(cfg.get("text_cfg"), dict)):
            raise UserError(f"--clip-model {name}: not an open_clip model config (a JSON object "
                            f"with an int embed_dim and objects vision_cfg and text_cfg)")
    else:
        if name not in open_clip.list_models():
            raise UserError(f"--clip-model {name}: not an open_clip model (open_clip.list_models())")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag.lower() != "none" and tag not in tags and not os.path.isfile(tag):
            raise UserError(f"--clip-pretrained {tag}: {name} has tags {', '.join(tags) or 'none'}")
        cfg = open_clip.get_model_config(name)
    text = cfg.get("text_cfg", {})
    if (cfg.get("custom_text") or text.get("hf_model_name") or text.get("no_causal_mask")
            or text.get("pool_type", "argmax") not in ("argmax", "eos")):
        raise UserError(f"--clip-model {name}: TP and CPL need open_clip's CLIP text transformer "
                        f"with a causal mask and end-of-text pooling; pick a model like ViT-B-32")
    check_clip_files(name, tag)
    from weights_w2s_clip import offline_problem  # a weight missing offline: say so at once
    problem = offline_problem(name, tag, args.weak_model, args.weak_pretrained)
    if problem:
        raise UserError(problem)
    if args.weak_model.startswith("hf:"):
        check_hf_weak_model(args.weak_model)


def check_clip_files(model_name, pretrained):
    """Stop early if a JSON --clip-model config does not build a CLIP, or a --clip-pretrained
    file is not a checkpoint for it: built on the meta device (no memory, no compute), the
    checkpoint's tensors matched by name and shape with open_clip's own load_checkpoint."""
    import open_clip
    is_file = pretrained.lower() != "none" and os.path.isfile(pretrained)
    if not (model_name.endswith(".json") or is_file):
        return  # an open_clip name with a tag: open_clip checks both
    name = Path(model_name).stem if model_name.endswith(".json") else model_name
    logging.disable(logging.WARNING)  # open_clip logs "no pretrained weights loaded"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta tensors is a no-op, by design
            if model_name.endswith(".json"):
                open_clip.add_model_config(model_name)
            model = open_clip.create_model(name, device="meta")
            if is_file:
                try:
                    open_clip.load_checkpoint(model, pretrained)
                except Exception as e:  # torch.load or load_state_dict on a user's file
                    reason = ("not a torch.save file" if isinstance(e, pickle.UnpicklingError)
                              else one_line(e))
                    raise UserError(f"--clip-pretrained {pretrained}: not a checkpoint for "
                                    f"{name} ({reason}); pass the matching file or "
                                    f"--clip-pretrained none")
    except (TypeError, ValueError, RuntimeError, AttributeError, KeyError) as e:
        raise UserError(f"--clip-model {model_name}: not a buildable open_clip config "
                        f"({one_line(e)}); compare with open_clip's configs")
    finally:
        logging.disable(logging.NOTSET)


def check_device(device):
    """The torch device string `device` after a one-element allocation on it; a UserError if this
    build or machine has no such device."""
    try:
        dev = torch.device(device)
        if dev.type == "meta":
            raise RuntimeError("the meta device holds no data")
        torch.zeros(1, device=dev)
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
        raise UserError(f"--device {device}: not usable here ({one_line(e, 100)}); "
                        f"pass --device cpu, cuda or cuda:<index>") from None
    return str(dev)


def gpu_build_problem(capability, arch_list, version=None):
    """Why this torch build cannot run a GPU of compute capability (major, minor), or None.

    It can when its arch list has the GPU's sm_XY, an sm of the same major and a lower minor
    (binary compatible), or PTX compute_XY with XY at most the GPU's (compiled at load time).
    """
    cc = 10 * capability[0] + capability[1]
    sm = {int(a[3:]) for a in arch_list if a.startswith("sm_") and a[3:].isdigit()}
    ptx = {int(a[8:]) for a in arch_list if a.startswith("compute_") and a[8:].isdigit()}
    if any(a // 10 == cc // 10 and a <= cc for a in sm) or any(p <= cc for p in ptx):
        return None
    return (f"the installed torch {version or torch.__version__} has GPU kernels for "
            f"{' '.join(sorted(arch_list)) or 'no GPU'}, not for this GPU's sm_{cc}")


def hardware_report(device, precision):
    """What a run ran on (for results.json and the `device:` line): the device, its name and compute
    capability, the precision, and the torch / CUDA / cuDNN versions."""
    dev = torch.device(device)
    report = {"device": str(dev), "precision": precision, "torch": torch.__version__}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        report.update(device=f"cuda:{index}", name=torch.cuda.get_device_name(index),
                      capability=f"sm_{major}{minor}", cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    else:
        report.update(name=dev.type, threads=torch.get_num_threads())
    return report


def device_line(report):
    """`device: cuda:0, NVIDIA A100-SXM4-40GB, sm_80, bf16` or `device: cpu, fp32`."""
    parts = [report["device"], report.get("name"), report.get("capability"), report["precision"]]
    return "device: " + ", ".join(p for p in dict.fromkeys(parts) if p)


def choose_device(requested, precision):
    """The device (string), precision and hardware report of a run: --device checked, or CUDA when
    usable, else the CPU; a GPU this torch build has no kernels for is a UserError."""
    try:
        dev = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        dev = None  # check_device names the bad string
    capability = None
    if (dev is not None and dev.type == "cuda" and torch.cuda.is_available()
            and (dev.index or 0) < torch.cuda.device_count()):  # before any kernel runs on it
        capability = torch.cuda.get_device_capability(dev)
        problem = None if torch.version.hip else gpu_build_problem(capability,
                                                                  torch.cuda.get_arch_list())
        if problem:
            raise UserError(f"--device {dev}: {problem}; install a torch build for it (README, "
                            f"Running on a GPU: `make venv TORCH_INDEX=...`) or pass --device cpu")
    device = check_device(requested) if requested else str(dev)
    precision = resolve_precision(precision, torch.device(device).type, capability)
    return device, precision, hardware_report(device, precision)


def cpu_cost_warning(n_train, n_test, seeds, weak_epochs):
    """A `warning:` line for a large domain about to run on the CPU, with its rough cost from the
    CPU rates of the README's bench (13.8 CLIP images/s, 9.4 weak training images/s, strong heads
    with tuning about 11 CLIP passes per seed); None for a small one."""
    if n_train + n_test < 20000:
        return None
    hours = (n_test / 13.8 * (1 + 11 * seeds) + seeds * weak_epochs * n_train / 9.4) / 3600
    return (f"warning: no usable GPU, so this runs on the CPU: roughly {hours:.0f} h for "
            f"{n_train + n_test} images and {seeds} seeds (docs/speed.md); pass --device cpu to "
            f"mean it, or see README, Running on a GPU")


def check_hf_weak_model(name):
    """Stop early unless `hf:<id>` names a transformers image classifier whose config loads."""
    transformers = import_transformers(name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    try:
        config = transformers.AutoConfig.from_pretrained(name[3:])
    except (OSError, ValueError) as e:  # unknown id, no network and not cached, a bad folder
        raise UserError(f"--weak-model {name}: no Hugging Face model config found "
                        f"({str(e).splitlines()[0]}); check the id and the network")
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(f"--weak-model {name}: a {config.model_type} model, not an image classifier")


def split_count_note(domain, n_train, n_test, num_classes, paper=PAPER):
    """One line when a DomainNet domain (345 classes) lists other counts than the paper's Table 1
    (`paper[("table1", domain, "#train" / "#test")]`), else None; the run goes on either way."""
    ref = (paper.get(("table1", domain, "#train")), paper.get(("table1", domain, "#test")))
    if num_classes != 345 or None in ref or ref == (n_train, n_test):
        return None
    return (f"note: {domain}_train.txt / {domain}_test.txt list {n_train} / {n_test} images, the "
            f"paper's Table 1 (DomainNet cleaned) {ref[0]} / {ref[1]}; an uncleaned download is "
            f"the usual cause; going on")


def read_class_descriptions(path, classnames):
    """{class index: sentences} from a JSON file {class name: [sentences]} (names as the run
    prints them, or with `_` for spaces); one line naming the problem otherwise."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--class-descriptions {path}: cannot read it as JSON ({one_line(e)})")
    if not isinstance(obj, dict):
        raise UserError(f"--class-descriptions {path}: expected an object {{class name: [sentences]}}")
    index = {n: i for i, n in enumerate(classnames)}
    out = {}
    for name, sentences in obj.items():
        i = index.get(name, index.get(str(name).replace("_", " ")))
        if i is None:
            raise UserError(f"--class-descriptions {path}: {name!r} is not a class of this domain "
                            f"(e.g. {', '.join(repr(n) for n in classnames[:3])})")
        if not (isinstance(sentences, list) and sentences
                and all(isinstance(t, str) and t.strip() for t in sentences)):
            raise UserError(f"--class-descriptions {path}: {name!r} needs a non-empty list of "
                            f"sentences")
        out[i] = sentences
    return out


def small_test_note(n, limit=1000):
    """A note when D'_test (n images) is too small to rank methods a few points apart: one image
    is 100/n points and an accuracy near 50% has a binomial standard error of 50/sqrt(n) points."""
    if n >= limit:
        return None
    return (f"note: D'_test has {n} images per seed: one image is {100 / n:.2f} points and an "
            f"accuracy near 50% has a standard error of ±{50 / math.sqrt(n):.1f} points, so "
            f"methods a few points apart are not ranked by one seed (more test images or seeds)")


def check_writable(folder, flag):
    """Stop early if `folder` cannot be created or written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder; pick a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = Path(folder) / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{flag} {folder}: no space left on {folder}; free some space or pick "
                            f"another folder")
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); pick another folder")


def result_path(out_dir, domain, method, seed):
    """Where a run's results.json goes."""
    return Path(out_dir) / domain / method / f"seed{seed}" / "results.json"


def summary_box(out_dir, domain, seed, methods, settings=None):
    """A box of weak, `methods` and ceiling accuracy on D'_test (with PGR), from whichever
    results.json exist for this domain and seed and, given `settings` (run_settings' dict),
    were made with them; a line under the box names the runs left out and why."""
    acc, left_out, found = {}, [], []
    for m in ["weak", *[m for m in methods if m not in ("weak", "ceiling")], "ceiling"]:
        path = result_path(out_dir, domain, m, seed)
        r = read_result(path, "left out of the box") if path.exists() else None
        if r is not None and settings is not None and (settings_key(r.get("settings"))
                                                       != settings_key(settings)):
            left_out.append(f"{m} ({describe_difference(r.get('settings'), settings)})")
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


EPOCH_FIELDS = ("head", "tau", "kd_temperature", "aux_alpha", "text_lr", "epoch", "step", "loss",
                "val_loss", "val_score", "train_acc", "test_acc")  # a run's epochs.csv


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


def settings_key(settings):
    """The hash of a run's settings (run_settings' dict, as results.json holds it); an older
    results.json holds only this hash, a str, which is returned as it is; else None."""
    if isinstance(settings, dict):
        return cache_key(**settings)
    return settings if isinstance(settings, str) else None


def describe_difference(old, new, ignore=()):
    """`name: old -> new` for each setting in which dicts `old` and `new` differ (values cut to
    40 characters); for an `old` that is not a dict, says it holds only a hash."""
    if not isinstance(old, dict):
        return ("an older results.json that records only a hash of its settings"
                if isinstance(old, str) else "a results.json that records no settings")
    cut = lambda v: (str(v)[:37] + "...") if len(str(v)) > 40 else str(v)
    names = sorted(k for k in old.keys() | new.keys() if k not in ignore and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {cut(old.get(k))} -> {cut(new.get(k))}" for k in names)


def run_experiment(args):
    """The paper's protocol for one domain: for each seed, every requested method."""
    device, precision, hardware = choose_device(args.device, args.precision)
    print(device_line(hardware), flush=True)
    methods = list(METHODS) if "all" in args.method else list(dict.fromkeys(args.method))
    split_root = None
    if args.dataset != "domainnet":  # another layout: DomainNet-format split files written first
        from datasets_w2s_clip import write_splits
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
    if args.device is None and device == "cpu":
        warning = cpu_cost_warning(len(data["train_labels"]), len(data["test_labels"]),
                                   len(args.seeds), args.weak_epochs)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    note = args.dataset == "domainnet" and split_count_note(
        args.domain, len(data["train_labels"]), len(data["test_labels"]), len(data["classnames"]))
    if note:
        print(note, flush=True)
    check_models(args)
    check_writable(args.out_dir, "--out-dir")
    check_writable(args.cache_dir, "--cache-dir")
    remove_stale_temps(args.cache_dir)  # left by a full disk or a killed run
    sizes = {name: len(i) for name, i in protocol_splits(len(data["test_labels"]), 0).items()}
    if min(sizes.values()) == 0:
        raise UserError(f"{args.data_root}/{args.domain}_test.txt lists {len(data['test_labels'])} "
                        f"images, too few: the splits {sizes} must all be non-empty")
    if args.class_descriptions and args.prototype_init != "cpe":
        raise UserError("--class-descriptions enriches CPE's ensemble: add --prototype-init cpe")
    descriptions = (read_class_descriptions(args.class_descriptions, data["classnames"])
                    if args.class_descriptions else None)
    note = small_test_note(sizes["test"])
    if note:
        print(note, flush=True)
    settings = run_settings(args, data, device, precision)
    todo = {}
    for seed in args.seeds:
        todo[seed] = []
        for m in methods:
            path = result_path(args.out_dir, args.domain, m, seed)
            old = read_result(path, "the run is redone") if path.exists() and not args.force else None
            if old is not None:
                if settings_key(old.get("settings")) != settings_key(settings):
                    raise UserError(f"{path} was made with other settings "
                                    f"({describe_difference(old.get('settings'), settings)}); "
                                    f"pass --force to replace it or use another --out-dir")
                continue
            todo[seed].append(m)
    if not any(todo.values()):
        for seed in args.seeds:  # what they hold, as the run that made them printed it
            print(summary_box(args.out_dir, args.domain, seed, methods, settings))
        print(f"all runs exist under {args.out_dir}/{args.domain}; --force recomputes them")
        return
    data["images"] = check_images_once(args.data_root, data["train_paths"] + data["test_paths"],
                                       args.cache_dir, args.domain)
    strong = None
    for seed, seed_methods in todo.items():
        if not seed_methods:
            continue
        splits = protocol_splits(len(data["test_labels"]), seed)
        try:
            weak_logits, weak_history = weak_stage(args, data, seed, device, precision)
        except FloatingPointError as e:
            raise UserError(f"{args.domain} seed {seed} weak: {e}; lower --weak-lr (now "
                            f"{args.weak_lr:g})") from None
        if strong is None and set(seed_methods) - {"weak"}:
            clip_model, tokenizer, feats = feature_stage(args, data, device, precision)
            strong = {"clip": clip_model, "tokenizer": tokenizer, "feats": feats.to(device),
                      "descriptions": descriptions}
        if strong is not None and args.prototype_init == "cpe":  # CPE weighs on this seed's hold-train
            strong.pop("prototypes", None)
            strong["hold_features"] = strong["feats"][splits["hold_train"]]
        for method in seed_methods:
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.time()
            path = result_path(args.out_dir, args.domain, method, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path.parent, "epochs.csv")  # the log of a run killed earlier
            log_path = path.with_name(f".epochs.csv.{os.getpid()}.tmp")  # epochs.csv once done
            try:
                with open(log_path, "w", newline="") as log:  # per epoch, as training goes
                    writer = csv.DictWriter(log, EPOCH_FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    result = run_method(method, args, data, splits, weak_logits, strong, seed,
                                        on_epoch=lambda row: (writer.writerow(row), log.flush()))
            except BaseException as e:  # no log without its results.json
                log_path.unlink(missing_ok=True)
                if not isinstance(e, FloatingPointError):
                    raise
                raise UserError(f"{args.domain} seed {seed} {method}: {e}; lower --lr (now "
                                f"{args.lr:g}) or check --tau-grid, --cpl-logit-scale, "
                                f"--kd-temperature-grid") from None
            for warning in result.get("warnings", []):
                print(f"warning: {args.domain} seed {seed} {method}: {warning}", file=sys.stderr,
                      flush=True)
            head = result.pop("_head", None)
            if method == "weak":
                result["weak_training"] = weak_history  # per epoch; None from an older cache
            result.update(domain=args.domain, method=method, seed=seed, classnames=data["classnames"],
                          hardware=hardware,
                          n_weak_train=len(data["train_labels"]),
                          **{f"n_{s}": len(i) for s, i in splits.items()},
                          seconds=time.time() - start, settings=settings,
                          settings_key=settings_key(settings), config=vars(args))
            if torch.device(device).type == "cuda":
                result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            with file_lock(path):  # check and write as one step: a concurrent run loses nothing
                other = read_result(path, "replaced") if path.exists() else None
                if (other is not None and not args.force
                        and settings_key(other.get("settings")) != settings_key(settings)):
                    raise UserError(f"{path} was written by another command meanwhile, with other "
                                    f"settings ({describe_difference(other.get('settings'), settings)}"
                                    f"); kept it: rerun with another --out-dir")
                if head is not None:  # before results.json: a finished run has its head
                    atomic_save(head, path.with_name("head.pt"))
                atomic_save(result, path)
                os.replace(log_path, path.with_name("epochs.csv"))  # the log of this result
            tuned = "".join(f", {name} {value:g}" for name, value in result["tuned"].items())
            print(f"{args.domain} seed {seed} {method}: {100 * result['test_accuracy']:.2f}% on "
                  f"D'_test in {result['seconds']:.1f} s{tuned} -> {path}", flush=True)
        print(summary_box(args.out_dir, args.domain, seed, methods, settings))


def main(argv=None):
    """Parse the flags and run; a UserError becomes one line on stderr and exit status 1."""
    args = parse_args(argv)
    try:
        if args.make_demo:
            import minidomainnet  # the synthetic miniature; imports this module, never the reverse
            minidomainnet.make_demo(args.make_demo, layout="folder")
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
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or (args.tables_dir if args.build_tables else args.make_demo
                               or f"{args.out_dir} or {args.cache_dir}")
        sys.exit(f"error: no space left on {where}; free some space and run the command again")


if __name__ == "__main__":
    sys.modules.setdefault("w2s_clip", sys.modules[__name__])  # one UserError for lazy imports
    main()
