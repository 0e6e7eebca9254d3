"""Weak-to-strong generalization for CLIP-based classification, with class prototype learning (CPL).

Reference implementation of J. Li, S. M. Erfani, L. Feng, J. Bailey and F. Liu, "Exploring
Weak-to-Strong Generalization for CLIP-based Classification", TMLR 2025 (arXiv:2511.18396): a weak
model fine-tuned on true labels labels held-out images; a frozen open_clip image tower plus one
trainable head (LP, TP or CPL) learns from those weak labels only. Manual: README.md.

    make demo  # the miniature on the CPU, no download (~2 min)
    python w2s_clip.py --domain sketch --method cpl  # DomainNet sketch, five seeds (GPU)
    python w2s_clip.py --domain sketch --method all --seeds 0  # every method; caches shared
    python w2s_clip.py --build-tables --out-dir runs --tables-dir results  # Tables 2-4

This file is the method, in the paper's order, and its command line; it imports nothing of the
project but, in `main`, the runner of the package beside it (w2s_clip_lab/: the checks, caches and
results files, reports, data layouts, Hugging Face weak models, CPE, the miniature; README).
"""
import argparse
import copy
import logging
import math
import os
import pickle
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")  # DomainNet's
DATASETS = ("domainnet", "officehome", "folder")  # layouts: w2s_clip_lab/datasets.py for the others


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a file); main() prints it as one line."""


def set_seed(seed):
    """Seed Python's, torch's and every CUDA device's generators."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# ------------------------------------------------------------------------------------------------
# Data and splits (paper Section 5, step 0)
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Weak model (step 1): a timm or Hugging Face model fine-tuned on D_train with true labels
# ------------------------------------------------------------------------------------------------
def create_weak_model(name, num_classes, pretrained=True):
    """A timm classifier with a fresh k-way head, plus timm's own train and eval transforms (a
    Hugging Face one, `hf:<id>`: `w2s_clip_lab.hf.create_hf_weak_model`, the same triple)."""
    import timm
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as e:  # no network, no weights, a bad file
        raise UserError(f"cannot load timm model {name} (pretrained={pretrained}): "
                        f"{str(e).splitlines()[0]}; check the network or pass --no-weak-pretrained")
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


# ------------------------------------------------------------------------------------------------
# Weak labels (step 2): the weak model's logits on D_hold
# ------------------------------------------------------------------------------------------------
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
# The text tower, packed (TP and cpl-text): the tokens all prompts share run once, each prompt's
# own tokens packed; equals open_clip's encode_text up to float rounding (tested)
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# The protocol (Section 5): weak model -> weak labels -> features -> heads, per seed
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# The command line: flag types, the flags, and main (the runner, w2s_clip_lab/runner.py, does the rest)
# ------------------------------------------------------------------------------------------------
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
    exit status 2, instead of the usage block and the error."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def parse_args(argv=None):
    """The command line; every flag is documented in docs/reference.md."""
    examples = [line for line in __doc__.splitlines() if line.startswith("    ")]
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                      epilog="examples:\n" + "\n".join(examples) + "\nmanual: README.md, docs/")
    data = p.add_argument_group("data: which images, which domain, which splits")
    data.add_argument("--dataset", choices=DATASETS, default="domainnet",
                      help="layout of --data-root: domainnet (split files), officehome "
                           "(<Domain>/<Class>/<image>, split here) or folder "
                           "(<domain>/{train,test}/<class>/<image>); see w2s_clip_lab/datasets.py")
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
    out.add_argument("--build-tables", action="store_true",
                     help="only build Tables 2-4 and Figure 2 from the results under --out-dir")
    out.add_argument("--tables-dir", default="results", help="where --build-tables writes")
    out.add_argument("--make-demo", metavar="DIR",
                     help="only write a synthetic dataset (--dataset folder) and a tiny CLIP config")
    args = p.parse_args(argv)
    args.domain = args.domain.rstrip("/").removeprefix("./")  # `sketch/` from tab completion
    if "/" in args.domain or args.domain in ("", ".", ".."):  # a name: paths go to --data-root
        p.error(f"argument --domain: {args.domain!r} is a path; a domain is one folder name under "
                f"--data-root")
    if args.dataset == "domainnet" and args.domain not in DOMAINS and not args.build_tables:
        p.error(f"argument --domain: invalid choice: {args.domain!r} (DomainNet has "
                f"{', '.join(DOMAINS)}; another data set needs --dataset officehome or folder)")
    if args.dataset == "officehome":
        args.domain = args.domain.replace(" ", "_")  # "Real World" is run as Real_World
    return args


def main(argv=None):
    """Parse the flags and hand them to the runner (w2s_clip_lab/runner.py: the checks, the caches,
    the results files), the one place this file imports the project; exit status 1 and one line
    on stderr for a user's mistake."""
    args = parse_args(argv)
    from w2s_clip_lab.runner import run
    run(args)


if __name__ == "__main__":
    sys.modules.setdefault("w2s_clip", sys.modules[__name__])  # one UserError for lazy imports
    main()
