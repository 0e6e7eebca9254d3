"""Weak-to-strong generalization for CLIP-based classification, with class prototype learning (CPL).

Reference implementation of J. Li, S. M. Erfani, L. Feng, J. Bailey and F. Liu, "Exploring
Weak-to-Strong Generalization for CLIP-based Classification", TMLR 2025 (arXiv:2511.18396): a weak
model fine-tuned on true labels labels held-out images; a frozen open_clip image tower plus one
trainable head (LP, TP or CPL) learns from those weak labels only. Manual: README.md.

    python w2s_clip.py --domain sketch --method cpl  # DomainNet sketch, five seeds (GPU)
    python w2s_clip.py --domain sketch --method all --seeds 0  # every method; caches shared
    python w2s_clip.py --data-root my_domainnet --domain clipart --method weak zero-shot ceiling cpl
    make demo  # the CPU miniature, no download (w2s_clip_lab/, a few minutes)

This file is the paper whole and alone: its method in the paper's order, then the protocol of
Section 5 on DomainNet's files (splits, weak model, weak labels, CLIP features, heads, results.json
per method and seed) and its command line. It imports nothing of the project; w2s_clip_lab/ builds
on it (tables, the miniature, other layouts, Hugging Face weak models, CPE; README).
"""
import argparse
import contextlib
import copy
import csv
import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
import posixpath
import random
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")  # DomainNet's
PACKAGE_COMMAND = "python -m w2s_clip_lab.run"  # the same flags plus the package's own


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a file); main() prints it as one line."""


def one_line(error, limit=160):
    """The first informative line of an exception's message (a heading ending in ':' is joined to
    the line after it; the exception's type for an empty one), cut to `limit` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_seed(seed):
    """Seed Python's, torch's and every CUDA device's generators."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# ---- Data and splits (Section 5, step 0): DomainNet's split files, its images, D_test's splits ------
def read_split_file(path):
    """Parse an official DomainNet split file, one `<domain>/<class>/<file> <label>` per line (UTF-8,
    a byte-order mark accepted, each image once; paths normalised as written by posixpath.normpath).

    Returns:
        (paths, labels): relative image paths (list of n str) and labels (LongTensor [n]).
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"split file {path} not found; get it with `make data DOMAIN=<domain>`") from None
    except UnicodeDecodeError as e:
        lineno = e.object[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save it as UTF-8 or "
                        f"re-download it") from None
    paths, labels, first = [], [], {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        image = posixpath.normpath(parts[0]) if len(parts) == 2 else ""
        if image.lstrip("/").count("/") < 2 or not re.fullmatch(r"-?\d+", parts[-1]):
            raise UserError(f"{path}:{lineno}: expected '<domain>/<class>/<file> <label>', got "
                            f"{line.strip()!r}; re-download the split file")
        if not -2 ** 63 <= int(parts[1]) < 2 ** 63:  # beyond torch's int64
            raise UserError(f"{path}:{lineno}: label {parts[1]} is far too large for a class index; "
                            f"re-download the split file")
        if image in first:
            raise UserError(f"{path}:{lineno} lists {image} again (first at line {first[image]}); "
                            f"each image must appear once: re-download the split file")
        first[image] = lineno
        paths.append(image)
        labels.append(int(parts[1]))
    if not paths:
        raise UserError(f"{path} is empty; re-download it with `make data`")
    return paths, torch.tensor(labels)


def classnames_from_splits(paths, labels, source="split files"):
    """Class names in label order, from the class folder of each file (`_` -> space): DomainNet's
    label order is not `sorted(folders)`. A label used for two folders, or one outside 0..k-1 (k
    class folders), is a UserError. Returns a list of k names."""
    folders = {}  # label -> its class folders
    for p, y in zip(paths, labels.tolist()):
        folders.setdefault(y, set()).add(p.split("/")[-2])
    for y in sorted(folders):
        if len(folders[y]) > 1:
            a, b = sorted(folders[y])[:2]
            raise UserError(f"{source}: label {y} is used for both '{a.replace('_', ' ')}' and "
                            f"'{b.replace('_', ' ')}'")
    k = len({f for fs in folders.values() for f in fs})
    bad = sorted(y for y in folders if not 0 <= y < k)
    if bad:
        raise UserError(f"{source}: label {bad[0]} is outside 0..{k - 1} ({k} class folders)")
    return [next(iter(folders[y])).replace("_", " ") for y in range(k)]


def load_domain(data_root, domain, split_root=None):
    """Read `<domain>_train.txt` (D_train) and `<domain>_test.txt` (D_test) from `split_root`
    (default `data_root`; image paths relative to `data_root`).

    Returns:
        dict: train_paths, train_labels [n_train], test_paths, test_labels [n_test], classnames
        (label order), digest (of the two split files).
    """
    get, folder = f"`make data DOMAIN={domain} DATA={data_root}`", split_root or data_root
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--data-root {folder} is a file, not a folder; pass the folder that holds "
                        f"<domain>_train.txt and <domain>_test.txt")
    if not os.path.isdir(folder):
        raise UserError(f"data root {folder} not found; run {get} or pass --data-root")
    files = [os.path.join(folder, f"{domain}_{s}.txt") for s in ("train", "test")]
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"split file {f} not found; get it with {get}")
    (tr_paths, tr_labels), (te_paths, te_labels) = map(read_split_file, files)
    both = sorted(set(tr_paths) & set(te_paths))
    if both:  # the weak model would be trained on images it then labels
        raise UserError(f"{len(both)} images are listed in both {domain}_train.txt and "
                        f"{domain}_test.txt under {folder}, first {both[0]}; the splits must be "
                        f"disjoint: re-download them")
    names = classnames_from_splits(tr_paths + te_paths, torch.cat([tr_labels, te_labels]),
                                   source=f"{domain}_train.txt + {domain}_test.txt")
    return {"train_paths": tr_paths, "train_labels": tr_labels, "test_paths": te_paths,
            "test_labels": te_labels, "classnames": names, "digest": file_digest(*files)}


def file_digest(*paths):
    """SHA-1 of the files' bytes, in order (16 hex digits)."""
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # a checkpoint can be gigabytes
                h.update(block)
    return h.hexdigest()[:16]


def check_images(root, paths, workers=16):
    """Stop before any training if a listed image is missing, not an image (header check) or
    larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)."""
    def bad(rel):
        try:
            with Image.open(os.path.join(root, rel)):
                return None
        except Image.DecompressionBombError:
            return rel, "has more pixels than PIL opens (decompression-bomb limit); shrink it or"
        except (OSError, ValueError):
            return rel, ("is missing;" if not os.path.exists(os.path.join(root, rel))
                         else "is unreadable; replace it or")
    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(bad, paths, chunksize=256):
            if found is not None:
                raise UserError(f"image {os.path.join(root, found[0])} {found[1]} remove it from "
                                f"the split files (DomainNet: re-download it with `make data`)")


def image_stats_digest(root, paths, workers=16):
    """A digest of each listed image's size and modification time (os.stat; -1 for a missing
    file), part of the cache keys, so that a cache notices images replaced under the same paths."""
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


def decode_image(path):
    """The image file at `path` decoded to RGB (PIL), or a UserError naming it."""
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}); replace or remove it (DomainNet: "
                        f"re-download with `make data`)") from None


class ImageList(Dataset):
    """Images `root/paths[i]` with labels, through `transform`; a bad file raises UserError.

    With a `seed`, the transform's random draws (torch and Python's `random`, what torchvision and
    timm use) come from a generator seeded by (seed, epoch, i) for each sample, so augmentation does
    not depend on which data-loader worker loads it; index epoch * n + i is image i in that epoch
    (`EpochSampler`). `pixels[i]`, if given, is image i already decoded (a PIL image).
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
            torch.random.default_generator.manual_seed(sample_seed)  # the CPU's alone: no CUDA call
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


def make_loader(dataset, batch_size, device, workers, shuffle=False, seed=0):
    """A DataLoader with workers and pinned memory on CUDA; for training a seeded shuffle
    (`EpochSampler`, the dataset then takes indices epoch * n + i as ImageList does). Its own
    generator seeds the workers, so the global RNG is not drawn from."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=EpochSampler(len(dataset), seed) if shuffle else None,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0 and shuffle, drop_last=False)


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


# ---- Weak model (step 1): a timm model fine-tuned on D_train with true labels -----------------------
def create_weak_model(name, num_classes, pretrained=True):
    """A timm classifier with a fresh k-way head, plus timm's own train and eval transforms (a
    Hugging Face one, `hf:<id>`: `w2s_clip_lab.hf.create_hf_weak_model`, the same triple)."""
    import timm
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as e:  # no network, no weights, a bad file
        raise UserError(f"cannot load timm model {name} (pretrained={pretrained}): "
                        f"{one_line(e)}; check the network or pass --no-weak-pretrained")
    cfg = timm.data.resolve_model_data_config(model)
    return (model, timm.data.create_transform(**cfg, is_training=True),
            timm.data.create_transform(**cfg))


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


