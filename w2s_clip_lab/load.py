"""A trained head back from its run folder, ready to score CLIP image features of new images.

    from w2s_clip_lab.load import load_run
    run = load_run("runs/sketch/cpl/seed0", "cuda")
    x = torch.stack([run.preprocess(Image.open(p).convert("RGB")) for p in paths]).to("cuda")
    names = [run.classnames[i] for i in run.head(run.clip.encode_image(x)).argmax(-1)]

Each run folder keeps `results.json` (its settings, config and class names) and `head.pt` (the
trained head's parameters, `w2s_clip.head_weights`); `load_run` rebuilds the CLIP model the
settings recorded (a config or checkpoint file by its path, checked against its recorded digest)
and the head of the method (docs/reference.md, "A trained head, back").
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import w2s_clip
from w2s_clip import METHOD_HEAD_LOSS, UserError
from w2s_clip_lab import store


@dataclass
class LoadedRun:
    """What `load_run` returns: `head(features [n, d]) -> logits [n, k]` in `classnames`' order,
    with the CLIP model, its eval preprocessing and tokenizer, and the run's results."""
    head: torch.nn.Module
    clip: torch.nn.Module
    preprocess: object
    tokenizer: object
    classnames: list
    method: str
    result: dict = field(repr=False)


def checked_clip_files(settings, folder, clip_model=None, clip_pretrained=None):
    """(model, pretrained) as `w2s_clip.load_clip` takes them, from a run's settings: a JSON
    config or a checkpoint file at the path the settings recorded (or at `clip_model` /
    `clip_pretrained`, a copy moved elsewhere), whose contents must have the digest recorded
    beside it (`settings["clip"]`); a UserError names one moved or changed."""
    model = clip_model or settings["clip_model"]
    weights = clip_pretrained or settings["clip_pretrained"]
    model_id, weights_id = settings["clip"]
    files = [("--clip-model", model, model_id)] if model.endswith(".json") else []
    if weights.lower() != "none" and weights_id != weights:  # recorded by digest: it was a file
        files.append(("--clip-pretrained", weights, weights_id))
    for flag, path, digest in files:
        if not os.path.isfile(path):
            raise UserError(f"{folder}: its {flag} {path} is gone (moved or deleted); put it back, "
                            f"or pass load_run(..., {flag[2:].replace('-', '_')}=<where it is now>)")
        if w2s_clip.file_digest(path) != digest:
            raise UserError(f"{folder}: its {flag} {path} has changed since the run (digest "
                            f"{w2s_clip.file_digest(path)}, recorded {digest}); this head was "
                            f"trained with the other one")
    return model, None if weights.lower() == "none" else weights


def head_of(kind, state, clip, tokenizer, classnames, settings):
    """An untrained head of `kind` (lp, tp, cpl, cpl-text) shaped as `state` (head.pt), loaded
    with it: every parameter the run saved, no other."""
    scale, needs = settings["cpl_logit_scale"], {"cpl-text": "class_features", "cpl": "prototypes"}
    if kind in needs and set(state) != {needs[kind]}:
        raise UserError(f"head.pt holds {sorted(state)}, not the {kind} head's ['{needs[kind]}']")
    if kind == "cpl-text":  # the tuned text tower's class features: logits = scale * cos(x, C)
        head = w2s_clip.PrototypeHead(state["class_features"], logit_scale=scale)
        return head.requires_grad_(False)
    if kind == "cpl":
        return w2s_clip.PrototypeHead(state["prototypes"], logit_scale=scale)
    if kind == "lp":
        weight = state["fc.weight"]
        head = w2s_clip.LinearHead(weight.shape[1], weight.shape[0],
                                   normalize_input=settings["lp_input"] == "normalized")
    else:
        head = w2s_clip.PromptHead(clip, tokenizer, classnames)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise UserError(f"head.pt holds {sorted(state)}, not the {kind} head's {sorted(trainable)}")
    head.load_state_dict(state, strict=False)
    return head


def load_run(run_folder, device="cpu", clip_model=None, clip_pretrained=None):
    """The trained head of a run folder (`<out-dir>/<domain>/<method>/seed<k>`, or its
    results.json) on `device`, in eval mode, with the CLIP model it scores the features of.

    cpl, cpl-text, zero-shot and every `<loss>-lp` / `<loss>-tp` give their head; the ceiling the
    head it chose (its `ceiling_head`); a weak run keeps no head (a UserError says where its
    model is). A UserError names the file for a folder without a results.json or head.pt, and
    for a CLIP config or checkpoint moved (`clip_model`, `clip_pretrained`: where it is now, checked
    by its digest) or changed since the run, and for a head.pt that is not the run's own (the
    digest results.json records).
    Returns:
        LoadedRun: head (features [n, d] -> logits [n, k]), clip, preprocess, tokenizer,
        classnames, method, result.
    """
    folder = Path(run_folder)
    path = folder / "results.json" if folder.is_dir() else folder
    folder = path.parent
    if not path.is_file():
        raise UserError(f"{path} not found: pass a run folder <out-dir>/<domain>/<method>/seed<k>")
    result = store.read_result(path, "cannot load it")
    if result is None:
        raise UserError(f"{path} is not a readable results file; rerun the method to remake it")
    method = result["method"]
    if method == "weak":
        raise UserError(f"{folder}: a weak run keeps no head; its model is in the run's --cache-dir "
                        f"as weak-{result['domain']}-<model>-seed{result['seed']}-<key>-model.pt "
                        f"(timm.create_model({result['config'].get('weak_model')!r}, num_classes="
                        f"{len(result.get('classnames', []))}) loads it)")
    if not isinstance(result.get("settings"), dict) or "classnames" not in result:
        raise UserError(f"{path} is from an older version without settings or class names; rerun "
                        f"the method to load its head")
    settings = w2s_clip.filled_settings(result["settings"])
    kind = (METHOD_HEAD_LOSS[method][0] if method in METHOD_HEAD_LOSS
            else "cpl" if method == "zero-shot" else result.get("ceiling_head"))
    if kind not in ("lp", "tp", "cpl", "cpl-text"):
        raise UserError(f"{path}: no head to load for method {method!r}")
    if not (folder / "head.pt").is_file():
        raise UserError(f"{folder / 'head.pt'} not found: the run's head is gone; rerun the method")
    recorded = result.get("head_digest")  # written with the head, by w2s_clip.save_run
    if recorded and w2s_clip.file_digest(folder / "head.pt") != recorded:
        raise UserError(f"{folder / 'head.pt'} is not the head this results.json was written with "
                        f"(another run's, or a rerun stopped between the two); rerun the method")
    model, pretrained = checked_clip_files(settings, folder, clip_model, clip_pretrained)
    clip, preprocess, tokenizer = w2s_clip.load_clip(model, pretrained, device)
    state = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
    head = head_of(kind, state, clip, tokenizer, result["classnames"], settings)
    return LoadedRun(head.to(device).eval(), clip, preprocess, tokenizer, result["classnames"],
                     method, result)
