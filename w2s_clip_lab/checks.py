"""Checks before any work, for the runner: model names, checkpoint files, images, folders, the
device and the split flags (the flag types themselves are w2s_clip.py's, beside its parser).

Each mistake becomes one line naming the flag or file and what to do (a `UserError`); nothing here
changes a result.
"""
import argparse
import errno
import json
import logging
import math
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from w2s_clip import UserError, resolve_precision
from w2s_clip_lab.hf import check_hf_weak_model, import_transformers
from w2s_clip_lab.weights import offline_problem


# ------------------------------------------------------------------------------------------------
# A table script's flag type, and one-line messages
# ------------------------------------------------------------------------------------------------
def label_dir(text):
    """argparse type: `LABEL=DIR` (a table row's label and its results folder) -> (label, dir)."""
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    return label, folder


def one_line(error, limit=160):
    """The first informative line of an exception's message (a heading ending in ':' is joined
    to the line after it), cut to `limit` characters, for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Models, checkpoint files and images, checked before any work
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
            raise UserError(f"image {path} is {what}; replace it or remove it (DomainNet: "
                            f"re-download the domain with `make data`)")


# ------------------------------------------------------------------------------------------------
# The device and its precision
# ------------------------------------------------------------------------------------------------


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
    slowest 2-core CPU rates `make bench` gave (13.8 CLIP images/s, 9.4 weak training images/s;
    docs/speed.md's latest run: 17.7 and 16.6) and strong heads with tuning at about 11 CLIP
    passes per seed (there: 10.68); None for a small one."""
    if n_train + n_test < 20000:
        return None
    hours = (n_test / 13.8 * (1 + 11 * seeds) + seeds * weak_epochs * n_train / 9.4) / 3600
    return (f"warning: no usable GPU, so this runs on the CPU: roughly {hours:.0f} h for "
            f"{n_train + n_test} images and {seeds} seeds (docs/speed.md); pass --device cpu to "
            f"mean it, or see README, Running on a GPU")


# ------------------------------------------------------------------------------------------------
# Folders and notes, checked and printed before a run (the runner's preflight)
# ------------------------------------------------------------------------------------------------
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


def check_split_flags(args):
    """Office-Home's split flags: a share that leaves a split empty, or either flag given for a
    data set with a split of its own (where it would be ignored), is a UserError."""
    if args.dataset == "officehome" and not 0 < args.split_share < 1:
        raise UserError(f"--split-share {args.split_share:g} leaves no image of a class in one "
                        f"split; pick a share strictly between 0 and 1 (DomainBed's 0.8)")
    if args.dataset != "officehome" and (args.split_share != 0.8 or args.split_seed != 0):
        flag = "--split-share" if args.split_share != 0.8 else "--split-seed"
        raise UserError(f"{flag} applies to --dataset officehome only; {args.dataset} has its own "
                        f"train and test split: leave it out")