def train_weak_model(model, loader, epochs=3, lr=1e-3, warmup_ratio=0.1, device="cpu",
                     weight_decay=0.0, schedule="linear", max_grad_norm=1.0, precision="auto",
                     history=None, micro_batch=None):
    """Fine-tune all of `model` with cross-entropy on true labels (Section 5, step 1: 3 epochs,
    lr 1e-3), with the heads' LR schedule (SCHEDULES) and gradient-norm clipping. precision:
    autocast on CUDA (`amp_dtype`; fp16 with a gradient scaler, unscaled before clipping), fp32 on
    the CPU. micro_batch: each batch in parts of this many images, gradients added up (less memory;
    BatchNorm normalises each part alone). `history`, a list, gets a row per epoch: mean loss,
    training accuracy, seconds and, on CUDA, the peak allocated memory so far."""
    cuda = torch.device(device).type == "cuda"
    dtype = amp_dtype(precision, device)
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    total, multiplier = epochs * len(loader), SCHEDULES[schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: multiplier(s, total, warmup_ratio))
    rows = {}
    for epoch, (images, labels) in progress(((e, b) for e in range(epochs) for b in loader),
                                            "weak model", total):
        row = rows.setdefault(epoch, {"loss": 0.0, "hits": 0, "n": 0, "start": time.time()})
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        loss, hits = weak_backward(model, images, labels, scaler, dtype, micro_batch, epoch)
        if max_grad_norm > 0:  # HF Trainer: clip before the step (fp16: on unscaled gradients)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        row.update(loss=row["loss"] + loss * len(labels), hits=row["hits"] + hits,
                   n=row["n"] + len(labels), end=time.time())
        if cuda:
            row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if history is not None:
        history.extend({"epoch": e + 1, "loss": r["loss"] / r["n"], "train_accuracy": r["hits"] / r["n"],
                        "seconds": r["end"] - r["start"],
                        **({"peak_gpu_memory_gib": r["peak_gpu_memory_gib"]} if cuda else {})}
                       for e, r in sorted(rows.items()))
    return model.eval()


def weak_backward(model, images, labels, scaler, dtype, micro_batch, epoch):
    """Cross-entropy of one batch, backward in parts of `micro_batch` images (None: whole), each
    part's loss weighted by its share of the batch. Returns (batch loss, correct predictions)."""
    loss, hits, size = 0.0, 0, micro_batch or len(labels)
    for part, part_labels in zip(images.split(size), labels.split(size)):
        with torch.autocast(images.device.type, dtype or torch.float32, enabled=dtype is not None):
            logits = model(part)
            part_loss = F.cross_entropy(logits, part_labels) * (len(part_labels) / len(labels))
        if not torch.isfinite(part_loss):
            raise FloatingPointError(f"the weak model's training loss became {part_loss.item()} "
                                     f"at epoch {epoch + 1}")
        scaler.scale(part_loss).backward()
        loss += part_loss.item()
        hits += (logits.argmax(dim=-1) == part_labels).sum().item()
    return loss, hits


# ---- Weak labels (step 2): the weak model's logits on D_hold -------------------------------------
@torch.no_grad()
def predict_logits(model, loader, device, desc="weak logits"):
    """Logits of `model` on every batch of `loader`, in order: FloatTensor [n, k] on the CPU, in
    float32 (no autocast, no TF32): they are the soft targets of KD, AdaptConf and CPL."""
    model.eval().to(device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
    try:
        out = [model(images.to(device, non_blocking=True)).float().cpu()
               for images, _ in progress(loader, desc)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return torch.cat(out)


# ---- CLIP features: the image tower is frozen for every head, so each image is encoded once ------
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
            logging.disable(logging.ERROR)  # its warnings and errors: the UserError below says it
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, force_quick_gelu=cfg.get("quick_gelu", False))
            finally:
                logging.disable(logging.NOTSET)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            pickle.UnpicklingError) as e:  # no network, bad tag, config or checkpoint file
        raise UserError(f"cannot load open_clip {name} with weights {pretrained}: {one_line(e)}; "
                        f"check the network or the --clip-* flags") from None
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


# ---- The text tower, packed (TP and cpl-text): equals open_clip's encode_text up to float rounding ----
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


# ---- Heads: LP (Eq. 1), TP as CoOp, CPL prototypes (Eq. 3), text-encoder tuning (Table 4) ----------
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


@torch.no_grad()
def text_prototypes(clip_model, tokenizer, classnames, templates=("a photo of a {}",), batch_size=256,
                    normalize=False):
    """CPL's initial prototypes C [k, d] (Algorithm 1, line 2: C_i = f_text("a photo of a {y_i}")),
    through open_clip's public `encode_text`; with several templates, their mean.

    Args:
        templates: format strings with `{}` or callables, e.g. open_clip.OPENAI_IMAGENET_TEMPLATES.
        normalize: False (the paper): raw text embeddings. True: the L2-normalised mean of the
            normalised embeddings, which is `open_clip.build_zero_shot_classifier(...).T`.
    """
    device = next(clip_model.parameters()).device
    prompts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    emb = torch.cat([clip_model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device),
                                            normalize=normalize)
                     for i in range(0, len(prompts), batch_size)])
    protos = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(protos, dim=-1) if normalize else protos


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
    """Table 4's alternative to CPL: fixed prompts, a trainable copy of the text tower (all but the
    frozen token-embedding table); logits = logit_scale * cos, [n, k]. The tokens all prompts share
    ([SOS] a photo of a) run once, each class's own ones packed."""

    def __init__(self, clip_model, tokenizer, classnames, template="a photo of a {}",
                 logit_scale=1.0):
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


# ---- Losses: fn(strong_logits [n, k], weak_logits [n, k], **hyper) -> the batch's mean -------------
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
    """`value` reached linearly from 0 over the first `share` of the steps (AuxConf's alpha)."""
    return value * (min(1.0, step / (share * total)) if total else 1.0)


# Every loss in one place: its function and which hyperparameter each keyword argument takes.
# A new loss is its function, one entry here and, for a new hyperparameter, one in HYPERPARAMETERS:
# the command line gets its flags, hold-val tuning its grid, every loss but CPL's becomes the methods
# <name>-lp and <name>-tp, and the tables list them.
LOSSES = {
    "ce": (ce_loss, {}),
    "kd": (kd_loss, {"T": "kd_temperature"}),
    "auxconf": (auxconf_loss, {"alpha": "aux_alpha"}),
    "adaptconf": (adaptconf_loss, {"T": "kd_temperature", "tau": "adapt_tau"}),
    "cpl": (cpl_loss, {"tau": "tau", "direction": "cpl_kl"}),
}
# name: (default, hold-val tuning grid or None: fixed, flag type: "positive", "fraction" or the
# choices, help with the source). Section 5, step 4 tunes on "the 20% of D'_hold" without naming a
# parameter; the grids are the parameters each loss leaves open.
HYPERPARAMETERS = {
    "tau": (1.0, (0.01, 0.03, 0.1, 0.3, 1.0), "positive",
            "CPL temperature tau on both weak and strong logits (Eq. 4; no value given). Grid: not "
            "stated; 0.01 = CLIP's logit scale 100, 1 = Eq. 4 at face value"),
    "kd_temperature": (1.0, (1.0, 2.0, 4.0), "positive",
                       "KD and AdaptConf temperature T. Grid: not stated; Hinton et al. 2015's "
                       "usual range"),
    "aux_alpha": (0.5, (0.25, 0.5, 0.75), "fraction",
                  "AuxConf's final alpha, reached over the first 20% of steps. Grid: Burns et al. "
                  "2023, 0.5 in their code and 0.75 for large students"),
    "adapt_tau": (0.5, None, "positive", "AdaptConf's beta temperature (Guo et al.'s code default)"),
    "cpl_kl": ("summand", None, ("summand", "printed"),
               "CPL loss: KL(p^w || p^s), Eq. 5's summand (Hinton's distillation direction), or "
               "KL(p^s || p^w), Eq. 5's left-hand side as printed"),
}
WARMED_UP = ("aux_alpha",)  # reached linearly from 0 over the first 20% of steps (Burns et al.)
LOSS_NAMES = tuple(name for name in LOSSES if name != "cpl")  # the baselines, with an LP and a TP
TUNED_PARAMS = {name: tuple(dict.fromkeys(h for h in kwargs.values() if HYPERPARAMETERS[h][1]))
                for name, (_, kwargs) in LOSSES.items()}
METHOD_HEAD_LOSS = {"cpl": ("cpl", "cpl"), "cpl-text": ("cpl-text", "cpl"),  # weak-to-strong
                    **{f"{loss}-{head}": (head, loss) for head in ("lp", "tp") for loss in LOSS_NAMES}}
METHODS = ("weak", "zero-shot", "ceiling") + tuple(METHOD_HEAD_LOSS)
METHOD_GROUPS = {"all": METHODS, "lp": tuple(f"{loss}-lp" for loss in LOSS_NAMES),
                 "tp": tuple(f"{loss}-tp" for loss in LOSS_NAMES)}  # --method all, lp, tp


