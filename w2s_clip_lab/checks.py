"""The package's thorough checks before any work: model names and tags, checkpoint files, folders,
the split flags and notes on a run's size (the images and the device are checked by w2s_clip.py).

Each mistake becomes one line naming the flag or file and what to do (a `UserError`); nothing here
changes a result.
"""
import argparse
import json
import logging
import math
import os
import pickle
import warnings
from pathlib import Path


from w2s_clip import (UserError, check_images, check_writable, choose_device,  # noqa: F401 (re-exported)
                      device_line, gpu_build_problem, one_line)
from w2s_clip_lab.hf import check_hf_weak_model, import_transformers
from w2s_clip_lab.weights import offline_problem


# ------------------------------------------------------------------------------------------------
# A table script's flag type (one-line messages: w2s_clip.one_line, named here)
# ------------------------------------------------------------------------------------------------
def label_dir(text):
    """argparse type: `LABEL=DIR` (a table row's label and its results folder) -> (label, dir)."""
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    return label, folder


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
            f"mean it, or see docs/usage.md, Running on a GPU")


# ------------------------------------------------------------------------------------------------
# Notes and flags, checked and printed before a run (the package's preflight, run.py)
# ------------------------------------------------------------------------------------------------
def small_test_note(n, limit=1000):
    """A note when D'_test (n images) is too small to rank methods a few points apart: one image
    is 100/n points and an accuracy near 50% has a binomial standard error of 50/sqrt(n) points."""
    if n >= limit:
        return None
    return (f"note: D'_test has {n} images per seed: one image is {100 / n:.2f} points and an "
            f"accuracy near 50% has a standard error of ±{50 / math.sqrt(n):.1f} points, so "
            f"methods a few points apart are not ranked by one seed (more test images or seeds)")


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