def bind_loss(loss, values):
    """LOSSES[loss] with its hyperparameters taken from `values` ({name: value}, e.g. a tuning grid
    point): (the function with the fixed ones bound by functools.partial, and for a warmed-up one
    the schedule (step, total_steps) -> kwargs that `train_head` takes, else None)."""
    fn, kwargs = LOSSES[loss]
    ramps = {k: values[h] for k, h in kwargs.items() if h in WARMED_UP}
    fixed = partial(fn, **{k: values[h] for k, h in kwargs.items() if h not in WARMED_UP})
    if not ramps:
        return fixed, None
    return fixed, lambda step, total: {k: warmed_up(v, step, total) for k, v in ramps.items()}


# ---- Training and evaluation of a head on cached features (step 3; step 4 with true labels) ------
@torch.no_grad()
def predict(head, features, batch_size=65536):
    """Head logits for features [n, d] in chunks (a prompt head encodes its text once a chunk)."""
    head.eval()
    return torch.cat([head(features[i:i + batch_size]) for i in range(0, len(features), batch_size)])


def accuracy(logits, labels):
    """Fraction of rows whose argmax equals labels [n]."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def train_head(head, loss_fn, x, targets, x_val, val_targets, *, epochs=10, batch_size=512, lr=1e-2,
               warmup_ratio=0.1, weight_decay=0.0, seed=0, param_lrs=None, probes=None,
               lr_schedule=warmup_linear, max_grad_norm=1.0, select_by="loss",
               start_candidate=False, loss_schedule=None, on_epoch=None):
    """Train `head` on features x [n, d] against targets [n, k] with `loss_fn(logits, targets)`
    (hyperparameters bound by functools.partial; `loss_schedule(step, total)` adds any that change
    with the step); keep the best epoch on hold-val (x_val [n_val, d], val_targets [n_val, k]).

    The Hugging Face Trainer's loop the paper names: AdamW (`param_lrs`: {name prefix: lr}), the LR
    multiplier `lr_schedule(step, total, warmup_ratio)`, gradients clipped to `max_grad_norm` (0:
    off), the best epoch loaded at the end: lowest hold-val loss (ties keep the earlier), or highest
    agreement with argmax(val_targets) (select_by="agreement"). The head before training is epoch 0
    of the curves, a candidate only with start_candidate=True or epochs=0 (the Trainer saves after
    steps only). `probes` {name: (features, labels)} are measured each epoch, never to select;
    `on_epoch(row)` gets each row as it is made. Returns {best_epoch, val_score, val_loss, curves,
    start_would_win, warnings}; a NaN or inf loss raises FloatingPointError."""
    g = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    own = param_lrs or {}  # {name prefix: its lr}; the other parameters train at lr
    prefix = lambda n: next((pre for pre in own if n.startswith(pre)), None)  # noqa: E731
    groups = [{"params": [p for n, p in named if prefix(n) == pre], "lr": own.get(pre, lr)}
              for pre in [*own, None]]
    opt = torch.optim.AdamW([grp for grp in groups if grp["params"]], lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, total, warmup_ratio))
    hyper = loss_schedule or (lambda step, total: {})
    sets = {"val_score": (x_val, val_targets.argmax(dim=-1)), **(probes or {})}
    better = lambda a, b: (a["val_loss"] < b["val_loss"] if select_by == "loss"  # noqa: E731
                           else a["val_score"] > b["val_score"])  # strict: ties keep the earlier
    best, curves, step, stepped = None, [], 0, 0
    for epoch in tqdm(range(epochs + 1), desc="head", disable=not sys.stderr.isatty()):
        if epoch > 0:
            loss_at = lambda z, t, s: loss_fn(z, t, **hyper(s, total))  # noqa: E731
            loss_mean, steps, positive = train_epoch(head, loss_at, x, targets, opt, sched,
                                                     batch_size, g, step, max_grad_norm, epoch)
            step, stepped = step + steps, stepped + positive
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
        if (epoch > 0 or start_candidate or epochs == 0) and (best is None or better(row, best)):
            best = {"val_score": row["val_score"], "val_loss": row["val_loss"], "best_epoch": epoch,
                    "state": {n: p.detach().clone() for n, p in named}}  # the trainable ones
    head.load_state_dict(best.pop("state"), strict=False)
    warnings = []
    if epochs > 0 and not stepped:
        warnings.append(f"none of the {step} optimiser steps had a positive learning rate "
                        f"(all in warm-up, or lr 0): the head is untrained")
    elif epochs > 0 and all(row["val_loss"] == curves[0]["val_loss"] for row in curves):
        warnings.append("the hold-val loss never moved: the head did not learn")
    return {**best, "curves": curves, "warnings": warnings,
            "start_would_win": best["best_epoch"] == 0 or better(curves[0], best)}


def train_epoch(head, loss_at, x, targets, opt, sched, batch_size, g, step, max_grad_norm, epoch):
    """One pass over x [n, d] in a shuffle drawn from generator `g`: for each batch the loss
    `loss_at(logits, targets, step)`, backward, the norm of all trainable gradients clipped to
    `max_grad_norm` (0: off; the HF Trainer's order), the optimiser and LR steps.
    Returns (mean loss over the epoch, steps taken, steps with a positive learning rate)."""
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    loss_sum, positive, first = 0.0, 0, step
    for idx in torch.randperm(len(x), generator=g).split(batch_size):
        loss = loss_at(head(x[idx]), targets[idx], step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at epoch {epoch}, "
                                     f"step {step + 1}")
        positive += any(group["lr"] > 0 for group in opt.param_groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
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
    return loss_sum / len(x), step - first, positive


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


TUNING_RULES = ("agreement", "weak-kl", "val-loss")  # --tune-by; each row of `tuning` records all


@torch.no_grad()
def tuning_score(val_logits, weak_val_logits, criterion="agreement", temperature=1.0, loss_fn=None):
    """How well a trained head fits hold-val's weak supervision, higher is better, on one scale for
    every grid point (a loss at temperature T is not comparable with one at another T).

    Args:
        val_logits, weak_val_logits: [n_val, k], the head's and the weak model's.
        criterion: "agreement", the share of rows where the argmaxes agree; "weak-kl",
            -KL(softmax(w) || softmax(s / temperature)): the head's own class probabilities
            (temperature = tau for CPL, whose p^s is Eq. 4's, else 1) against the weak model's;
            or "val-loss", minus `loss_fn(val_logits, weak_val_logits)`: the Hugging Face Trainer's
            lowest eval loss, measured with one loss for every grid point (the method's loss at
            the flags' values, the point --tune none trains), so that the points are comparable.
    """
    if criterion == "agreement":
        return accuracy(val_logits, weak_val_logits.argmax(dim=-1))
    if criterion == "val-loss":
        if loss_fn is None:
            raise ValueError('criterion "val-loss" needs loss_fn, the loss every grid point is measured by')
        return -loss_fn(val_logits, weak_val_logits).item()
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


def pgr(weak, strong, ceiling):
    """Performance gap recovered (Burns et al. 2023): (w2s - weak) / (ceiling - weak)."""
    return (strong - weak) / (ceiling - weak) if ceiling != weak else float("nan")


def agreement_report(logits, weak_logits, labels):
    """Burns et al. 2023's student-supervisor agreement: the share of predictions equal to the weak
    model's, and the accuracy where it is right and where it is wrong (None for an empty set)."""
    pred, weak = logits.argmax(dim=-1), weak_logits.argmax(dim=-1)
    right = weak == labels
    acc = lambda m: (pred[m] == labels[m]).float().mean().item() if m.any() else None  # noqa: E731
    return {"agreement_with_weak": (pred == weak).float().mean().item(),
            "accuracy_where_weak_right": acc(right), "accuracy_where_weak_wrong": acc(~right)}


def n_predicted_classes(logits):
    """How many distinct classes the argmax of logits [n, k] predicts (1 = a collapsed head)."""
    return int(logits.argmax(dim=-1).unique().numel())


# ---- The protocol (Section 5): weak model -> weak labels -> features -> heads, per seed ----------
def zero_shot_prototypes(strong, classnames, prototype_init="single", prototype_norm="raw",
                         template="a photo of a {}"):
    """CPL's starting prototypes [k, d] (Algorithm 1, line 2): the text embeddings of `template`
    ("a photo of a {y_i}") or their mean over open_clip's 80 templates (`ensemble`), raw or
    L2-normalised. Computed once and kept in `strong`, so that the ceiling's CPL head, cpl and
    zero-shot all start from this tensor; `cpe` (the worst-categories paper's weighting, weighed on
    each seed's hold-train) must already be there (`w2s_clip_lab.cpe.cpe_prototypes`)."""
    import open_clip
    if "prototypes" in strong:
        return strong["prototypes"]
    if prototype_init == "cpe":
        raise ValueError("prototype_init 'cpe': put cpe_prototypes(...) in strong['prototypes'] first")
    templates = [template] if prototype_init == "single" else open_clip.OPENAI_IMAGENET_TEMPLATES
    strong["prototypes"] = text_prototypes(strong["clip"], strong["tokenizer"], classnames,
                                           templates, normalize=prototype_norm == "unit")
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
    the starting head. `values` overrides the flags' hyperparameters; `on_epoch` gets each epoch's
    row with the head kind and those values. `strong`: the CLIP model, its tokenizer and the D_test
    features [n, d] on the device (`feature_stage`)."""
    set_seed(seed)
    v = {**{name: getattr(args, name) for name in (*HYPERPARAMETERS, "text_lr")}, **(values or {})}
    feats = strong["feats"]
    protos = (zero_shot_prototypes(strong, classnames, args.prototype_init, args.prototype_norm,
                                   args.prompt_template) if kind == "cpl" else None)
    head = make_head(kind, strong["clip"], strong["tokenizer"], classnames, feats.shape[1],
                     protos, args.cpl_logit_scale, args.lp_input,
                     args.prompt_template).to(feats.device)
    tr = splits["hold_train"] if train_idx is None else train_idx
    hv, te = splits["hold_val"], splits["test"]
    labels = labels.to(feats.device)
    loss_fn, loss_schedule = bind_loss(loss, v)
    fit = train_head(head, loss_fn, feats[tr], targets.to(feats.device),
                     feats[hv], val_targets.to(feats.device),
                     epochs=args.strong_epochs if epochs is None else epochs,
                     batch_size=args.batch_size, lr=args.lr, warmup_ratio=args.warmup_ratio,
                     weight_decay=args.weight_decay, seed=seed,
                     lr_schedule=SCHEDULES[args.lr_schedule], loss_schedule=loss_schedule,
                     max_grad_norm=args.max_grad_norm, select_by=args.select_by,
                     start_candidate=args.select_from == "start-and-epochs",
                     param_lrs={"text.": v["text_lr"]} if kind == "cpl-text" else None,
                     probes={"train_true_acc": (feats[tr], labels[tr]),  # its images, true labels
                             "train_agreement": (feats[tr], targets.argmax(dim=-1).to(feats.device)),
                             "test_acc": (feats[te], labels[te])},
                     on_epoch=on_epoch and (lambda row: on_epoch({"head": kind, **(values or {}),
                                                                  **row})))
    return head, fit, predict(head, feats[te]).cpu()


def fit_tuned(kind, loss, weak_logits, strong, labels, splits, classnames, args, seed,
              on_epoch=None):
    """Step 4 with its parameter tuning: one head per point of `tuning_grid` (the flags' values
    under --tune none), each trained on hold-train's weak logits and selected on hold-val's; the
    point whose head scores best on hold-val by `tuning_score` (--tune-by) against the weak logits
    wins, ties to the earlier point; a head that never learned (its warnings) loses to one that
    did, and a point whose training diverges is left out, named in the warnings (all diverging:
    FloatingPointError). No true label takes part in the choice.

    Returns:
        (head, fit, test_logits, tuned: the winning values, tuning: one row per point with its
        hold-val score and loss, and its D'_test accuracy for analysis, never for selection).
    """
    ht, hv, te = splits["hold_train"], splits["hold_val"], splits["test"]
    tuned = [name for name, (_, grid, *_) in HYPERPARAMETERS.items() if grid] + ["text_lr"]
    flags = {name: getattr(args, name) for name in tuned}
    grids = {name: getattr(args, f"{name}_grid") if args.tune == "hold-val" else [flags[name]]
             for name in tuned}
    fixed, ramp = bind_loss(loss, {name: getattr(args, name) for name in HYPERPARAMETERS})
    yardstick = partial(fixed, **(ramp(1, 1) if ramp else {}))  # val-loss: the loss at the flags
    points, best, tuning, diverged = tuning_grid(kind, loss, grids), None, [], []
    for values in points:
        try:
            head, fit, test_logits = fit_head(kind, loss, weak_logits[ht], weak_logits[hv], strong,
                                              labels, splits, classnames, args, seed, values=values,
                                              on_epoch=on_epoch)
        except FloatingPointError as e:  # one diverging point drops out, named; the rest compete
            diverged.append(f"{point_text(values)}: {e}")
            tuning.append({"values": values, "diverged": str(e)})
            continue
        temperature = values["tau"] if kind in ("cpl", "cpl-text") else 1.0  # the head's own p^s
        val_logits = predict(head, strong["feats"][hv]).cpu()
        scores = {rule: tuning_score(val_logits, weak_logits[hv], rule, temperature, yardstick)
                  for rule in TUNING_RULES}  # every rule, so that each can be judged by its regret
        learned = not fit["warnings"]  # a head that never learned loses to one that did, ties too
        tuning.append({"values": values, "score": scores[args.tune_by], "scores": scores,
                       "learned": learned, "at_flags": all(flags[name] == v for name, v in values.items()),
                       "val_score": fit["val_score"], "val_loss": fit["val_loss"],
                       "best_epoch": fit["best_epoch"],
                       "test_accuracy": accuracy(test_logits, labels[te])})
        if best is None or (learned, scores[args.tune_by]) > best[0]:
            best = ((learned, scores[args.tune_by]), head, fit, test_logits, values)
        del head  # hold at most the best head and the next (cpl-text copies the text tower)
    if best is None:
        raise FloatingPointError("every grid point diverged (" + "; ".join(diverged) + ")")
    fit = {**best[2], "warnings": best[2]["warnings"] + [f"grid point {d}; left out of the choice"
                                                         for d in diverged]}
    return best[1], fit, best[3], best[4], tuning


def point_text(values):
    """A grid point as flags would set it: `tau 0.01, text_lr 1e-05`."""
    return ", ".join(f"{name} {value:g}" for name, value in values.items()) or "the fixed values"


def head_weights(head):
    """A trained head, small enough to keep with every run: its trainable parameters (LP's W and
    b, TP's context, CPL's prototypes) or, for cpl-text, which tunes the whole text tower, the class
    features it ends with (logits = scale * cos(x, features))."""
    if isinstance(head, TextEncoderHead):
        with torch.no_grad():
            return {"class_features": head.text_features().cpu()}
    return {n: p.detach().cpu() for n, p in head.named_parameters() if p.requires_grad}


def run_method(method, args, data, splits, weak_logits, strong, seed, on_epoch=None, on_head=None):
    """Steps 3-5 for one method and seed; returns its results (accuracies in [0, 1]). `on_epoch`
    gets every trained head's rows per epoch (every grid point, every ceiling head); `on_head`,
    called with the method and its final head, returns more results to keep (e.g. CMM margins)."""
    labels, names, k = data["test_labels"], data["classnames"], len(data["classnames"])
    ht, hv, te = splits["hold_train"], splits["hold_val"], splits["test"]
    out, head = {"tuned": {}, "tuning": []}, None  # weak, zero-shot, the ceiling: nothing tuned
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
        out.update(ceiling_head=best, ceiling_data=args.ceiling_data, n_ceiling_train=len(train),
                   heads={kind: {"val_score": f["val_score"], "test_accuracy": accuracy(t, labels[te])}
                          for kind, (_, f, t) in runs.items()})
    elif method == "zero-shot":  # CPL's starting head, no step
        head, fit, test_logits = fit_head("cpl", "cpl", weak_logits[ht], weak_logits[hv], strong,
                                          labels, splits, names, args, seed, epochs=0,
                                          on_epoch=on_epoch)
    else:  # step 4: weak-to-strong, tuned and selected on hold-val's weak logits
        kind, loss = METHOD_HEAD_LOSS[method]
        head, fit, test_logits, out["tuned"], out["tuning"] = fit_tuned(
            kind, loss, weak_logits, strong, labels, splits, names, args, seed, on_epoch)
    if head is not None:
        out.update({key: fit[key] for key in ("best_epoch", "val_score", "val_loss",
                                              "start_would_win", "warnings", "curves")},
                   _head=head_weights(head))  # saved as head.pt beside results.json
        if "cpe" in strong:  # the template weights this seed's prototypes use
            out["cpe"] = strong["cpe"]
        if on_head is not None:
            out.update(on_head(method, head))
    return {**d_test_report(test_logits, weak_logits, labels, splits), **out}


def d_test_report(test_logits, weak_logits, labels, splits):
    """What results.json holds of a method's logits on D'_test [n_test, k]: its accuracy, worst-10
    and per-class accuracy, classes predicted, agreement with the weak model (`agreement_report`),
    the weak model's own accuracies, and each image's index, label and prediction."""
    hold, te = torch.cat([splits["hold_train"], splits["hold_val"]]), splits["test"]
    class_acc = per_class_accuracy(test_logits, labels[te], test_logits.shape[1])
    return {"test_accuracy": accuracy(test_logits, labels[te]),
            "weak_test_accuracy": accuracy(weak_logits[te], labels[te]),
            "weak_label_accuracy_hold": accuracy(weak_logits[hold], labels[hold]),
            "worst10_accuracy": worst_k_accuracy(class_acc),
            "n_predicted_classes": n_predicted_classes(test_logits),
            "per_class_accuracy": [None if math.isnan(a) else a for a in class_acc.tolist()],  # JSON
            **agreement_report(test_logits, weak_logits[te], labels[te]),
            "d_test_index": te.tolist(), "d_test_labels": labels[te].tolist(),
            "predictions": test_logits.argmax(dim=-1).tolist()}  # per image, for later analysis


# ---- Files on disk: caches keyed by what made them, written whole (renamed into place), locked -----
def cache_key(**parts):
    """A short stable hash of keyword arguments (anything json can print, str as fallback)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def temp_path(path):
    """Where a write of `path` goes first: `.<name>.<pid>@<host>.tmp` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.tmp")


def remove_stale_temps(folder, name="*", other_host_age=86400.0):
    """Delete the temporary files (`temp_path`) of `name` in `folder` that a failed write or a
    killed process left: this machine's of a process that is gone (and `.<name>.<pid>.tmp` ones
    without a host); another machine's (a shared folder) once untouched for `other_host_age` s."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        match = re.fullmatch(r"\.(.+?)\.(\d+)(?:@(.+))?\.tmp", tmp.name)
        if not match or (int(match[2]) == os.getpid() and match[3] in (None, socket.gethostname())):
            continue
        try:
            if match[3] not in (None, socket.gethostname()):  # a job there may be writing it now
                if time.time() - tmp.stat().st_mtime > other_host_age:
                    tmp.unlink(missing_ok=True)
                continue
            os.kill(int(match[2]), 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (OSError, OverflowError):
            pass  # another user's process, or not a pid: leave it


def refuse_link(path):
    """A UserError when `path` is a symbolic link, which a write would replace (never written
    through either): what the user made is not touched."""
    if os.path.islink(path):
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}), which is never "
                        f"replaced or written through; remove the link or write elsewhere")


def fsync_path(path):
    """Flush a file's data, or a folder's entries (a rename), to the disk, so that a node losing
    power keeps them; a file system that cannot (some network mounts) is tolerated, a failing
    disk (EIO) is not."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save (JSON for a .json path; str or bytes as they are) to a temporary file, flushed to
    disk, renamed into place, the folder flushed: `path` is whole or absent, also after a power
    loss. A failed write leaves no temporary file; a full disk or an unwritable folder is a
    UserError naming it."""
    path = Path(path)
    refuse_link(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # their entries too
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        if path.suffix == ".json":
            data = json.dumps(obj, indent=1, default=str).encode()
        elif isinstance(obj, (str, bytes)):
            data = obj.encode() if isinstance(obj, str) else obj
        else:
            buffer = io.BytesIO()  # torch's own writer hides the errno of a failed write
            torch.save(obj, buffer)
            data = buffer.getbuffer()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for folder in (path.parent, *(p.parent for p in made)):
            fsync_path(folder)
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
    """An exclusive lock (fcntl.flock) on `.<name>.lock` beside `path` for the block: processes
    writing one file take turns (a file system without locks: a warning, no lock)."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            print(f"warning: cannot lock {path} ({e.strerror}); writing it without a lock",
                  file=sys.stderr, flush=True)
        yield


def load_cache(path):
    """The object in cache file `path` (torch or .json), or None with a one-line warning if it
    cannot be loaded (truncated, damaged): caches are derived data, recomputed."""
    try:
        if str(path).endswith(".json"):
            return json.loads(Path(path).read_text())
        return torch.load(path, weights_only=True)
    except Exception as e:  # any failure to read derived data means: compute it again
        print(f"warning: cache file {path} cannot be loaded ({type(e).__name__}: {one_line(e, 120)}); "
              f"recomputing it",
              file=sys.stderr, flush=True)
        return None


def cached(path, compute, force=False):
    """Load `path` if it exists and loads (and not `force`), else compute it under a lock, save it
    whole and return it: a second process asking for the same entry waits, then loads it."""
    stamp = lambda: os.stat(path).st_mtime_ns if os.path.exists(path) else None  # noqa: E731
    seen = stamp()
    obj = load_cache(path) if seen is not None and not force else None
    if obj is None:
        with file_lock(path):
            if stamp() not in (None, seen) and not force:  # written meanwhile by another process
                obj = load_cache(path)
            if obj is None:
                obj = compute()
                atomic_save(obj, path)
                log_computed(path)
    return obj


def log_computed(path):
    """Append `path` to the file $W2S_CLIP_CACHE_LOG names, if set: which process computed which
    cache entry (the tests of concurrent runs read it); a log that cannot be written is a warning."""
    log = os.environ.get("W2S_CLIP_CACHE_LOG")
    if log:
        try:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
        except OSError as e:
            print(f"warning: W2S_CLIP_CACHE_LOG {log} cannot be written ({e.strerror})",
                  file=sys.stderr, flush=True)


# ---- Settings: what a result depends on (its key), and when an existing result is stale ----------
RUN_FLAGS = ("seeds", "method", "device", "out_dir", "cache_dir", "force", "workers")  # no effect
CLIP_SETTINGS = ("clip", "data_root", "splits", "domain", "device", "precision")  # CLIP's features
# All that decides a weak run; dataset, split_share, split_seed, train_image_cache and
# weak_input_size are set only by w2s_clip_lab, and only when they are not at their defaults.
WEAK_SETTINGS = ("weak_model", "weak_pretrained", "weak_epochs", "weak_lr", "batch_size",
                 "warmup_ratio", "weight_decay", "lr_schedule", "max_grad_norm", "weak_micro_batch",
                 "train_image_cache", "weak_input_size", "data_root", "splits", "domain", "dataset",
                 "split_share", "split_seed", "device", "precision")


def run_settings(args, data, device, precision):
    """Everything but the seed and method that shapes a result, as a JSON dict: the flags (not
    RUN_FLAGS), the data's real path and split files' digest, the device type, the precision in
    use, and the CLIP config and checkpoint by content. Paths are real paths."""
    flags = {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}
    real = lambda path: os.path.realpath(path) if os.path.isfile(path) else path  # noqa: E731
    pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    clip = (file_digest(args.clip_model) if args.clip_model.endswith(".json") else args.clip_model,
            file_digest(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained)
    flags.update(precision=precision, data_root=os.path.realpath(args.data_root),
                 splits=data["digest"], clip_model=real(args.clip_model),
                 clip_pretrained=real(args.clip_pretrained), device=torch.device(device).type,
                 clip=clip)
    return json.loads(json.dumps(flags, default=str))  # as results.json holds it


def unused_flags(method):
    """The settings `method`'s result does not depend on: the losses' hyperparameters and grids it
    does not use, cpl-text's text lr elsewhere, the ceiling's data elsewhere, the tuning flags
    for zero-shot and the ceiling, and the head's training flags for zero-shot (no step)."""
    kinds, losses = {"zero-shot": (["cpl"], ["cpl"]), "ceiling": (["lp", "tp", "cpl"], ["ce"])
                     }.get(method, ([], []))
    if method in METHOD_HEAD_LOSS:
        kinds, losses = [METHOD_HEAD_LOSS[method][0]], [METHOD_HEAD_LOSS[method][1]]
    used = {h for loss in losses for h in LOSSES[loss][1].values()}
    unused = {h for h in HYPERPARAMETERS if h not in used}
    unused |= {f"{h}_grid" for h in unused} | ({"text_lr", "text_lr_grid"} if "cpl-text" not in kinds
                                               else set())
    unused |= {"ceiling_data"} if method != "ceiling" else set()
    if method in ("zero-shot", "ceiling"):  # nothing tuned
        unused |= {f"{h}_grid" for h in HYPERPARAMETERS} | {"text_lr_grid", "tune", "tune_by"}
    if method == "zero-shot":  # CPL's head before any step
        unused |= {"lr", "strong_epochs", "select_by", "select_from"}
    return unused


@functools.lru_cache(maxsize=None)
def flag_defaults():
    """This file's flags at their defaults (not RUN_FLAGS), as JSON text as settings hold them."""
    return json.dumps({k: v for k, v in vars(parse_args([])).items() if k not in RUN_FLAGS}, default=str)


def filled_settings(settings):
    """`settings` with each flag of this file it lacks (one newer than its results.json) at its default."""
    return {**json.loads(flag_defaults()), **settings}


def method_settings(method, settings):
    """The part of `settings` (run_settings' dict) that `method`'s result depends on, filled
    (`filled_settings`). A hash (str, an older results.json) is returned as it is."""
    if not isinstance(settings, dict):
        return settings
    filled = filled_settings(settings)
    if method == "weak":
        return {k: v for k, v in filled.items() if k in WEAK_SETTINGS}
    return {k: v for k, v in filled.items() if k not in unused_flags(method)}


def settings_key(settings, method=None):
    """The hash of `settings`, or of the part `method` depends on; a hash (an older results.json)
    is returned as it is; None for no settings."""
    if isinstance(settings, dict):
        return cache_key(**(method_settings(method, settings) if method else settings))
    return settings if isinstance(settings, str) else None


def same_settings(old, new, method):
    """Whether a result made with settings `old` is valid under `new` for `method`: the settings it
    depends on agree (an older results.json's `old`, a hash of all its settings, against all of `new`)."""
    if isinstance(old, str):
        return old == settings_key(new)
    key = settings_key(old, method)
    return key is not None and key == settings_key(new, method)


def describe_difference(old, new, method=None):
    """`name: old -> new` for each setting in which `old` and `new` differ (among those `method`
    depends on, if given)."""
    if not isinstance(old, dict):
        return ("an older results.json that records only a hash of its settings"
                if isinstance(old, str) else "a results.json that records no settings")
    if method:
        old, new = method_settings(method, old), method_settings(method, new)
    cut = lambda v: (str(v)[:37] + "...") if len(str(v)) > 40 else str(v)  # noqa: E731
    shown = lambda d, k: cut(d[k]) if k in d else "(not set)"  # noqa: E731
    return ", ".join(f"{k}: {shown(old, k)} -> {shown(new, k)}"
                     for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))


# ---- The protocol's cached stages: the weak model and its logits (steps 1-2), CLIP's features -----
def image_datasets(args, data, seed, train_tf, eval_tf):
    """The weak model's training images (D_train, augmentation seeded per image) and evaluation
    images (D_test, in order), decoded from the files."""
    root = args.data_root
    return (ImageList(root, data["train_paths"], data["train_labels"], train_tf, seed=seed),
            ImageList(root, data["test_paths"], data["test_labels"], eval_tf))


def weak_stage(args, data, seed, device, precision, settings, create=create_weak_model,
               datasets=image_datasets):
    """Steps 1-2: `create(name, k, pretrained)`'s model fine-tuned on D_train (`datasets`), then
    its logits on all of D_test. Cached under a key of the weak settings (WEAK_SETTINGS), the seed
    and the images' sizes and times.

    Returns:
        (logits [n_test, k], history: the training's rows per epoch, or None from an older cache).
    """
    key = cache_key(**method_settings("weak", settings), k=len(data["classnames"]), seed=seed,
                    images=data["images"])
    name = args.weak_model.replace(":", "-").replace("/", "-")
    stem = Path(args.cache_dir) / f"weak-{args.domain}-{name}-seed{seed}-{key}"
    history_path, history = Path(f"{stem}-history.json"), []

    def train_and_label():
        set_seed(seed)
        model, train_tf, eval_tf = create(args.weak_model, len(data["classnames"]), args.weak_pretrained)
        train_set, eval_set = datasets(args, data, seed, train_tf, eval_tf)

        def train():
            loader = make_loader(train_set, args.batch_size, device, args.workers, shuffle=True,
                                 seed=seed)
            model_ = train_weak_model(model, loader, args.weak_epochs, args.weak_lr, args.warmup_ratio,
                                      device, args.weight_decay, args.lr_schedule, args.max_grad_norm,
                                      precision, history, args.weak_micro_batch)
            atomic_save(history, history_path)
            return model_.cpu().state_dict()
        model.load_state_dict(cached(f"{stem}-model.pt", train, args.force))
        return predict_logits(model, make_loader(eval_set, args.batch_size, device, args.workers),
                              device)
    try:
        logits = cached(f"{stem}-logits.pt", train_and_label, args.force)
    except FloatingPointError as e:
        raise UserError(f"{args.domain} seed {seed} weak: {e}; lower --weak-lr (now "
                        f"{args.weak_lr:g})") from None
    return logits, (history or (load_cache(history_path) if history_path.exists() else None))


def feature_stage(args, data, device, precision, settings):
    """{"clip": the CLIP model, "tokenizer", "feats": image features of all of D_test [n, d] on
    `device`}; the features cached under a key of CLIP_SETTINGS, the transform and the images."""
    pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    clip_model, preprocess, tokenizer = load_clip(args.clip_model, pretrained, device)
    key = cache_key(**{k: settings[k] for k in CLIP_SETTINGS}, transform=repr(preprocess),
                    images=data["images"])
    path = Path(args.cache_dir) / f"clip-{args.domain}-{Path(args.clip_model).stem}-{key}.pt"
    loader = make_loader(ImageList(args.data_root, data["test_paths"], data["test_labels"], preprocess),
                         args.batch_size, device, args.workers)
    feats = cached(path, lambda: encode_images(clip_model, loader, device, precision), args.force)
    return {"clip": clip_model, "tokenizer": tokenizer, "feats": feats.to(device)}


# ---- Results: <out-dir>/<domain>/<method>/seed<k>/{results.json, head.pt, epochs.csv}, whole ------
def result_path(out_dir, domain, method, seed):
    """Where a run's results.json goes."""
    return Path(out_dir) / domain / method / f"seed{seed}" / "results.json"


def read_result(path, then="skipped"):
    """A results.json as a dict, or None with a one-line warning naming it and `then` if it is not
    a JSON object with a test accuracy."""
    try:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(r, dict) and isinstance(r.get("test_accuracy"), (int, float)):
            return r
    except (OSError, ValueError):
        pass
    print(f"warning: {path} cannot be read as a results file; {then}", file=sys.stderr, flush=True)
    return None


def pending_runs(args, methods, settings):
    """{seed: the methods still to run}: a finished results.json made with the same `settings`
    is kept (resumed); one made with other settings stops the command (unless --force)."""
    todo = {}
    for seed in args.seeds:
        todo[seed] = []
        for m in methods:
            path = result_path(args.out_dir, args.domain, m, seed)
            old = read_result(path, "the run is redone") if path.exists() and not args.force else None
            if old is not None and not same_settings(old.get("settings"), settings, m):
                changed = describe_difference(old.get("settings"), settings, m)
                raise UserError(f"{path} was made with other settings ({changed}); pass --force to "
                                f"replace it or use another --out-dir")
            if old is None:
                for name in ("head.pt", "results.json", "epochs.csv"):  # before hours of training
                    refuse_link(path.with_name(name))
                todo[seed].append(m)
    return todo


EPOCH_FIELDS = ("head", *(name for name, h in HYPERPARAMETERS.items() if h[1]), "text_lr", "epoch",
                "step", "loss", "val_loss", "val_score", "train_true_acc", "train_agreement",
                "test_acc")  # epochs.csv


@contextlib.contextmanager
def epochs_log(path):
    """A function that appends a row to the epochs.csv beside results `path` as training goes,
    into a temporary file: removed if the block fails, renamed by `save_run`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, "epochs.csv")
    log_path = temp_path(path.with_name("epochs.csv"))
    try:
        with open(log_path, "w", newline="") as log:
            writer = csv.DictWriter(log, EPOCH_FIELDS, extrasaction="ignore")
            writer.writeheader()

            def write(row):
                try:
                    writer.writerow(row)
                    log.flush()
                except OSError as e:
                    raise UserError(f"cannot write {path.with_name('epochs.csv')} ({e.strerror}); "
                                    f"free some space or point --out-dir elsewhere") from None
            yield write
    except BaseException:  # no log without its results.json
        log_path.unlink(missing_ok=True)
        raise


def save_run(path, result, head, settings, force=False):
    """Write a run's head.pt, results.json and its epochs.csv under a lock; a results.json that
    another command wrote meanwhile with other settings is kept (a UserError) unless `force`."""
    log_path = temp_path(path.with_name("epochs.csv"))
    try:
        with file_lock(path):
            for name in ("head.pt", "results.json", "epochs.csv"):
                refuse_link(path.with_name(name))
            other = read_result(path, "replaced") if path.exists() else None
            method = result["method"]
            if other is not None and not force and not same_settings(other.get("settings"), settings, method):
                raise UserError(f"{path} was written by another command meanwhile, with other "
                                f"settings ({describe_difference(other.get('settings'), settings, method)}"
                                f"); kept it: rerun with another --out-dir")
            if head is not None:  # before results.json, which names it by digest
                atomic_save(head, path.with_name("head.pt"))
                result = {**result, "head_digest": file_digest(path.with_name("head.pt"))}
            atomic_save(result, path)
            fsync_path(log_path)
            os.replace(log_path, path.with_name("epochs.csv"))
            fsync_path(path.parent)
    finally:
        log_path.unlink(missing_ok=True)


# ---- The device a run uses, checked and recorded -------------------------------------------------
def gpu_build_problem(capability, arch_list, version=None):
    """Why this torch build cannot run a GPU of compute capability (major, minor), or None: it can
    with the GPU's sm_XY, one of the same major and a lower minor, or PTX compute_XY at most it."""
    cc = 10 * capability[0] + capability[1]
    sm = {int(a[3:]) for a in arch_list if a.startswith("sm_") and a[3:].isdigit()}
    ptx = {int(a[8:]) for a in arch_list if a.startswith("compute_") and a[8:].isdigit()}
    if any(a // 10 == cc // 10 and a <= cc for a in sm) or any(p <= cc for p in ptx):
        return None
    return (f"the installed torch {version or torch.__version__} has GPU kernels for "
            f"{' '.join(sorted(arch_list)) or 'no GPU'}, not for this GPU's sm_{cc}")


def choose_device(requested, precision):
    """(device, precision, hardware report) of a run: --device after a one-element allocation on
    it, or CUDA when usable, else the CPU; a GPU this torch build has no kernels for, a device
    that is not usable here and bf16/fp16 on a CPU are UserErrors."""
    try:
        dev = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count():
            capability = torch.cuda.get_device_capability(dev)  # before any kernel runs on it
            problem = None if torch.version.hip else gpu_build_problem(capability,
                                                                      torch.cuda.get_arch_list())
            if problem:
                raise UserError(f"--device {dev}: {problem}; install a torch build for it (`make venv "
                                f"TORCH_INDEX=...`) or pass --device cpu")
        if dev.type == "meta":
            raise RuntimeError("the meta device holds no data")
        torch.zeros(1, device=dev)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)  # the current device: pinned memory, streams, current_device()
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
        raise UserError(f"--device {requested}: not usable here ({one_line(e, 100)}); pass --device "
                        f"cpu, cuda or cuda:<index>") from None
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    precision = resolve_precision(precision, dev.type, capability)
    report = {"device": str(dev), "precision": precision, "torch": torch.__version__}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        report.update(device=f"cuda:{index}", name=torch.cuda.get_device_name(index),
                      capability=f"sm_{capability[0]}{capability[1]}", cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    else:
        report.update(name=dev.type, threads=torch.get_num_threads())
    return str(dev), precision, report


def device_line(report):
    """`device: cuda:0, NVIDIA A100-SXM4-40GB, sm_80, bf16` or `device: cpu, fp32`."""
    parts = [report["device"], report.get("name"), report.get("capability"), report["precision"]]
    return "device: " + ", ".join(p for p in dict.fromkeys(parts) if p)


# ---- The run: Section 5 for one domain, every seed and method, on DomainNet's files --------------
def domain_data(args, device):
    """Preflight of one DomainNet domain before any work: the model names and files known, the
    folders writable, the split files read (`load_domain`), every image checked. Returns
    load_domain's dict with the images' `image_stats_digest` (part of the cache keys)."""
    if args.domain not in DOMAINS:
        raise UserError(f"--domain {args.domain}: DomainNet has {', '.join(DOMAINS)}; other data: "
                        f"`{PACKAGE_COMMAND} --dataset officehome` or `folder`")
    if args.weak_model.startswith("hf:"):
        raise UserError(f"--weak-model {args.weak_model}: Hugging Face weak models are "
                        f"w2s_clip_lab's; run `{PACKAGE_COMMAND}` with the same flags")
    import open_clip
    import timm
    if not timm.is_model(args.weak_model):
        raise UserError(f"--weak-model {args.weak_model}: not a timm model (timm.list_models())")
    json_config = args.clip_model.endswith(".json")
    if (json_config and not os.path.isfile(args.clip_model)) or (
            not json_config and args.clip_model not in open_clip.list_models()):
        raise UserError(f"--clip-model {args.clip_model}: neither an open_clip model name "
                        f"(open_clip.list_models()) nor an open_clip JSON config file")
    weights = args.clip_pretrained
    if (os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))) and not (
            os.path.isfile(weights)):
        raise UserError(f"--clip-pretrained {weights}: no such checkpoint file")
    check_writable(args.out_dir, "--out-dir")
    check_writable(args.cache_dir, "--cache-dir")
    data = load_domain(args.data_root, args.domain)
    split_sizes(len(data["test_labels"]), os.path.join(args.data_root, f"{args.domain}_test.txt"))
    check_images(args.data_root, data["train_paths"] + data["test_paths"])
    return {**data, "images": image_stats_digest(args.data_root, data["train_paths"] + data["test_paths"])}


def check_writable(folder, flag):
    """Stop early, naming `flag`, if `folder` cannot be created or written (a file, a full disk)."""
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
                            f"another folder") from None
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); pick another folder") from None


def split_sizes(n_test, where):
    """{hold_train, hold_val, test: images} of a D_test of `n_test` images (`protocol_splits`); a
    UserError naming `where` (its split file) when one would be empty."""
    sizes = {name: len(i) for name, i in protocol_splits(n_test, 0).items()}
    if min(sizes.values()) == 0:
        raise UserError(f"{where} lists {n_test} images, too few: the splits {sizes} must all be "
                        f"non-empty")
    return sizes


HOOKS = {  # the stages w2s_clip_lab replaces to extend a run: layouts, checks, models, images, CPE
    "data": domain_data,  # (args, device) -> load_domain's dict with "images", after the preflight
    "settings": run_settings,  # (args, data, device, precision) -> run_settings' dict (CLIP_SETTINGS)
    "weak_model": create_weak_model,  # (name, k, pretrained) -> (model, train and eval transforms)
    "datasets": image_datasets,  # (args, data, seed, train_tf, eval_tf) -> two Datasets
    "seed": None,  # (args, strong, data, splits, methods): before a seed's methods (CPE)
    "on_head": None,  # (strong, data, splits, weak_logits) -> run_method's on_head (CMM)
    "after_seed": None,  # (args, seed, methods, settings, results of this command): a box per seed
}


def requested_methods(names):
    """--method's names with each group (all, lp, tp: METHOD_GROUPS) expanded, in order, once each."""
    return list(dict.fromkeys(m for name in names for m in METHOD_GROUPS.get(name, [name])))


def run_experiment(args, hooks=None):
    """The paper's protocol for one domain (Section 5), every seed: the splits (step 0), the weak
    model and its logits (steps 1-2), every requested method (steps 3-5) on CLIP features computed
    once, each result saved as it finishes; finished runs are kept; then a table of the seeds.
    `hooks` ({name: function}, HOOKS) replace the stages another entry point extends."""
    hooks = {**HOOKS, **(hooks or {})}
    methods = requested_methods(args.method)
    device, precision, hardware = choose_device(args.device, args.precision)
    print(device_line(hardware), flush=True)
    data = hooks["data"](args, device)  # D_train and D_test, checked
    settings = hooks["settings"](args, data, device, precision)
    todo = pending_runs(args, methods, settings)  # {seed: methods}: finished runs are kept
    strong = None  # CLIP, its tokenizer and D_test's image features: once, before any training
    if any(set(pending) - {"weak"} for pending in todo.values()):
        strong = feature_stage(args, data, device, precision, settings)
    for seed in args.seeds:
        results = {}
        if todo[seed]:
            splits = protocol_splits(len(data["test_labels"]), seed)  # step 0
            weak_logits, history = weak_stage(args, data, seed, device, precision, settings,
                                              hooks["weak_model"], hooks["datasets"])  # steps 1-2
            if hooks["seed"] and strong:
                hooks["seed"](args, strong, data, splits, todo[seed])
            on_head = strong and hooks["on_head"] and hooks["on_head"](strong, data, splits, weak_logits)
            results = {m: run_and_save(m, seed, args, data, splits, weak_logits, history, strong,
                                       settings, hardware, on_head or None) for m in todo[seed]}  # steps 3-5
        if hooks["after_seed"]:
            hooks["after_seed"](args, seed, methods, settings, results)
    if not any(todo.values()):
        print(f"all runs exist under {args.out_dir}/{args.domain}; --force recomputes them")
    print(seeds_table(args.out_dir, args.domain, args.seeds, methods, settings))


def run_and_save(method, seed, args, data, splits, weak_logits, history, strong, settings, hardware,
                 on_head=None):
    """One method on one seed (`run_method`), its epochs logged as training goes, its results,
    head and log saved together (`save_run`) with what made them (`history`: the weak model's
    training rows, kept with the weak run); returns the results."""
    device = hardware["device"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start, path = time.time(), result_path(args.out_dir, args.domain, method, seed)
    try:
        with epochs_log(path) as on_epoch:
            result = run_method(method, args, data, splits, weak_logits, strong, seed, on_epoch, on_head)
    except FloatingPointError as e:
        raise UserError(f"{args.domain} seed {seed} {method}: {e}; lower --lr (now {args.lr:g}) or "
                        f"check --tau-grid, --cpl-logit-scale, --kd-temperature-grid") from None
    for warning in result.get("warnings", []):
        print(f"warning: {args.domain} seed {seed} {method}: {warning}", file=sys.stderr, flush=True)
    head = result.pop("_head", None)
    if method == "weak":
        result["weak_training"] = history  # per epoch; None from an older cache
    result.update(domain=args.domain, method=method, seed=seed, classnames=data["classnames"],
                  hardware=hardware, n_weak_train=len(data["train_labels"]),
                  **{f"n_{s}": len(i) for s, i in splits.items()}, seconds=time.time() - start,
                  settings=settings, settings_key=settings_key(settings), config=vars(args))
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    save_run(path, result, head, settings, args.force)
    tuned = "".join(f", {name} {value:g}" for name, value in result["tuned"].items())
    print(f"{args.domain} seed {seed} {method}: {100 * result['test_accuracy']:.2f}% on D'_test in "
          f"{result['seconds']:.1f} s{tuned} -> {path}", flush=True)
    return result


def seeds_table(out_dir, domain, seeds, methods, settings):
    """The D'_test accuracy (%) of each method (weak first, the ceiling last) per seed, its mean and
    std over seeds, and the PGR (Burns et al. 2023) of the means over the seeds where weak, the
    method and the ceiling all have a run; from the results.json files made with `settings`."""
    order = ["weak", *[m for m in methods if m not in ("weak", "ceiling")], "ceiling"]
    acc = {m: {} for m in order}
    for m in order:
        for s in seeds:
            path = result_path(out_dir, domain, m, s)
            r = read_result(path, "left out of the table") if path.exists() else None
            if r is not None and same_settings(r.get("settings"), settings, m):
                acc[m][s] = 100 * r["test_accuracy"]
    mean = lambda m, over: sum(acc[m][s] for s in over) / len(over)  # noqa: E731
    lines = [f"{domain}: accuracy on D'_test (%) per seed, mean and std over seeds, PGR of the means",
             f"{'method':<14}" + "".join(f"{f'seed {s}':>8}" for s in seeds)
             + f"{'mean':>8}{'std':>6}{'PGR':>7}"]
    for m in (m for m in order if acc[m]):
        values = list(acc[m].values())
        both = [s for s in acc[m] if s in acc["weak"] and s in acc["ceiling"]]  # PGR's seeds
        std = math.sqrt(sum((v - mean(m, acc[m])) ** 2 for v in values) / max(1, len(values) - 1))
        gap = ("" if m in ("weak", "ceiling") or not both
               else f"{pgr(mean('weak', both), mean(m, both), mean('ceiling', both)):7.2f}")
        lines.append(f"{m:<14}" + "".join(f"{acc[m][s]:8.2f}" if s in acc[m] else f"{'-':>8}" for s in seeds)
                     + f"{mean(m, acc[m]):8.2f}{std:6.2f}" + gap.replace("nan", "n/a"))
    return "\n".join(lines)


# ---- The command line: flag types, the flags, and main -------------------------------------------
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each default shown once: not for None, a switch's off state or a help text that
    already names its default; the description and the examples as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default:" in text
                or isinstance(action, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`error: argument --x: ...; see --help`),
    exit status 1, instead of the usage block and the error."""

    def error(self, message):
        self.exit(1, f"error: {message}; see --help\n")


def build_parser():
    """The command line of the paper's protocol, flags grouped by stage (docs/reference.md);
    w2s_clip_lab's command adds its own flags to it."""
    examples = [line for line in __doc__.splitlines() if line.startswith("    ")]
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                      epilog="examples:\n" + "\n".join(examples) + "\nmanual: README.md, docs/")
    data = p.add_argument_group("data: which images, which domain, which splits")
    data.add_argument("--data-root", default="data/domainnet",
                      help="folder with <domain>/<class>/<file>.jpg and <domain>_{train,test}.txt "
                           "(DomainNet's official files)")
    data.add_argument("--domain", default="sketch", help=f"DomainNet's domain: {', '.join(DOMAINS)}")
    data.add_argument("--seeds", type=seed_value, nargs="+", default=[0, 1, 2, 3, 4],
                      help="one run per seed: the D_test split, weak model and head all follow it")
    data.add_argument("--workers", type=int, choices=range(0, 65), metavar="N",
                      default=min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count() or 1),
                      help="data-loader worker processes for image decoding (no effect on results)")
    weak = p.add_argument_group("weak model: fine-tuned on D_train with true labels")
    weak.add_argument("--weak-model", default="resnet18",
                      help="any timm model name (Table 3's Hugging Face ones, hf:<id>: "
                           f"`{PACKAGE_COMMAND}`)")
    weak.add_argument("--no-weak-pretrained", dest="weak_pretrained", action="store_false",
                      help="random-init weak model instead of ImageNet weights (offline use)")
    weak.add_argument("--weak-epochs", type=positive(int), default=3, help="weak fine-tuning epochs (paper)")
    weak.add_argument("--weak-lr", type=positive(float), default=1e-3, help="weak fine-tuning learning rate")
    weak.add_argument("--weak-micro-batch", type=positive(int), default=None, metavar="N",
                      help="run each weak-training batch of --batch-size in parts of N images, "
                           "gradients added up: the paper's batch of 512 on a smaller card "
                           "(BatchNorm then normalises over N images); default: the whole batch")
    strong = p.add_argument_group("strong model: open_clip CLIP, image tower frozen")
    strong.add_argument("--clip-model", default="ViT-B-32",
                        help="open_clip model name, or a path to an open_clip JSON model config")
    strong.add_argument("--clip-pretrained", default="openai",
                        help="open_clip pretrained tag or checkpoint file; 'none' = random init")
    heads = p.add_argument_group("methods, heads and losses")
    heads.add_argument("--method", choices=METHODS + tuple(METHOD_GROUPS), nargs="+", default=["cpl"],
                       metavar="METHOD", help=f"one or more of {', '.join(METHODS)}; or all, lp "
                                              f"(every <loss>-lp), tp (every <loss>-tp)")
    heads.add_argument("--cpl-logit-scale", type=positive(float), default=1.0,
                       help="CPL and cpl-text logits = scale * cos(x, C): 1 = Eq. 3; 100 = CLIP's scale")
    heads.add_argument("--prototype-norm", choices=("raw", "unit"), default="raw",
                       help="CPL's initial prototypes: raw text embeddings (Algorithm 1, line 2) or "
                            "L2-normalised (open_clip's zero-shot classifier)")
    heads.add_argument("--lp-input", choices=("raw", "normalized"), default="raw",
                       help="LP input: the raw image feature (Eq. 1) or the L2-normalised one")
    heads.add_argument("--prototype-init", choices=("single", "ensemble"), default="single",
                       help="CPL init: --prompt-template (Algorithm 1) or the mean over open_clip's 80 "
                            f"ImageNet templates (Table 4; CPE-weighted: `{PACKAGE_COMMAND}`)")
    heads.add_argument("--prompt-template", type=prompt_template, default="a photo of a {}",
                       help="CPL's and cpl-text's prompt, one {} for the class name (Algorithm 1, line 2, "
                            "no period)")
    train = p.add_argument_group("training (weak model and heads)")
    train.add_argument("--strong-epochs", type=positive(int), default=10, help="head training epochs")
    train.add_argument("--batch-size", type=positive(int), default=512, help="batch size, weak and strong")
    train.add_argument("--lr", type=positive(float), default=1e-2, help="head learning rate (AdamW)")
    train.add_argument("--text-lr", type=positive(float), default=1e-5,
                       help="learning rate of the text tower for cpl-text (Table 4)")
    train.add_argument("--warmup-ratio", type=in_range(0, 1), default=0.1, help="warm-up share (paper)")
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
    losses = p.add_argument_group("losses' hyperparameters (HYPERPARAMETERS)")
    tune = p.add_argument_group("hold-val tuning (Section 5, step 4)")
    tune.add_argument("--tune", choices=("hold-val", "none"), default="hold-val",
                      help="choose each weak-to-strong method's open hyperparameters from the grids "
                           "below on hold-val with weak labels only (Section 5, step 4), or keep the "
                           "fixed values of the losses' flags and --text-lr")
    tune.add_argument("--tune-by", choices=TUNING_RULES, default="agreement",
                      help="tuning criterion on hold-val, against the weak labels: agreement with them, "
                           "the lowest KL(softmax(w) || the head's own p^s), or the lowest loss of the "
                           "method at the flags' values (HF Trainer's eval loss, one loss for every grid "
                           "point); each comparable across temperatures")
    tune.add_argument("--text-lr-grid", type=positive(float), nargs="+", default=[1e-6, 1e-5, 1e-4],
                      help="cpl-text text-tower learning-rate grid (not stated; a decade either side "
                           "of --text-lr)")
    kinds = {"positive": positive(float), "fraction": in_range(0, 1)}
    for name, (default, grid, kind, text) in HYPERPARAMETERS.items():
        flag, kind = "--" + name.replace("_", "-"), kinds.get(kind, str)
        choices = HYPERPARAMETERS[name][2] if kind is str else None  # e.g. --cpl-kl
        losses.add_argument(flag, type=kind, choices=choices, default=default,
                            help=text.split(". Grid: ")[0].replace("%", "%%"))
        if grid:
            tune.add_argument(flag + "-grid", type=kind, nargs="+", default=list(grid),
                              help=f"{flag}'s grid ({text.split('. Grid: ')[-1]})")
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
    return p


def parse_args(argv=None, parser=None):
    """The flags of `argv` (default sys.argv) by `parser` (default `build_parser()`); a domain
    typed as a path (`sketch/`) is its name, a real path is refused in one line (a DomainNet
    domain name is checked by `domain_data`)."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    args.domain = args.domain.rstrip("/").removeprefix("./")  # `sketch/` from tab completion
    if "/" in args.domain or args.domain in ("", ".", ".."):  # a name: paths go to --data-root
        p.error(f"argument --domain: {args.domain!r} is a path; a domain is one folder name under "
                f"--data-root")
    return args


def main(argv=None, parser=None, run=run_experiment):
    """Section 5 for one domain: the flags parsed (`parse_args`), then `run(args)`. A user's
    mistake is one line on stderr and exit status 1; Ctrl-C exits 130 (finished runs and caches
    are whole files, the rest is redone by the same command)."""
    args = parse_args(argv, parser)
    try:
        run(args)
    except UserError as e:  # also re-raised from data-loader workers, with their traceback
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except torch.OutOfMemoryError:
        sys.exit(f"error: out of GPU memory on {args.device or 'cuda'}; pass --weak-micro-batch 128 "
                 f"(the same weak-training step in parts) or, changing the setting, a smaller --batch-size")
    except OSError as e:  # a full disk outside atomic_save, a file it may not read
        where = e.filename or f"{args.out_dir} or {args.cache_dir}"
        if e.errno in (errno.EACCES, errno.EPERM):
            sys.exit(f"error: permission denied on {where}; check its permissions")
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        sys.exit(f"error: no space left on {where} ({e.strerror}); free some space and run the "
                 f"command again")


if __name__ == "__main__":
    main()
