"""Tests for w2s_clip.py: each checks the code against an independent truth.

Truths used: closed forms computed in float64 with an explicit, shifted log-sum-exp;
torch.distributions' own KL; open_clip's own `encode_text` and `build_zero_shot_classifier`;
hand-computed splits and margins; a planted-signal data set where the right answer is known; and
one CLI run as a user would type it. Tiny random-init models only, no download:

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q test_w2s_clip.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import copy
import csv
import functools
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import checks_w2s_clip
import cpe_w2s_clip
import datasets_w2s_clip
import hf_w2s_clip
import minidomainnet
import report_w2s_clip
import store_w2s_clip
import text_w2s_clip
import w2s_clip

HERE = Path(__file__).resolve().parent
PROMPT_NAMES = ["The Eiffel Tower", "t-shirt", "aircraft carrier", "cat"]


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    """A tiny random-init open_clip CLIP (seeded) and the ViT-B-32 tokenizer that ships with it."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")


# ------------------------------------------------------------------------------------------------
# Losses: independent float64 references (explicit shifted log-sum-exp, no F.log_softmax / kl_div)
# ------------------------------------------------------------------------------------------------
def ref_log_softmax(z):
    """log softmax of float64 rows as z - max - log(sum(exp(z - max)))."""
    m = z.max(dim=-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def ref_kl_rows(w, s):
    """Per-row KL(softmax(w) || softmax(s)) = sum_j p_j (log p_j - log q_j), float64."""
    log_p, log_q = ref_log_softmax(w), ref_log_softmax(s)
    return (torch.exp(log_p) * (log_p - log_q)).sum(dim=-1)


def ref_ce_rows(s, target):
    """Per-row -log softmax(s)[target]."""
    return -ref_log_softmax(s)[torch.arange(len(s)), target]


def ref_loss(name, s, w, **h):
    """The docstring formula of loss `name` in float64; s may require grad, w must not."""
    if name == "ce":
        return ref_ce_rows(s, w.argmax(dim=-1)).mean()
    if name in ("kd", "cpl"):
        t = h.get("T", h.get("tau", 1.0))
        factor = t * t if name == "kd" else 1.0  # KD has Hinton's T^2, CPL (Eq. 4-5) has none
        return factor * ref_kl_rows(w / t, s / t).mean()
    if name == "auxconf":
        a = h["alpha"]
        soft = -(torch.exp(ref_log_softmax(w)) * ref_log_softmax(s)).sum(dim=-1)
        self_hard = ref_ce_rows(s, s.detach().argmax(dim=-1))
        return ((1 - a) * soft + a * self_hard).mean()
    if name == "adaptconf":
        T, tau = h["T"], h["tau"]
        ce_self = ref_ce_rows(s, s.detach().argmax(dim=-1))
        ce_weak = ref_ce_rows(s, w.argmax(dim=-1))
        with torch.no_grad():  # beta = e^{a/tau} / (e^{a/tau} + e^{b/tau}), shifted, detached
            a, b = ce_self / tau, ce_weak / tau
            m = torch.maximum(a, b)
            beta = torch.exp(a - m) / (torch.exp(a - m) + torch.exp(b - m))
        return ((1 - beta) * T * T * ref_kl_rows(w / T, s / T) + beta * ce_self).mean()
    raise KeyError(name)


LOSS_CASES = [("ce", {}), ("kd", {"T": 1.0}), ("kd", {"T": 2.5}), ("auxconf", {"alpha": 0.3}),
              ("adaptconf", {"T": 2.0, "tau": 0.5}), ("cpl", {"tau": 1.0}), ("cpl", {"tau": 0.7})]
LOSS_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in h.items())}" for n, h in LOSS_CASES]


def logits_pair(n, k, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, k, generator=g), scale * torch.randn(n, k, generator=g)


def test_losses_registry_has_the_five_losses_and_declares_their_hyperparameters():
    """The CLI reads losses from LOSSES by name; every keyword a loss takes from the run is a
    declared hyperparameter with a default, and a tuned one's grid holds valid values."""
    assert set(w2s_clip.LOSSES) == {"ce", "kd", "auxconf", "adaptconf", "cpl"}
    assert w2s_clip.LOSSES["cpl"][0] is w2s_clip.cpl_loss
    for name, (fn, kwargs) in w2s_clip.LOSSES.items():
        defaults = inspect.signature(fn).parameters
        for keyword, hyper in kwargs.items():
            assert keyword in defaults and hyper in w2s_clip.HYPERPARAMETERS, (name, keyword)
    args = w2s_clip.parse_args([])
    for hyper, (default, grid, _, _) in w2s_clip.HYPERPARAMETERS.items():
        assert getattr(args, hyper) == default
        assert grid is None or getattr(args, f"{hyper}_grid") == list(grid)


def test_a_new_loss_is_its_function_and_one_entry():
    """w2s_clip.py with one more LOSSES entry (a symmetric KL) and one new hyperparameter, nothing
    else changed: its -lp and -tp methods are --method choices (also under `lp` and `tp`), its
    flags exist with their defaults, both its parameters are tuned, and bind_loss gives the loss
    with the flags' values. The tables list any method found in the results (tested below)."""
    import importlib.util
    source = (HERE / "w2s_clip.py").read_text()
    assert source.count("LOSSES = {\n") == 1 and source.count("HYPERPARAMETERS = {\n") == 1
    source = source.replace("LOSSES = {\n", 'LOSSES = {\n    "skl": (lambda s, w, T=1.0, weight=0.5: '
                            'kd_loss(s, w, T) + weight * kd_loss(w, s, T), '
                            '{"T": "kd_temperature", "weight": "skl_weight"}),\n')
    source = source.replace("HYPERPARAMETERS = {\n", 'HYPERPARAMETERS = {\n    "skl_weight": (0.5, '
                            '(0.25, 0.5), "fraction", "the reverse KL\'s weight. Grid: a test\'s"),\n')
    spec = importlib.util.spec_from_loader("w2s_clip_skl", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, "w2s_clip_skl", "exec"), module.__dict__)
    assert {"skl-lp", "skl-tp"} <= set(module.METHODS)
    assert "skl-lp" in module.METHOD_GROUPS["lp"] and "skl-tp" in module.METHOD_GROUPS["tp"]
    args = module.parse_args(["--method", "skl-tp", "--skl-weight", "0.3"])
    assert args.method == ["skl-tp"] and args.skl_weight == 0.3 and args.skl_weight_grid == [0.25, 0.5]
    assert module.METHOD_HEAD_LOSS["skl-lp"] == ("lp", "skl")
    assert module.TUNED_PARAMS["skl"] == ("kd_temperature", "skl_weight")
    assert module.tuning_grid("lp", "skl", {"kd_temperature": [1.0, 2.0], "skl_weight": [0.5]}) == [
        {"kd_temperature": 1.0, "skl_weight": 0.5}, {"kd_temperature": 2.0, "skl_weight": 0.5}]
    s, w = logits_pair(5, 4)
    fn, schedule = module.bind_loss("skl", {**vars(args), "kd_temperature": 2.0})
    assert schedule is None
    torch.testing.assert_close(fn(s, w), w2s_clip.kd_loss(s, w, 2.0) + 0.3 * w2s_clip.kd_loss(w, s, 2.0))


@pytest.mark.parametrize("k", [2, 7])
@pytest.mark.parametrize("name,hyper", LOSS_CASES, ids=LOSS_IDS)
def test_loss_value_and_gradient_match_float64_formula(name, hyper, k):
    """Value and d(loss)/d(strong) equal the docstring formula's, computed independently in float64."""
    s, w = logits_pair(9, k)
    s = s.requires_grad_()
    loss = w2s_clip.LOSSES[name][0](s, w, **hyper)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = ref_loss(name, s64, w.double(), **hyper)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,hyper", LOSS_CASES, ids=LOSS_IDS)
def test_loss_is_stable_for_logits_times_1000(name, hyper):
    """Logits x1000: finite value and gradient that still match the shifted float64 formula."""
    s, w = logits_pair(8, 5, scale=1000.0, seed=1)
    s = s.requires_grad_()
    loss = w2s_clip.LOSSES[name][0](s, w, **hyper)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    s64 = s.detach().double().requires_grad_()
    ref = ref_loss(name, s64, w.double(), **hyper)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert math.isfinite(ref.item())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name,hyper", LOSS_CASES, ids=LOSS_IDS)
def test_loss_is_the_mean_of_per_sample_losses(name, hyper):
    """A batch's loss is the mean of the losses of its rows taken one at a time (not a sum)."""
    s, w = logits_pair(6, 4, seed=2)
    fn = w2s_clip.LOSSES[name][0]
    rows = torch.stack([fn(s[i:i + 1], w[i:i + 1], **hyper) for i in range(len(s))])
    torch.testing.assert_close(fn(s, w, **hyper), rows.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_and_cpl_against_torch_distributions(T):
    """KD = T^2 KL(Cat(w/T) || Cat(s/T)) and CPL = KL(Cat(w/tau) || Cat(s/tau)), per torch's own KL."""
    s, w = logits_pair(10, 6, seed=3)
    kl = kl_divergence(Categorical(logits=w.double() / T), Categorical(logits=s.double() / T)).mean()
    torch.testing.assert_close(w2s_clip.kd_loss(s, w, T=T).double(), T * T * kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2s_clip.cpl_loss(s, w, tau=T).double(), kl, rtol=1e-5, atol=1e-6)


def test_ce_loss_against_cross_entropy_on_expanded_labels():
    """CE to argmax(weak) equals F.cross_entropy with the weak hard labels written out by hand."""
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    w = torch.tensor([[0.1, 0.9, 0.0], [5.0, 1.0, 1.0], [0.0, 0.0, 7.0]])  # argmax 1, 0, 2
    expected = -(F.log_softmax(s.double(), -1)[[0, 1, 2], [1, 0, 2]]).mean()
    torch.testing.assert_close(w2s_clip.ce_loss(s, w).double(), expected)


def test_kd_with_T1_equals_cpl_with_tau1():
    s, w = logits_pair(7, 5, seed=4)
    torch.testing.assert_close(w2s_clip.kd_loss(s, w, T=1.0), w2s_clip.cpl_loss(s, w, tau=1.0))


@pytest.mark.parametrize("name,hyper", [("kd", {"T": 2.0}), ("cpl", {"tau": 0.5})])
def test_kl_losses_are_zero_when_strong_equals_weak(name, hyper):
    s, _ = logits_pair(5, 4, seed=5)
    assert abs(w2s_clip.LOSSES[name][0](s, s.clone(), **hyper).item()) < 1e-6


def test_adaptconf_beta_is_detached_and_auxconf_target_is_not_differentiated():
    """Closed form at s == w: KL = 0, beta = 1/2, so adaptconf = CE(s, argmax s) / 2 and its
    gradient is half the CE gradient (softmax - onehot) / n; a beta with gradient would differ."""
    s, _ = logits_pair(4, 3, seed=6)
    s = s.double().requires_grad_()
    loss = w2s_clip.adaptconf_loss(s, s.detach().clone(), T=1.0, tau=1.0)
    (grad,) = torch.autograd.grad(loss, s)
    p = torch.exp(ref_log_softmax(s.detach()))
    onehot = F.one_hot(s.detach().argmax(-1), 3).double()
    torch.testing.assert_close(loss.detach(), ref_ce_rows(s.detach(), s.detach().argmax(-1)).mean() / 2)
    torch.testing.assert_close(grad, (p - onehot) / (2 * len(s)))
    # auxconf with alpha = 1 is CE to its own (constant) argmax: gradient (softmax - onehot) / n
    s2 = s.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(w2s_clip.auxconf_loss(s2, torch.zeros_like(s2), alpha=1.0), s2)
    torch.testing.assert_close(g2, (p - onehot) / len(s))


def test_bind_loss_binds_the_values_and_warms_up_auxconf_alpha_over_20_percent_of_steps():
    """bind_loss fixes each loss's keywords from the run's values (functools.partial); AuxConf's
    alpha instead ramps linearly 0 -> --aux-alpha over the first 20% of steps, then stays."""
    values = dict(aux_alpha=0.5, kd_temperature=3.0, tau=0.7, adapt_tau=2.0, cpl_kl="summand")
    fn, alpha = w2s_clip.bind_loss("auxconf", values)
    assert fn.func is w2s_clip.auxconf_loss and fn.keywords == {}
    assert [alpha(s, 100)["alpha"] for s in (0, 10, 20, 60, 99)] == pytest.approx([0, .25, .5, .5, .5])
    for loss, keywords in (("kd", {"T": 3.0}), ("cpl", {"tau": 0.7, "direction": "summand"}),
                           ("adaptconf", {"T": 3.0, "tau": 2.0}), ("ce", {})):
        fn, schedule = w2s_clip.bind_loss(loss, values)
        assert fn.func is w2s_clip.LOSSES[loss][0] and fn.keywords == keywords and schedule is None


# ------------------------------------------------------------------------------------------------
# Heads and text features, against open_clip's own code
# ------------------------------------------------------------------------------------------------
def test_text_tower_truncated_path_equals_full_encode_text(clip):
    """Running only max(eot)+1 positions gives open_clip's 77-token encode_text, for any lengths."""
    model, tok = clip
    prompts = ["a cat.", "a photo of The Eiffel Tower at night, seen from far away.", "t-shirt",
               "an aircraft carrier in the sea"]
    tokens, eot = text_w2s_clip.tokenize_prompts(model, tok, prompts)
    full = tok(prompts)
    assert torch.equal(eot, full.argmax(dim=-1))
    assert tokens.shape[1] == int(eot.max()) + 1 < 77
    with torch.no_grad():
        ours = text_w2s_clip.TextTower(model)(model.token_embedding(tokens), eot)
        ref = model.encode_text(full)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("templates,per_batch", [
    (["a photo of a {}."], None), (open_clip.OPENAI_IMAGENET_TEMPLATES[:5], 3)],
    ids=["single", "imagenet5-callables"])
def test_text_prototypes_equal_build_zero_shot_classifier(clip, templates, per_batch):
    """text_prototypes == open_clip.build_zero_shot_classifier(...).T, rows of unit norm."""
    model, tok = clip
    ref = open_clip.build_zero_shot_classifier(model, tok, PROMPT_NAMES, templates,
                                               num_classes_per_batch=per_batch, device="cpu").T
    for batch_size in (256, 3):  # 3: prompt batches that cut across classes
        ours = w2s_clip.text_prototypes(model, tok, PROMPT_NAMES, templates, batch_size=batch_size,
                                        normalize=True)
        assert ours.shape == (len(PROMPT_NAMES), 64)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(PROMPT_NAMES)))


@pytest.mark.parametrize("templates", [["a photo of a {}."], ["a photo of a {}.", "art of the {}."]],
                         ids=["single", "two"])
def test_text_prototypes_raw_equal_encode_text_unnormalised(clip, templates):
    """The default, normalize=False (Algorithm 1's raw C_i = f_text(prompt), what a copied function
    must give): for one template exactly open_clip's encode_text(normalize=False), for several the
    mean of those; the norms are not 1."""
    model, tok = clip
    with torch.no_grad():
        ref = torch.stack([model.encode_text(tok([t.format(c) for c in PROMPT_NAMES]),
                                             normalize=False) for t in templates]).mean(dim=0)
    for batch_size in (256, 3):
        ours = w2s_clip.text_prototypes(model, tok, PROMPT_NAMES, templates, batch_size=batch_size)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(len(PROMPT_NAMES)), atol=1e-2)


def test_zero_shot_prototypes_computed_once_per_strong_bundle(clip, monkeypatch):
    """CPL's start is "a photo of a {}" through text_prototypes, encoded once however many heads
    (ceiling CPL, cpl, its zero-shot CMM) ask for it; each head trains its own copy."""
    model, tok = clip
    calls = []
    real = w2s_clip.text_prototypes
    monkeypatch.setattr(w2s_clip, "text_prototypes", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    strong = {"clip": model, "tokenizer": tok}
    first = w2s_clip.zero_shot_prototypes(strong, PROMPT_NAMES)
    assert w2s_clip.zero_shot_prototypes(strong, PROMPT_NAMES) is first and len(calls) == 1
    raw = real(model, tok, PROMPT_NAMES, ["a photo of a {}"], normalize=False)  # Algorithm 1
    torch.testing.assert_close(first, raw)
    head = w2s_clip.make_head("cpl", model, tok, PROMPT_NAMES, 64, first)
    with torch.no_grad():
        head.prototypes.add_(1.0)
    torch.testing.assert_close(first, raw)
    unit = w2s_clip.zero_shot_prototypes({"clip": model, "tokenizer": tok}, PROMPT_NAMES,
                                         prototype_norm="unit")
    torch.testing.assert_close(unit, real(model, tok, PROMPT_NAMES, ["a photo of a {}"],
                                          normalize=True))


def test_prompt_head_starts_at_open_clip_text_features(clip):
    """Before training, text_features() = normalize(encode_text('a photo of a {c}.'))."""
    model, tok = clip
    head = w2s_clip.PromptHead(model, tok, PROMPT_NAMES)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tok([f"a photo of a {c}." for c in PROMPT_NAMES])), dim=-1)
        ours = head.text_features()
    assert ours.shape == (len(PROMPT_NAMES), 64)
    assert (ours - ref).abs().max().item() < 1e-4


def test_prompt_head_only_ctx_trains_and_logits_are_scaled_cosines(clip):
    """Trainable: exactly `ctx` of shape (4 tokens of 'a photo of a', width); logits = scale * cos."""
    model, tok = clip
    head = w2s_clip.PromptHead(model, tok, PROMPT_NAMES)
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["ctx"]
    assert head.ctx.shape == (4, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = head(x)
        cos = F.cosine_similarity(x[:, None, :], head.text_features()[None, :, :], dim=-1)
    assert logits.shape == (5, len(PROMPT_NAMES))
    torch.testing.assert_close(logits, model.logit_scale.exp().item() * cos, rtol=1e-5, atol=1e-5)


def test_prompt_head_gradient_step_on_ctx_changes_text_features(clip):
    """ctx gets a non-zero gradient, the CLIP weights none, and an SGD step moves the features."""
    model, tok = clip
    head = w2s_clip.PromptHead(model, tok, PROMPT_NAMES)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 64, generator=g), torch.randint(len(PROMPT_NAMES), (8,), generator=g)
    before = head.text_features().detach().clone()
    F.cross_entropy(head(x), y).backward()
    assert head.ctx.grad is not None and head.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    torch.optim.SGD([head.ctx], lr=10.0).step()
    assert (head.text_features().detach() - before).abs().max() > 1e-5


# Prompts of very different lengths, one name far longer than the rest, and a single class.
PACKED_NAMES = {"mixed": ["cat", "The Great Wall of China", "t-shirt", "aircraft carrier", "ant"],
                "one-long": ["ant", "bee", "cow",
                             "a very long and winding class name that goes on for many words"],
                "single": ["The Eiffel Tower"]}


@pytest.fixture(scope="module")
def text_towers(clip):
    """Random-init CLIPs whose text towers differ: the tiny one, the tiny one with layer scale
    (random gammas), a ViT-B-32-shaped one (width 512, 8 heads, 12 layers), and a qk-norm one
    (open_clip's CustomResidualAttentionBlock, which the packed path does not handle)."""
    def build(**text):
        torch.manual_seed(0)
        cfg = {**dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2), **text}
        model = open_clip.CLIP(embed_dim=text.get("width", 64), text_cfg=cfg, vision_cfg=dict(
            image_size=32, layers=1, width=64, patch_size=8, head_width=32)).eval()
        for name, p in model.named_parameters():
            if ".ls_" in name:
                p.data.uniform_(0.5, 1.5)
        return model
    return {"tiny": clip[0], "tiny-layerscale": build(ls_init_value=1.0),
            "vit-b-32-text": build(width=512, heads=8, layers=12), "qk-norm": build(qk_norm=True)}


def encode_text_with_context(model, tokens, ctx):
    """open_clip's own encode_text over all 77 tokens, token positions 1..m replaced by ctx [m, w]."""
    m = ctx.shape[0]
    hook = model.token_embedding.register_forward_hook(lambda mod, inp, out: torch.cat(
        [out[:, :1], ctx.expand(len(out), -1, -1), out[:, 1 + m:]], dim=1))
    try:
        return model.encode_text(tokens)
    finally:
        hook.remove()


@pytest.mark.parametrize("names", list(PACKED_NAMES))
@pytest.mark.parametrize("tower", ["tiny", "tiny-layerscale", "vit-b-32-text", "qk-norm"])
def test_prompt_head_features_and_ctx_gradient_equal_full_77_token_encode_text(clip, text_towers,
                                                                               tower, names):
    """[SOS][ctx] once + each class's own tokens packed == open_clip's encode_text over all 77
    tokens with the (moved) context inserted: features and the context's gradient to 1e-4. A
    qk-norm tower takes the plain path and must match too."""
    model, tok, names = text_towers[tower], clip[1], PACKED_NAMES[names]
    head = w2s_clip.PromptHead(model, tok, names)
    assert head.text.packed == (tower != "qk-norm")
    full = tok([f"a photo of a {c}." for c in names])
    torch.testing.assert_close(head.lengths, full.argmax(dim=-1) - 4)  # name, ".", EOS: no padding
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.ctx.add_(0.1 * torch.randn(head.ctx.shape, generator=g))
    r = torch.randn(len(names), model.text_projection.shape[1], generator=g)
    ours = head.text_features()
    (ours * r).sum().backward()
    ctx = head.ctx.detach().clone().requires_grad_(True)
    ref = F.normalize(encode_text_with_context(model, full, ctx), dim=-1)
    (ref * r).sum().backward()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(head.ctx.grad, ctx.grad, rtol=1e-4, atol=1e-4)
    assert ctx.grad.abs().max() > 1e-3


@pytest.mark.parametrize("names", ["mixed", "single"])
@pytest.mark.parametrize("tower", ["tiny", "tiny-layerscale", "vit-b-32-text"])
def test_text_encoder_head_packed_equals_plain_path_features_and_every_weight_gradient(
        clip, text_towers, tower, names):
    """cpl-text: the shared-prefix packed path gives the plain padded path's features and the
    gradient of every trainable weight; at init both equal open_clip's encode_text."""
    model, tok, names = text_towers[tower], clip[1], PACKED_NAMES[names]
    packed, plain = (w2s_clip.TextEncoderHead(model, tok, names) for _ in range(2))
    plain.text.packed = False
    full = tok([f"a photo of a {c}" for c in names])
    shared = 5 if len(names) > 1 else int(full.argmax())  # [SOS] a photo of a; one class: all
    assert packed.text.packed and packed.prefix.shape[0] == shared
    with torch.no_grad():
        ref = F.normalize(model.encode_text(full), dim=-1)
    r = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    for head in (packed, plain):
        feats = head.text_features()
        torch.testing.assert_close(feats.detach(), ref, rtol=0, atol=1e-4)
        (feats * r).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    assert len(grads) == len(list(model.transformer.parameters())) + 4  # pos, ln_final (2), proj
    for n, p in packed.named_parameters():
        assert grads[n] is not None and p.grad is not None, n
        scale = grads[n].abs().max().item()
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-4 * max(scale, 1e-3),
                                   msg=lambda m: f"{n}: {m}")


def test_prototype_head_logits_and_independent_copy():
    """logits = logit_scale * cos(x, C); editing the input tensor later does not reach the head."""
    g = torch.Generator().manual_seed(2)
    protos, x = torch.randn(6, 16, generator=g), torch.randn(4, 16, generator=g)
    head = w2s_clip.PrototypeHead(protos, logit_scale=37.0)
    original = protos.clone()
    protos.add_(5.0)
    assert torch.equal(head.prototypes.detach(), original)
    assert head.prototypes.requires_grad
    with torch.no_grad():
        logits = head(x)
    cos = F.cosine_similarity(x[:, None, :], original[None, :, :], dim=-1)
    assert logits.shape == (4, 6)
    torch.testing.assert_close(logits, 37.0 * cos, rtol=1e-5, atol=1e-5)
    assert w2s_clip.PrototypeHead(original).logit_scale == 1.0  # Eq. 3: the plain cosine


@pytest.mark.parametrize("scale,tau", [(1.0, 1.0), (1.0, 0.3), (100.0, 2.0)])
def test_literal_cpl_head_and_loss_match_eq_3_to_5_in_float64(scale, tau):
    """Eq. 3: s = scale * cos(x, C) with raw (unnormalised) prototypes C; Eq. 4-5: KL(softmax(w/tau)
    || softmax(s/tau)) with one tau on both sides; value and gradient w.r.t. C in float64."""
    g = torch.Generator().manual_seed(7)
    protos, x, w = 5 * torch.randn(6, 16, generator=g), torch.randn(9, 16, generator=g), \
        3 * torch.randn(9, 6, generator=g)
    head = w2s_clip.PrototypeHead(protos, logit_scale=scale)
    loss = w2s_clip.cpl_loss(head(x), w, tau=tau)
    (grad,) = torch.autograd.grad(loss, head.prototypes)
    c64 = protos.double().requires_grad_()
    x64 = x.double()
    cos = (x64 @ c64.T) / (x64.norm(dim=-1, keepdim=True) * c64.norm(dim=-1)[None, :])
    ref = ref_kl_rows(w.double() / tau, scale * cos / tau).mean()
    (ref_grad,) = torch.autograd.grad(ref, c64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_linear_head_shape_and_input_normalisation():
    """LP, Eq. 1: [n, d] -> [n, k], logits = W x + b on the raw feature by default; with
    normalize_input, W x/|x| + b (so rescaling x changes nothing)."""
    torch.manual_seed(0)
    head = w2s_clip.LinearHead(16, 7)
    x = torch.randn(5, 16)
    with torch.no_grad():
        out = head(x)
        assert out.shape == (5, 7)
        torch.testing.assert_close(out, x @ head.fc.weight.T + head.fc.bias)
        head.normalize_input = True
        out = head(x)
        torch.testing.assert_close(head(3.0 * x), out)
        manual = (x / x.pow(2).sum(-1, keepdim=True).sqrt()) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(out, manual)
    assert w2s_clip.make_head("lp", None, None, ["a", "b", "c"], 16, lp_input="normalized").normalize_input


# ------------------------------------------------------------------------------------------------
# Data and splits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [80, 101, 7])
def test_protocol_splits_sizes_disjoint_covering_and_seeded(n):
    """hold = 80% of n, hold_train = 80% of hold, hold_val = rest, test = n - hold (integer maths)."""
    sp = w2s_clip.protocol_splits(n, seed=0)
    hold = 4 * n // 5
    assert len(sp["hold_train"]) == 4 * hold // 5
    assert len(sp["hold_val"]) == hold - 4 * hold // 5
    assert len(sp["test"]) == n - hold
    everything = torch.cat([sp["hold_train"], sp["hold_val"], sp["test"]])
    assert sorted(everything.tolist()) == list(range(n))  # disjoint and covering
    again = w2s_clip.protocol_splits(n, seed=0)
    assert all(torch.equal(sp[k], again[k]) for k in sp)
    other = w2s_clip.protocol_splits(n, seed=1)
    assert not torch.equal(torch.cat(list(sp.values())), torch.cat(list(other.values())))


def test_read_split_file_keeps_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "sketch_train.txt"
    path.write_text("sketch/aircraft_carrier/x.jpg 0\nsketch/zebra/b.jpg 1\n\n"
                    "sketch/aircraft_carrier/a.jpg 0\nsketch/The_Eiffel_Tower/e f.jpg 2\n")
    paths, labels = datasets_w2s_clip.read_split_file(path)
    assert paths == ["sketch/aircraft_carrier/x.jpg", "sketch/zebra/b.jpg",
                     "sketch/aircraft_carrier/a.jpg", "sketch/The_Eiffel_Tower/e f.jpg"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 0, 2]


def test_classnames_follow_label_order_not_sorted_order():
    paths = ["sketch/apple/1.jpg", "sketch/zebra/2.jpg", "sketch/The_Eiffel_Tower/3.jpg",
             "sketch/zebra/4.jpg"]
    names = datasets_w2s_clip.classnames_from_splits(paths, torch.tensor([1, 0, 2, 0]))
    assert names == ["zebra", "apple", "The Eiffel Tower"]


@pytest.mark.parametrize("labels", [[0, 2], [0, -1], [1, 1]], ids=["gap", "negative", "no-zero"])
def test_classnames_reject_labels_outside_range(labels):
    with pytest.raises(w2s_clip.UserError, match="label"):
        datasets_w2s_clip.classnames_from_splits(["s/apple/1.jpg", "s/zebra/2.jpg"], torch.tensor(labels))


def test_read_split_file_missing_or_empty(tmp_path):
    with pytest.raises(w2s_clip.UserError, match="not found"):
        datasets_w2s_clip.read_split_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(w2s_clip.UserError, match="empty"):
        datasets_w2s_clip.read_split_file(tmp_path / "empty.txt")


@pytest.mark.parametrize("bad", ["sketch/zebra/x.jpg", "x.jpg 1", "sketch/zebra/x.jpg one",
                                 "sketch/zebra/x.jpg 1.5", "sketch/zebra/x.jpg --1"])
def test_read_split_file_malformed_line_names_file_and_line(tmp_path, bad):
    """Any malformed line stops with a UserError naming `<file>:<lineno>`, never a ValueError."""
    path = tmp_path / "sketch_test.txt"
    path.write_text(f"sketch/zebra/a.jpg 0\n\nsketch/zebra/b.jpg 0\n{bad}\n")
    with pytest.raises(w2s_clip.UserError) as info:
        datasets_w2s_clip.read_split_file(path)
    assert f"{path}:4" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Schedule and metrics: closed forms and hand-made examples
# ------------------------------------------------------------------------------------------------
def test_warmup_cosine_closed_form():
    """100 steps, 10% warm-up: s/10 for s < 10, then (1 + cos(pi (s-10)/90)) / 2."""
    f = w2s_clip.warmup_cosine
    assert f(0, 100, 0.1) == 0.0  # the HF Trainer's first step has lr 0
    assert f(5, 100, 0.1) == pytest.approx(0.5)
    assert f(9, 100, 0.1) == pytest.approx(0.9)
    assert f(10, 100, 0.1) == pytest.approx(1.0)
    assert f(55, 100, 0.1) == pytest.approx(0.5)  # cos(pi/2) = 0
    assert f(99, 100, 0.1) == pytest.approx((1 + math.cos(math.pi * 89 / 90)) / 2)
    assert f(99, 100, 0.1) < 1e-3
    assert f(0, 100, 0.0) == pytest.approx(1.0)  # no warm-up: starts at the peak


def test_warmup_linear_closed_form():
    """25 steps, 10% warm-up: w = ceil(2.5) = 3 warm-up steps s/3, then (25 - s) / 22."""
    f = w2s_clip.warmup_linear
    assert [f(s, 25, 0.1) for s in (0, 1, 2)] == pytest.approx([0, 1 / 3, 2 / 3])
    assert [f(s, 25, 0.1) for s in (3, 14, 24, 25)] == pytest.approx([1, 11 / 22, 1 / 22, 0])
    assert f(0, 25, 0.0) == 1.0 and f(0, 0, 0.1) == 0.0  # no warm-up; no steps at all
    assert w2s_clip.SCHEDULES == {"linear": f, "cosine": w2s_clip.warmup_cosine}


@pytest.mark.parametrize("total,ratio", [(100, 0.1), (25, 0.1), (7, 0.3), (40, 0.0), (13, 1.0)])
def test_schedules_equal_transformers_own(total, ratio):
    """Each step's lr equals that of transformers' get_{linear,cosine}_schedule_with_warmup with the
    HF Trainer's warm-up step count ceil(warmup_ratio * total)."""
    transformers = pytest.importorskip("transformers")
    for name, hf in (("linear", transformers.get_linear_schedule_with_warmup),
                     ("cosine", transformers.get_cosine_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = hf(opt, num_warmup_steps=math.ceil(ratio * total), num_training_steps=total)
        for step in range(total):
            assert w2s_clip.SCHEDULES[name](step, total, ratio) == pytest.approx(
                opt.param_groups[0]["lr"], abs=1e-12), (name, step)
            opt.step()
            sched.step()


def test_per_class_and_worst_k_accuracy_hand_example():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2])
    acc = w2s_clip.per_class_accuracy(F.one_hot(preds, 4).float(), labels, 4)
    assert acc[:3].tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert math.isnan(acc[3].item())  # class 3 has no example
    assert w2s_clip.worst_k_accuracy(acc, k=2) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert w2s_clip.worst_k_accuracy(acc, k=10) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert w2s_clip.accuracy(F.one_hot(preds, 4).float(), labels) == pytest.approx(4 / 6)


def test_pgr_closed_form():
    assert w2s_clip.pgr(0.5, 0.6, 0.9) == pytest.approx(0.25)
    assert w2s_clip.pgr(0.5, 0.9, 0.9) == pytest.approx(1.0)
    assert math.isnan(w2s_clip.pgr(0.5, 0.6, 0.5))
    assert report_w2s_clip.pgr_text(0.5, 0.6, 0.9) == "0.25"
    assert [report_w2s_clip.pgr_text(0.5, s, c) for s, c in ((0.6, 0.5), (0.3, 0.4))] == ["n/a", "n/a"]


def test_n_predicted_classes_hand_example():
    logits = torch.tensor([[0.1, 0.2, 0.9], [0.0, 0.0, 1.0], [5.0, 1.0, 2.0], [-1.0, -2.0, 0.0]])
    assert w2s_clip.n_predicted_classes(logits) == 2  # argmax 2, 2, 0, 2
    assert w2s_clip.n_predicted_classes(torch.eye(5)) == 5
    assert w2s_clip.n_predicted_classes(torch.ones(7, 4)) == 1  # a collapsed head (ties -> 0)


def test_split_count_note_names_both_counts_only_when_they_differ():
    """Table 1's counts: silent on a match or on data that is not DomainNet (not 345 classes)."""
    assert report_w2s_clip.split_count_note("clipart", 33525, 14604, 345) is None
    assert report_w2s_clip.split_count_note("clipart", 100, 200, 10) is None
    note = report_w2s_clip.split_count_note("sketch", 48837, 21850, 345)
    assert "\n" not in note and "uncleaned" in note
    assert all(str(n) in note for n in (48837, 21850, 48212, 20916))


def test_class_matching_margin_hand_example():
    """Prototypes at 0, 90 and 180 degrees; images at known angles: margins from cosines by hand."""
    def at(deg, r=1.0):
        return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]

    protos = torch.tensor([at(0), at(90, 3.0), at(180, 2.0)])  # norms must not matter
    angles, labels = [0, 60, 120, 80, 150], [0, 0, 1, 1, 1]
    feats = torch.tensor([at(a, 1 + i) for i, a in enumerate(angles)])
    c = lambda d: math.cos(math.radians(d))  # noqa: E731
    # class 0: at 0 deg rival c1 (cos 0 > cos 180); at 60 deg rival c1 (cos 30)
    m0 = ((1 - 0.0) + (c(60) - c(30))) / 2
    # class 1: 120 deg rival c2 (cos 60); 80 deg rival c0 (cos 80); 150 deg rival c2 (cos 30)
    m1 = ((c(30) - c(60)) + (c(10) - c(80)) + (c(60) - c(30))) / 3
    margins, confused = cpe_w2s_clip.class_matching_margin(feats, protos, torch.tensor(labels), 3)
    assert margins[:2].tolist() == pytest.approx([m0, m1], abs=1e-6)
    assert math.isnan(margins[2].item())  # class 2 has no image
    assert confused[:2].tolist() == [1, 2]


# ------------------------------------------------------------------------------------------------
# Training: a planted signal where the right answer is known
# ------------------------------------------------------------------------------------------------
def planted(seed=0, n=3400, k=10, d=64, spread=0.2, noise=1.0, text_noise=2.0, weak_acc=0.6):
    """CLIP-like features in a narrow cone around e: x = normalize(e + spread (mu_y + noise)).

    Text prototypes t_c = normalize(e + spread (mu_c + text noise)) are imperfect zero-shot
    classifiers; weak labels are right with probability weak_acc, else a uniformly random wrong class.
    """
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(d, generator=g), dim=0)
    mu = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    t = F.normalize(e + spread * (mu + text_noise * torch.randn(k, d, generator=g) / d ** 0.5), dim=-1)
    y = torch.randint(k, (n,), generator=g)
    x = F.normalize(e + spread * (mu[y] + noise * torch.randn(n, d, generator=g) / d ** 0.5), dim=-1)
    right = torch.rand(n, generator=g) < weak_acc
    weak = torch.where(right, y, (y + torch.randint(1, k, (n,), generator=g)) % k)
    tr, va, te = slice(0, 2000), slice(2000, 2400), slice(2400, n)
    return {"t": t, "x": x, "y": y, "weak": weak, "tr": tr, "va": va, "te": te, "k": k}


@pytest.fixture(scope="module")
def planted_data():
    return planted()


def test_cpl_on_weak_labels_beats_weak_model_and_zero_shot(planted_data):
    """CPL as written (raw prototypes, plain cosine, tau 1, linear schedule, clipping, selection by
    hold-val loss) from 60%-right weak logits recovers most of the planted signal: it beats the
    weak labels by 10 points and the zero-shot prototypes it starts from (an untrained head would
    not). The prototypes have norm 3, as raw text embeddings do not have norm 1."""
    p = planted_data
    x, y, wl, tr, va, te = p["x"], p["y"], p["weak"], p["tr"], p["va"], p["te"]
    weak_acc = (wl[te] == y[te]).float().mean().item()
    zero_shot = w2s_clip.accuracy(w2s_clip.predict(w2s_clip.PrototypeHead(p["t"]), x[te]), y[te])
    assert 0.55 < weak_acc < 0.65 and zero_shot < 0.85  # the set-up: weak and zero-shot imperfect
    head = w2s_clip.PrototypeHead(3.0 * p["t"])
    weak_logits = 5.0 * F.one_hot(wl, p["k"]).float()
    fit = w2s_clip.train_head(head, functools.partial(w2s_clip.cpl_loss, tau=1.0),
                              x[tr], weak_logits[tr], x[va], weak_logits[va],
                              epochs=10, batch_size=128, lr=1e-2, seed=0)
    assert fit["best_epoch"] > 0
    acc = w2s_clip.accuracy(w2s_clip.predict(head, x[te]), y[te])
    # an untrained head scores exactly zero_shot, so it fails this line
    assert acc >= zero_shot + 0.10, (acc, zero_shot)
    assert acc >= weak_acc + 0.10, (acc, weak_acc)


def test_linear_head_ceiling_on_true_labels(planted_data):
    """LP trained with CE on one-hot true labels reaches high accuracy on the planted data."""
    p = planted_data
    x, y, tr, va, te = p["x"], p["y"], p["tr"], p["va"], p["te"]
    torch.manual_seed(0)
    head = w2s_clip.LinearHead(x.shape[1], p["k"])
    w2s_clip.train_head(head, w2s_clip.ce_loss,
                        x[tr], F.one_hot(y[tr], p["k"]).float(), x[va],
                        F.one_hot(y[va], p["k"]).float(), epochs=10, batch_size=128, lr=1e-2, seed=0)
    assert w2s_clip.accuracy(w2s_clip.predict(head, x[te]), y[te]) >= 0.9


def test_train_head_returns_curves_and_restores_best_epoch(planted_data):
    """Random targets pull the head away from the truth, so the best epoch (by agreement with true
    labels) is not the last; the head left behind must score exactly val_score, the best of the
    rows after each epoch (the candidates); the curves start at epoch 0 (before the first step)."""
    p = planted_data
    x, y, va, te = p["x"], p["y"], p["va"], p["te"]
    xs = x[:300]
    noise_targets = 5.0 * F.one_hot(torch.randint(p["k"], (300,), generator=torch.Generator()
                                                  .manual_seed(3)), p["k"]).float()
    head = w2s_clip.PrototypeHead(p["t"])
    fit = w2s_clip.train_head(head, functools.partial(w2s_clip.cpl_loss, tau=1.0), xs,
                              noise_targets, x[va], F.one_hot(y[va], p["k"]).float(), epochs=6,
                              batch_size=64, lr=3e-3, seed=0, select_by="agreement",
                              probes={"test_acc": (x[te], y[te]), "train_acc": (xs, y[:300])})
    curves = fit["curves"]
    assert len(curves) == 7 and [r["epoch"] for r in curves] == list(range(7))
    assert [r["step"] for r in curves] == [5 * e for e in range(7)]  # ceil(300 / 64) steps
    assert all({"loss", "val_loss", "val_score", "test_acc", "train_acc"} <= r.keys() for r in curves)
    scores = [r["val_score"] for r in curves[1:]]
    assert fit["val_score"] == max(scores)
    assert fit["best_epoch"] == 1 + scores.index(max(scores))
    assert fit["best_epoch"] < 6 and scores[-1] < fit["val_score"] - 0.1  # restoring matters
    assert w2s_clip.accuracy(w2s_clip.predict(head, x[va]), y[va]) == pytest.approx(fit["val_score"])
    row = curves[fit["best_epoch"]]
    assert w2s_clip.accuracy(w2s_clip.predict(head, x[te]), y[te]) == pytest.approx(row["test_acc"])


def test_train_head_param_lrs_zero_freezes_that_group():
    """`param_lrs` gives a parameter-name prefix its own lr: lr 0 leaves it exactly unchanged."""
    torch.manual_seed(0)
    head = w2s_clip.LinearHead(8, 3)
    weight, bias = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    x, y = torch.randn(40, 8), torch.randint(3, (40,))
    w2s_clip.train_head(head, w2s_clip.ce_loss, x, F.one_hot(y, 3).float(), x,
                        F.one_hot(y, 3).float(), epochs=2, batch_size=16, lr=1e-1, seed=0,
                        param_lrs={"fc.weight": 0.0})  # selected on its own training loss
    assert torch.equal(head.fc.weight.detach(), weight)
    assert not torch.equal(head.fc.bias.detach(), bias)


def test_train_head_curve_loss_is_the_epoch_mean_over_uneven_batches():
    """With every lr 0 the head never moves, so the logged epoch loss (batches of 7, 7 and 6), the
    epoch-0 loss and the hold-val loss (here the same set) must equal the loss of the whole set."""
    torch.manual_seed(0)
    head = w2s_clip.LinearHead(8, 3)
    x, targets = torch.randn(20, 8), torch.randn(20, 3)
    fit = w2s_clip.train_head(head, functools.partial(w2s_clip.kd_loss, T=2.0), x, targets, x,
                              targets, epochs=2, batch_size=7, lr=1e-1, seed=0,
                              param_lrs={"fc.": 0.0})
    whole = w2s_clip.kd_loss(head(x), targets, T=2.0).item()
    assert [row["loss"] for row in fit["curves"]] == pytest.approx([whole] * 3, rel=1e-5)
    assert [row["val_loss"] for row in fit["curves"]] == pytest.approx([whole] * 3, rel=1e-5)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_train_head_clipping_and_schedule_match_torch_reference(max_grad_norm):
    """One full batch per epoch: each epoch's logged loss equals that of a loop made of torch's own
    AdamW, LinearLR (= the HF linear schedule with no warm-up) and clip_grad_norm_ (or none for
    max_grad_norm 0); clipping is active (gradient norms well above 1), so the two settings differ."""
    torch.manual_seed(0)
    head = w2s_clip.LinearHead(8, 3)
    ref = w2s_clip.LinearHead(8, 3)
    ref.load_state_dict(head.state_dict())
    x, targets = 20 * torch.randn(32, 8), 3 * torch.randn(32, 3)
    fit = w2s_clip.train_head(head, functools.partial(w2s_clip.kd_loss, T=1.0), x, targets, x,
                              targets, epochs=6, batch_size=32, lr=0.05, warmup_ratio=0.0, seed=0,
                              max_grad_norm=max_grad_norm)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=6)
    losses, norms = [], []
    for _ in range(6):
        loss = w2s_clip.kd_loss(ref(x), targets, T=1.0)
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(),
                                                    max_grad_norm or float("inf")).item())
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert min(norms) > 2.0  # clipping to 1 changes every step
    assert [row["loss"] for row in fit["curves"][1:]] == pytest.approx(losses, rel=1e-4)
    other = w2s_clip.train_head(w2s_clip.LinearHead(8, 3), functools.partial(w2s_clip.kd_loss, T=1.0),
                                x, targets, x, targets, epochs=6, batch_size=32, lr=0.05,
                                warmup_ratio=0.0, seed=0, max_grad_norm=1.0 - max_grad_norm)
    assert [row["loss"] for row in other["curves"][1:]] != pytest.approx(losses, rel=1e-4)


def test_selection_by_loss_keeps_epoch_0_when_training_only_hurts(planted_data):
    """Prototypes start at the class means (perfect), training targets are random, hold-val's
    supervision is right: every step raises the hold-val loss, so selection by loss with the start
    a candidate (--select-from start-and-epochs) returns epoch 0 and the exact starting prototypes;
    the Trainer's candidates return a trained head and say that the start would have won."""
    p = planted_data
    x, y, va = p["x"], p["y"], p["va"]
    means = F.normalize(torch.stack([x[:2000][y[:2000] == c].mean(0) for c in range(p["k"])]), dim=-1)
    noise = 5.0 * F.one_hot(torch.randint(p["k"], (300,), generator=torch.Generator().manual_seed(4)),
                            p["k"]).float()
    head = w2s_clip.PrototypeHead(means)
    fit = w2s_clip.train_head(head, functools.partial(w2s_clip.cpl_loss, tau=1.0), x[:300], noise,
                              x[va], 5.0 * F.one_hot(y[va], p["k"]).float(), epochs=5,
                              batch_size=64, lr=1e-2, seed=0, start_candidate=True)
    losses = [r["val_loss"] for r in fit["curves"]]
    assert fit["best_epoch"] == 0 and fit["val_loss"] == losses[0] < min(losses[1:])
    assert torch.equal(head.prototypes.detach(), means)
    trainer = w2s_clip.train_head(w2s_clip.PrototypeHead(means),
                                  functools.partial(w2s_clip.cpl_loss, tau=1.0), x[:300], noise, x[va],
                                  5.0 * F.one_hot(y[va], p["k"]).float(), epochs=5, batch_size=64,
                                  lr=1e-2, seed=0)
    assert trainer["best_epoch"] == 1 + losses[1:].index(min(losses[1:]))
    assert trainer["start_would_win"] and fit["start_would_win"]


class ReplaySampler(torch.utils.data.Sampler):
    """Each epoch's order as train_head draws it: torch.randperm from one generator seeded once."""

    def __init__(self, n, seed):
        self.n, self.g = n, torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.g).tolist())


def trainer_fit(tmp_path, head, x, targets, x_val, val_targets, epochs, batch_size, lr, T,
                eval_on_start=False):
    """Train `head` with transformers' own Trainer: eval and save every epoch, the best model by
    eval loss loaded at the end, warm-up ratio 0.1, linear decay, max_grad_norm 1, torch AdamW.
    Returns the chosen epoch (its global step / steps per epoch) and the eval losses per epoch."""
    transformers = pytest.importorskip("transformers")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, features, labels=None):
            logits = self.head(features)
            return {"loss": w2s_clip.kd_loss(logits, labels, T=T), "logits": logits}

    class Trainer(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return ReplaySampler(len(x), seed=0)

    rows = lambda f, t: [{"features": a, "labels": b} for a, b in zip(f, t)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=len(x_val), learning_rate=lr, weight_decay=0.0,
        warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch",
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="loss", eval_on_start=eval_on_start, save_only_model=True,
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_drop_last=False, seed=0)
    trainer = Trainer(model=Model(), args=args, train_dataset=rows(x, targets),
                      eval_dataset=rows(x_val, val_targets))
    trainer.train()
    steps_per_epoch = math.ceil(len(x) / batch_size)
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return trainer.state.best_global_step // steps_per_epoch, losses


@pytest.mark.parametrize("case", ["val-unlike-train", "start-is-best"])
def test_train_head_selection_schedule_and_clipping_equal_transformers_trainer(tmp_path, case):
    """The same float64 linear head, batches and KD loss through train_head and through
    transformers' Trainer: the same eval losses, the same chosen epoch and the same final weights.
    "val-unlike-train": hold-val's targets differ from training's, so the best epoch is neither the
    first nor the last. "start-is-best": hold-val's targets are the untrained head's own logits (eval
    loss 0 at the start); the Trainer, even with eval_on_start, only loads a checkpoint saved after
    training, and so does train_head; with start_candidate=True, train_head returns the start."""
    g = torch.Generator().manual_seed(1)
    n, d, k, batch_size, epochs, lr = 40, 6, 4, 16, 6, 0.3  # batches of 16, 16 and 8
    x, x_val = 4 * torch.randn(n, d, generator=g).double(), 4 * torch.randn(24, d, generator=g).double()
    A = torch.randn(d, k, generator=g).double()
    targets = x @ A
    torch.manual_seed(0)
    start = w2s_clip.LinearHead(d, k).double()
    with torch.no_grad():  # else hold-val's optimum lies halfway between the start and training's
        val_targets = start(x_val) if case == "start-is-best" else 0.5 * (x_val @ A + start(x_val))
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    fit = w2s_clip.train_head(ours, functools.partial(w2s_clip.kd_loss, T=2.0), x, targets, x_val,
                              val_targets, epochs=epochs, batch_size=batch_size, lr=lr, seed=0)
    best_epoch, losses = trainer_fit(tmp_path, theirs, x, targets, x_val, val_targets, epochs,
                                     batch_size, lr, T=2.0, eval_on_start=case == "start-is-best")
    ours_losses = [row["val_loss"] for row in fit["curves"][1:]]
    assert losses[-epochs:] == pytest.approx(ours_losses, rel=1e-6, abs=1e-9)
    assert fit["best_epoch"] == best_epoch
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-8, rtol=0)
    if case == "val-unlike-train":
        assert 1 < best_epoch < epochs  # selection matters
    else:
        assert fit["curves"][0]["val_loss"] == pytest.approx(0.0, abs=1e-12)
        assert best_epoch >= 1 and fit["start_would_win"]
        again = copy.deepcopy(start)
        old = w2s_clip.train_head(again, functools.partial(w2s_clip.kd_loss, T=2.0), x, targets,
                                  x_val, val_targets, epochs=epochs, batch_size=batch_size, lr=lr,
                                  seed=0, start_candidate=True)
        assert old["best_epoch"] == 0
        assert all(torch.equal(a, b) for a, b in zip(again.parameters(), start.parameters()))


# ------------------------------------------------------------------------------------------------
# Parameter tuning on hold-val (Section 5, step 4)
# ------------------------------------------------------------------------------------------------
def test_tuning_grid_is_the_product_of_the_open_parameters():
    grids = {"tau": [0.1, 1.0], "kd_temperature": [1.0, 4.0], "aux_alpha": [0.5], "text_lr": [1e-5, 1e-4]}
    assert w2s_clip.tuning_grid("lp", "ce", grids) == [{}]
    assert w2s_clip.tuning_grid("tp", "kd", grids) == [{"kd_temperature": 1.0}, {"kd_temperature": 4.0}]
    assert w2s_clip.tuning_grid("lp", "adaptconf", grids) == [{"kd_temperature": 1.0},
                                                              {"kd_temperature": 4.0}]
    assert w2s_clip.tuning_grid("lp", "auxconf", grids) == [{"aux_alpha": 0.5}]
    assert w2s_clip.tuning_grid("cpl", "cpl", grids) == [{"tau": 0.1}, {"tau": 1.0}]
    assert w2s_clip.tuning_grid("cpl-text", "cpl", grids) == [
        {"tau": t, "text_lr": lr} for t in (0.1, 1.0) for lr in (1e-5, 1e-4)]


def test_tuning_score_closed_forms():
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert w2s_clip.tuning_score(s, w, "agreement") == 0.5
    p, q = F.softmax(w.double(), -1), F.softmax(s.double() / 0.5, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert w2s_clip.tuning_score(s, w, "weak-kl", temperature=0.5) == pytest.approx(-kl, rel=1e-5)


def tuning_setup(planted_data, tune_by="agreement"):
    """fit_tuned's inputs on the planted data: a CPL head from text prototypes, weak logits."""
    p = planted_data
    n = len(p["y"])
    splits = {"hold_train": torch.arange(0, 600), "hold_val": torch.arange(2000, 2400),
              "test": torch.arange(2400, n)}
    strong = {"clip": None, "tokenizer": None, "feats": p["x"], "prototypes": 3.0 * p["t"]}
    args = w2s_clip.parse_args(["--tau-grid", "0.02", "0.1", "1", "--strong-epochs", "4",
                                "--batch-size", "128", "--tune-by", tune_by])
    return 5.0 * F.one_hot(p["weak"], p["k"]).float(), strong, splits, args


@pytest.mark.parametrize("tune_by", ["agreement", "weak-kl"])
def test_tuning_picks_what_a_brute_force_loop_picks_without_true_labels(planted_data, tune_by):
    """fit_tuned's choice equals a plain loop over the same grid (train_head per tau, score each
    on hold-val against the weak logits), and scrambling every true label leaves the choice, the
    scores and the chosen head unchanged: no true label takes part in tuning."""
    p = planted_data
    weak_logits, strong, splits, args = tuning_setup(planted_data, tune_by)
    ht, hv = splits["hold_train"], splits["hold_val"]
    head, fit, _, tuned, tuning = w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong, p["y"],
                                                      splits, None, args, seed=0)
    scores = []
    for tau in (0.02, 0.1, 1.0):
        torch.manual_seed(0)
        ref = w2s_clip.PrototypeHead(3.0 * p["t"])
        w2s_clip.train_head(ref, functools.partial(w2s_clip.cpl_loss, tau=tau),
                            p["x"][ht], weak_logits[ht], p["x"][hv], weak_logits[hv], epochs=4,
                            batch_size=128, lr=1e-2, seed=0)
        val = w2s_clip.predict(ref, p["x"][hv])
        w = weak_logits[hv]
        if tune_by == "agreement":
            scores.append((val.argmax(-1) == w.argmax(-1)).float().mean().item())
        else:
            pw, ps = F.softmax(w.double(), -1), F.log_softmax(val.double() / tau, -1)
            scores.append(-(pw * (pw.clamp_min(1e-300).log() - ps)).sum(-1).mean().item())
    assert [row["score"] for row in tuning] == pytest.approx(scores, rel=1e-5, abs=1e-6)
    assert len(set(scores)) > 1  # the grid points differ, so the choice is not trivial
    assert tuned == {"tau": (0.02, 0.1, 1.0)[scores.index(max(scores))]}
    scrambled = p["y"][torch.randperm(len(p["y"]), generator=torch.Generator().manual_seed(9))]
    head2, _, _, tuned2, tuning2 = w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong, scrambled,
                                                      splits, None, args, seed=0)
    assert tuned2 == tuned and [r["score"] for r in tuning2] == [r["score"] for r in tuning]
    assert torch.equal(head2.prototypes, head.prototypes)
    assert [r["test_accuracy"] for r in tuning2] != [r["test_accuracy"] for r in tuning]


def test_tune_none_trains_the_flag_values_once(planted_data):
    weak_logits, strong, splits, args = tuning_setup(planted_data)
    args.tune, args.tau = "none", 0.5
    _, _, _, tuned, tuning = w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong,
                                                planted_data["y"], splits, None, args, seed=0)
    assert tuned == {"tau": 0.5} and len(tuning) == 1


def test_huge_lr_no_trained_head_returns_the_start_unless_asked(planted_data):
    """With lr 1000 training wrecks every head, so the hold-val loss is lowest at the start: the
    Trainer's candidates (after each epoch) never return epoch 0; start_candidate=True does, with
    the exact starting parameters (the old behaviour). (CPL at tau 0.1: at tau 1 its cosine logits
    are so flat that even lr 1000 barely moves its hold-val loss.)"""
    p = planted_data
    x, wl = p["x"], 5.0 * F.one_hot(p["weak"], p["k"]).float()
    tr, va = slice(0, 300), slice(2000, 2400)
    runs = [("lp", "kd", {"T": 1.0}), ("lp", "cpl", {"tau": 0.1}), ("cpl", "cpl", {"tau": 0.1})]
    heads = {"lp": lambda: w2s_clip.LinearHead(x.shape[1], p["k"]),
             "cpl": lambda: w2s_clip.PrototypeHead(3.0 * p["t"])}
    for (name, loss, hyper), start_candidate in [(r, c) for r in runs for c in (False, True)]:
        torch.manual_seed(0)
        head = heads[name]()
        first = copy.deepcopy(head.state_dict())
        fit = w2s_clip.train_head(head, functools.partial(w2s_clip.LOSSES[loss][0], **hyper),
                                  x[tr], wl[tr],
                                  x[va], wl[va], epochs=3, batch_size=64, lr=1000.0, seed=0,
                                  start_candidate=start_candidate)
        assert fit["start_would_win"], (name, loss)
        if start_candidate:
            assert fit["best_epoch"] == 0
            assert all(torch.equal(v, head.state_dict()[n]) for n, v in first.items())
        else:
            assert fit["best_epoch"] >= 1, (name, loss)


def test_default_prompt_prototypes_equal_encode_text_of_algorithm_1_prompt(clip):
    """CPL's default start: the raw text embedding of "a photo of a <name>" (no period)."""
    model, tokenizer = clip
    args = w2s_clip.parse_args([])
    assert args.prompt_template == "a photo of a {}"
    strong = {"clip": model, "tokenizer": tokenizer}
    protos = w2s_clip.zero_shot_prototypes(strong, PROMPT_NAMES, args.prototype_init,
                                           args.prototype_norm, args.prompt_template)
    with torch.no_grad():
        ref = model.encode_text(tokenizer([f"a photo of a {c}" for c in PROMPT_NAMES]),
                                normalize=False)
    assert torch.allclose(protos, ref, atol=1e-5)


@pytest.mark.parametrize("bad", ["a photo of a", "a {} of a {}", "{x} {}"])
def test_prompt_template_needs_exactly_one_placeholder(bad, capsys):
    with pytest.raises(SystemExit):
        w2s_clip.parse_args(["--prompt-template", bad])
    err = capsys.readouterr().err
    assert "--prompt-template" in err and len(err.strip().splitlines()) == 1


def test_cpl_loss_printed_direction_is_kl_of_strong_to_weak():
    s, w = logits_pair(6, 5)
    ps, pw = F.softmax(s.double() / 0.5, -1), F.softmax(w.double() / 0.5, -1)
    printed = (ps * (ps.log() - pw.log())).sum(-1).mean().item()
    summand = (pw * (pw.log() - ps.log())).sum(-1).mean().item()
    assert w2s_clip.cpl_loss(s, w, tau=0.5, direction="printed").item() == pytest.approx(printed, rel=1e-5)
    assert w2s_clip.cpl_loss(s, w, tau=0.5).item() == pytest.approx(summand, rel=1e-5)
    assert abs(printed - summand) > 1e-3


# ------------------------------------------------------------------------------------------------
# Caches
# ------------------------------------------------------------------------------------------------
def test_cached_computes_once_then_loads_and_leaves_no_temporary_files(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"feats": torch.arange(6.0).view(2, 3), "n": torch.tensor(len(calls))}

    path = tmp_path / "sub" / "feats.pt"
    first = store_w2s_clip.cached(path, compute)
    second = store_w2s_clip.cached(path, compute)
    assert len(calls) == 1
    assert torch.equal(second["feats"], first["feats"]) and second["n"].item() == 1
    assert store_w2s_clip.cached(path, compute, force=True)["n"].item() == 2 and len(calls) == 2
    assert sorted(os.listdir(path.parent)) == [".feats.pt.lock", "feats.pt"]  # no .tmp left behind


def test_atomic_save_json_and_overwrite(tmp_path):
    path = tmp_path / "r.json"
    store_w2s_clip.atomic_save({"a": 1, "p": Path("x")}, path)
    store_w2s_clip.atomic_save({"a": 2, "p": Path("y")}, path)
    assert json.loads(path.read_text()) == {"a": 2, "p": "y"}
    assert os.listdir(tmp_path) == ["r.json"]


def test_cache_key_changes_with_every_part():
    base = dict(model="resnet18", seed=0, lr=1e-3, root="/data", pretrained=True, splits="abc")
    key = store_w2s_clip.cache_key(**base)
    assert key == store_w2s_clip.cache_key(**dict(reversed(list(base.items()))))  # order-free
    changed = dict(model="resnet50", seed=1, lr=1e-4, root="/data2", pretrained=False, splits="abd")
    for name, value in changed.items():
        assert store_w2s_clip.cache_key(**{**base, name: value}) != key, name
    assert store_w2s_clip.cache_key(**base, extra=None) != key


# ------------------------------------------------------------------------------------------------
# The command line, as a user would type it
# ------------------------------------------------------------------------------------------------
DEMO_NAMES = minidomainnet.DEMO_CLASSES[:4]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny synthetic DomainNet-layout domain (4 classes, 8 train / 20 test images each)."""
    root = tmp_path_factory.mktemp("demo")
    minidomainnet.make_synthetic_domainnet(root / "data", domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, size=32)
    (root / "tiny-clip.json").write_text(json.dumps(minidomainnet.TINY_CLIP))
    return root


def cli_args(root, data, out, cache, **overrides):
    flags = {"--data-root": data, "--domain": "sketch", "--method": "cpl", "--seeds": "0",
             "--clip-model": root / "tiny-clip.json", "--clip-pretrained": "none",
             "--weak-model": "test_resnet", "--weak-epochs": "1", "--strong-epochs": "2",
             "--batch-size": "16", "--workers": "0", "--out-dir": out, "--cache-dir": cache}
    flags.update(overrides)
    return ([str(a) for k, v in flags.items() for a in [k, *(v if isinstance(v, list) else [v])]]
            + ["--no-weak-pretrained"])


def run_cli(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "w2s_clip.py", *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_smoke_weak_then_cpl(demo, tmp_path):
    """`--method weak` then `--method cpl`: results.json with the protocol's sizes, label-order
    class names, the config; the weak model is trained once; the cpl box shows weak and cpl."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    weak = run_cli(cli_args(demo, demo / "data", out, cache, **{"--method": "weak"}))
    assert weak.returncode == 0, weak.stderr
    weak_result = json.loads((out / "sketch" / "weak" / "seed0" / "results.json").read_text())
    assert "weak" in weak.stdout
    weak_files = {p.name: p.stat().st_mtime_ns for p in cache.glob("weak-*")}
    assert len(weak_files) == 3  # the weak model, its training history and its logits
    history = weak_result["weak_training"]
    assert [row["epoch"] for row in history] == [1] and 0 <= history[0]["train_accuracy"] <= 1
    assert weak_result["hardware"]["device"] == "cpu" and weak.stdout.startswith("device: cpu, fp32")

    proc = run_cli(cli_args(demo, demo / "data", out, cache))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "sketch" / "cpl" / "seed0" / "results.json").read_text())
    n = 20 * 4
    hold = 4 * n // 5
    assert (r["n_test"], r["n_hold_train"], r["n_hold_val"]) == (16, 4 * hold // 5, hold - 4 * hold // 5)
    assert r["n_weak_train"] == 8 * 4
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert r["classnames"] == ["aircraft carrier", "zebra", "The Eiffel Tower", "t-shirt"]
    assert len(r["per_class_accuracy"]) == 4
    assert isinstance(r["config"], dict) and r["config"]["method"] == ["cpl"]
    assert (r["method"], r["seed"], r["domain"]) == ("cpl", 0, "sketch")
    assert [row["epoch"] for row in r["curves"]] == [0, 1, 2] and r["best_epoch"] in (0, 1, 2)
    # both runs used the same cached weak model: same logits, files not rewritten
    assert r["weak_test_accuracy"] == pytest.approx(weak_result["test_accuracy"])
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("weak-*")} == weak_files
    box = proc.stdout[proc.stdout.index("+-"):]
    assert "weak" in box and "cpl" in box
    # zero-shot is CPL's starting point, untrained: its accuracy is CPL's epoch-0 test accuracy
    zs = run_cli(cli_args(demo, demo / "data", out, cache, **{"--method": "zero-shot"}))
    assert zs.returncode == 0, zs.stderr
    z = json.loads((out / "sketch" / "zero-shot" / "seed0" / "results.json").read_text())
    assert set(r) - set(z) == {"cmm_zero_shot"} and z["best_epoch"] == 0 and len(z["curves"]) == 1
    assert z["test_accuracy"] == pytest.approx(r["curves"][0]["test_acc"])
    # each trained head's epochs, written as training goes: 5 taus x epochs 0-2
    log = list(csv.DictReader((out / "sketch" / "cpl" / "seed0" / "epochs.csv").open()))
    assert len(log) == 15 and [row["epoch"] for row in log[:3]] == ["0", "1", "2"]
    assert {row["tau"] for row in log} == {str(t) for t in r["config"]["tau_grid"]}
    last = r["tuning"][-1]  # tau 1: its selected epoch's row holds its hold-val loss
    assert float(log[12 + last["best_epoch"]]["val_loss"]) == pytest.approx(last["val_loss"])
    # tuned on hold-val: one row per tau of the grid, the chosen tau the best-scoring one
    assert [row["values"]["tau"] for row in r["tuning"]] == r["config"]["tau_grid"]
    best = max(r["tuning"], key=lambda row: row["score"])
    assert r["tuned"] == best["values"] and z["tuned"] == {} and z["tuning"] == []
    assert "zero-shot" in zs.stdout[zs.stdout.index("+-"):]
    # the same command again skips the finished run; other settings stop with a one-line error
    again = run_cli(cli_args(demo, demo / "data", out, cache))
    assert again.returncode == 0 and "all runs exist" in again.stdout
    assert f"| {'cpl':<16}{100 * r['test_accuracy']:6.2f}" in again.stdout  # its box, as printed
    other = run_cli(cli_args(demo, demo / "data", out, cache, **{"--tau": "0.5"}))
    lines = other.stderr.strip().splitlines()
    assert other.returncode != 0 and len(lines) == 1 and "other settings" in lines[0], other.stderr
    assert json.loads((out / "sketch" / "cpl" / "seed0" / "results.json").read_text()) == r


# Data sets beside DomainNet: Office-Home's layout and a folder of one's own
def tree_digest(folder):
    """Every file under `folder`: its relative path, bytes and modification time."""
    return sorted((str(p.relative_to(folder)), p.read_bytes(), p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def officehome(tmp_path_factory):
    """An Office-Home-layout folder: domain "Real World" (spaced, as in the official archive),
    4 classes of 8 + 20 images."""
    root = tmp_path_factory.mktemp("officehome")
    minidomainnet.make_synthetic_domainnet(root, domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, layout="officehome")
    (root / "sketch").rename(root / "Real World")
    return root


def test_officehome_split_is_stratified_seeded_and_leaves_the_data_untouched(demo, officehome, tmp_path):
    """`--dataset officehome`: labels follow the sorted class folders (names `_` -> space); each
    class is split 80/20 by --split-seed (the same split twice, another with another seed); the
    split files go to <out-dir>/splits; the user's folder is byte-identical afterwards."""
    before = tree_digest(officehome)
    splits = {}
    for tag, domain, seed in (("a", "Real World", "0"), ("b", "Real_World", "0"), ("c", "Real_World", "1")):
        out = tmp_path / tag
        proc = run_cli(cli_args(demo, officehome, out, tmp_path / "cache", **{
            "--dataset": "officehome", "--domain": domain, "--method": "weak", "--split-seed": seed}))
        assert proc.returncode == 0, proc.stderr
        r = json.loads((out / "Real_World" / "weak" / "seed0" / "results.json").read_text())
        assert r["classnames"] == sorted(n.replace("_", " ") for n in DEMO_NAMES) == [
            "The Eiffel Tower", "aircraft carrier", "t-shirt", "zebra"]
        splits[tag] = [(out / "splits" / "officehome" / f"Real_World_{s}.txt").read_text()
                       for s in ("train", "test")]
    assert splits["a"] == splits["b"] and splits["a"] != splits["c"]
    train, test = ([line.rsplit(" ", 1) for line in text.splitlines()] for text in splits["a"])
    for y in range(4):  # 28 images per class: round(0.8 * 28) = 22 train, 6 test
        assert sum(lab == str(y) for _, lab in train) == 22 and sum(lab == str(y) for _, lab in test) == 6
    every = {str(p.relative_to(officehome)) for p in officehome.rglob("*.jpg")}
    assert {p for p, _ in train} | {p for p, _ in test} == every and not {p for p, _ in train} & {p for p, _ in test}
    assert all(p.startswith("Real World/") for p, _ in train)
    assert tree_digest(officehome) == before


def folder_copy(demo_folder, tmp_path, classnames=True):
    """The fixture's images in the folder layout <root>/sketch/{train,test}/<class>/<image>."""
    root = tmp_path / "mine"
    minidomainnet.make_synthetic_domainnet(root, domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, layout="folder")
    if not classnames:
        (root / "classnames.txt").unlink()
    return root


@pytest.mark.parametrize("classnames", [True, False])
def test_folder_layout_label_order_and_same_run_as_domainnet_layout(demo, tmp_path, classnames):
    """`--dataset folder` reads train/ and test/ as D_train and D_test; label order is
    classnames.txt's (the DomainNet-layout copy of the same images gives the same weak model and
    accuracy), else the sorted folder names."""
    root = folder_copy(demo, tmp_path, classnames)
    before = tree_digest(root)
    proc = run_cli(cli_args(demo, root, tmp_path / "out", tmp_path / "cache",
                            **{"--dataset": "folder", "--method": "weak"}))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "out" / "sketch" / "weak" / "seed0" / "results.json").read_text())
    names = [n.replace("_", " ") for n in (DEMO_NAMES if classnames else sorted(DEMO_NAMES))]
    assert r["classnames"] == names and r["config"]["dataset"] == "folder"
    assert tree_digest(root) == before
    if classnames:  # the DomainNet-layout fixture holds the same images, in the same order
        ref = run_cli(cli_args(demo, demo / "data", tmp_path / "ref", tmp_path / "cache-ref",
                               **{"--method": "weak"}))
        assert ref.returncode == 0, ref.stderr
        r_ref = json.loads((tmp_path / "ref" / "sketch" / "weak" / "seed0" / "results.json").read_text())
        assert r["test_accuracy"] == r_ref["test_accuracy"]
        assert r["per_class_accuracy"] == r_ref["per_class_accuracy"]


def test_folder_images_are_checked_once_per_data_folder(demo, tmp_path, monkeypatch):
    """Writing a folder's split files and the run itself share one stamped image check: the first
    command opens every image's header once, a second command not at all."""
    root = folder_copy(demo, tmp_path)
    calls = []
    real = checks_w2s_clip.check_images
    monkeypatch.setattr(store_w2s_clip, "check_images",  # as check_images_once calls it
                        lambda r, p, **kw: calls.append(len(p)) or real(r, p, **kw))
    for seed in ("0", "1"):
        w2s_clip.main([str(a) for a in cli_args(demo, root, tmp_path / "out", tmp_path / "cache",
                                                 **{"--dataset": "folder", "--method": "weak",
                                                    "--seeds": seed})])
    assert calls == [(8 + 20) * 4]


@pytest.mark.parametrize("damage, fragments", [
    ("no-test", ["has no test/ folder"]),
    ("empty-class", ["holds no images"]),
    ("one-split-class", ["is in", "only", "both train/ and test/"]),
    ("not-an-image", ["unreadable"]),
    ("unknown-domain", ["--domain painting", "found: sketch"]),
    ("classnames-extra", ["classnames.txt", "has no folder"]),
])
def test_malformed_folder_is_one_line_and_writes_nothing(demo, tmp_path, damage, fragments):
    root = folder_copy(demo, tmp_path)
    domain = "sketch"
    if damage == "no-test":
        shutil.rmtree(root / "sketch" / "test")
    elif damage == "empty-class":
        for f in (root / "sketch" / "train" / "zebra").iterdir():
            f.unlink()
    elif damage == "one-split-class":
        shutil.rmtree(root / "sketch" / "test" / "zebra")
    elif damage == "not-an-image":
        next((root / "sketch" / "train" / "zebra").iterdir()).write_bytes(b"not a jpeg")
    elif damage == "unknown-domain":
        domain = "painting"
    elif damage == "classnames-extra":
        (root / "classnames.txt").write_text("\n".join(list(DEMO_NAMES) + ["unicorn"]) + "\n")
    out = tmp_path / "out"
    proc = run_cli(cli_args(demo, root, out, tmp_path / "cache",
                            **{"--dataset": "folder", "--domain": domain, "--method": "weak"}))
    assert_user_error(proc, out, *fragments)
    assert not (out / "splits").exists()


def test_domainnet_domain_names_are_checked_and_other_data_sets_take_their_own(demo, tmp_path):
    proc = run_cli(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                            **{"--domain": "Art"}))
    assert proc.returncode == 2 and "--domain" in proc.stderr and "--dataset officehome" in proc.stderr


def test_tables_of_another_data_set_show_no_paper_numbers(demo, officehome, tmp_path):
    """Office-Home runs: Table 2's column is its domain, and neither the tables nor paper_gap.md
    print the paper's DomainNet numbers."""
    out = tmp_path / "out"
    proc = run_cli(cli_args(demo, officehome, out, tmp_path / "cache", **{
        "--dataset": "officehome", "--domain": "Real_World", "--method": ["weak", "cpl"]}))
    assert proc.returncode == 0, proc.stderr
    report_w2s_clip.build_tables(out, tmp_path / "tables")
    table2 = (tmp_path / "tables" / "table2.md").read_text()
    assert "Real_World" in table2 and "[" not in table2.split("Worst-10")[0]  # no [paper] cells
    gap = (tmp_path / "tables" / "paper_gap.md").read_text()
    assert "officehome runs" in gap and "| method |" not in gap


# CPE (Shao et al. 2023): templates weighted by their worst-k CMM with pseudo-labels
def planted_templates(seed=0, k=10, d=32, n=2000, noise=1.5, template_noise=0.3, good=3):
    """Images of k classes around unit directions u_c; `good` templates near u_c and a last one
    that names the wrong class (u_{c+1}). Returns (features [n, d], labels [n], embeddings [k, T, d])."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    y = torch.randint(k, (n,), generator=g)
    x = u[y] + noise * torch.randn(n, d, generator=g) / d ** 0.5
    templates = [u + template_noise * torch.randn(k, d, generator=g) / d ** 0.5 for _ in range(good)]
    return x, y, torch.stack(templates + [u.roll(-1, 0)], dim=1)


def test_cpe_drops_a_template_naming_the_wrong_class_and_beats_the_uniform_ensemble():
    x, y, emb = planted_templates()
    weights, worst = cpe_w2s_clip.cpe_weights(emb, x)
    assert weights[-1] == 0 and worst.argmin() == 3 and torch.isclose(weights.sum(), torch.tensor(1.0))
    acc = lambda p: ((F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).T).argmax(1) == y).float().mean()
    uniform = cpe_w2s_clip.weighted_prototypes(emb, torch.full((4,), 0.25), normalize=True)
    assert acc(cpe_w2s_clip.weighted_prototypes(emb, weights, normalize=True)) > acc(uniform) + 0.02


def test_cpe_weights_closed_form_and_weighted_prototypes_with_descriptions():
    """w_t = (m_t - min m) / sum(m - min m) from each template's worst-k CMM under the uniform
    ensemble's pseudo-labels, computed here by hand; a description is one more prompt of its class
    at weight 1/T."""
    x, _, emb = planted_templates(n=300)
    k, T, _ = emb.shape
    unit = F.normalize(emb, dim=-1)
    pseudo = (F.normalize(x, dim=-1) @ F.normalize(unit.mean(1), dim=-1).T).argmax(1)
    m = []
    for t in range(T):
        cos = F.normalize(x, dim=-1) @ unit[:, t].T
        margin = cos[range(len(x)), pseudo] - cos.scatter(1, pseudo[:, None], -2.0).max(1).values
        per_class = [margin[pseudo == c].mean() for c in range(k) if (pseudo == c).any()]
        m.append(torch.stack(sorted(per_class))[:3].mean())
    m = torch.stack(m)
    weights, worst = cpe_w2s_clip.cpe_weights(emb, x, k_worst=3)
    torch.testing.assert_close(worst, m)
    torch.testing.assert_close(weights, (m - m.min()) / (m - m.min()).sum())
    extra = torch.randn(2, emb.shape[2])
    protos = cpe_w2s_clip.weighted_prototypes(emb, weights, descriptions={4: extra})
    torch.testing.assert_close(protos[4], ((weights[:, None] * emb[4]).sum(0) + extra.sum(0) / T) / (1 + 2 / T))
    torch.testing.assert_close(protos[3], (weights[:, None] * emb[3]).sum(0))


@pytest.mark.parametrize("norm", ["raw", "unit"])
def test_cpe_with_one_template_equals_the_single_template_prototypes(clip, norm):
    model, tokenizer = clip
    emb = cpe_w2s_clip.prompt_embeddings(model, tokenizer, PROMPT_NAMES, ["a photo of a {}"])
    weights, _ = cpe_w2s_clip.cpe_weights(emb, torch.randn(50, emb.shape[-1]))
    assert weights.tolist() == [1.0]
    single = w2s_clip.text_prototypes(model, tokenizer, PROMPT_NAMES, ["a photo of a {}"],
                                      normalize=norm == "unit")
    torch.testing.assert_close(cpe_w2s_clip.weighted_prototypes(emb, weights, norm == "unit"), single)


def test_cli_cpe_weights_use_no_true_label(demo, tmp_path, monkeypatch):
    """`zero-shot --prototype-init cpe`: results.json records the 80 templates' weights and k, equal
    to cpe_weights on the seed's hold-train features; a run with every D_test label scrambled records
    the same weights."""
    flags = {"--method": "zero-shot", "--prototype-init": "cpe", "--cpe-k": "2"}
    w2s_clip.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / "a", tmp_path / "c", **flags)])
    r = json.loads((tmp_path / "a" / "sketch" / "zero-shot" / "seed0" / "results.json").read_text())
    assert r["cpe"]["k_worst"] == 2 and len(r["cpe"]["weights"]) == len(open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert r["cpe"]["templates"][0] == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("{}")
    real = datasets_w2s_clip.load_domain

    def scrambled(*a, **kw):
        data = real(*a, **kw)
        data["test_labels"] = data["test_labels"][torch.randperm(len(data["test_labels"]),
                                                                 generator=torch.Generator().manual_seed(1))]
        return data
    monkeypatch.setattr(datasets_w2s_clip, "load_domain", scrambled)
    w2s_clip.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / "b", tmp_path / "c2", **flags)])
    r2 = json.loads((tmp_path / "b" / "sketch" / "zero-shot" / "seed0" / "results.json").read_text())
    assert r2["cpe"]["weights"] == r["cpe"]["weights"]


def test_cli_class_descriptions_enrich_the_named_class_only(demo, tmp_path):
    """A description of one class changes that class's CPE prototype and no other."""
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps({"zebra": ["a striped horse of the savanna"]}))
    cfg = w2s_clip.parse_args(["--clip-model", str(demo / "tiny-clip.json"), "--clip-pretrained", "none"])
    model, _, tokenizer = w2s_clip.load_clip(cfg.clip_model, None)
    names = [n.replace("_", " ") for n in DEMO_NAMES]
    feats = torch.randn(40, model.visual.output_dim, generator=torch.Generator().manual_seed(0))
    protos = {}
    for tag, desc in (("plain", None), ("described", cpe_w2s_clip.read_class_descriptions(path, names))):
        strong = {"clip": model, "tokenizer": tokenizer, "hold_features": feats}
        protos[tag] = w2s_clip.zero_shot_prototypes(strong, names, "cpe", descriptions=desc)
    changed = (protos["plain"] - protos["described"]).abs().amax(dim=1) > 0
    assert changed.tolist() == [n == "zebra" for n in names]
    assert strong["cpe"]["described_classes"] == ["zebra"]


@pytest.mark.parametrize("content, fragment", [
    ('{"unicorn": ["a horse with a horn"]}', "'unicorn' is not a class"),
    ('{"zebra": "striped"}', "non-empty list of sentences"),
    ("[1, 2]", "expected an object"),
    ("{not json", "cannot read it as JSON"),
])
def test_cli_error_bad_class_descriptions(demo, tmp_path, content, fragment):
    path = tmp_path / "descriptions.json"
    path.write_text(content)
    proc = run_cli(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache", **{
        "--method": "zero-shot", "--prototype-init": "cpe", "--class-descriptions": path}))
    assert_user_error(proc, tmp_path / "out", "--class-descriptions", fragment)


def test_make_jobs_in_parallel_equal_one_by_one_and_compute_each_cache_once(demo, tmp_path):
    """`make jobs` lines run with `xargs -P 2` give the same results as the same lines run one by
    one; every cache entry is computed by one process only ($W2S_CLIP_CACHE_LOG counts them);
    `make tables` builds from them."""
    flags = (f"--clip-model {demo / 'tiny-clip.json'} --clip-pretrained none --weak-model "
             f"test_resnet --no-weak-pretrained --weak-epochs 1 --strong-epochs 2 --batch-size 16 "
             f"--workers 0 --device cpu --tune none")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outs = {}
    for mode in ("parallel", "sequential"):
        out, cache, log = tmp_path / mode / "runs", tmp_path / mode / "cache", tmp_path / f"{mode}.log"
        lines = subprocess.run(
            ["make", "-s", "jobs", f"PY={sys.executable}", f"DATA={demo / 'data'}", "DOMAINS=sketch",
             "SEEDS=0 1", "WEAK_MODELS=", f"OUT={out}", f"CACHE={cache}", f"FLAGS={flags}"],
            cwd=HERE, capture_output=True, text=True, check=True).stdout.splitlines()
        assert len(lines) == 2 + 2 * 2  # (all, ensemble, cpe) x 2 seeds
        job_env = {**env, "W2S_CLIP_CACHE_LOG": str(log)}
        if mode == "parallel":
            subprocess.run(["xargs", "-P", "2", "-d", "\n", "-n", "1", "sh", "-c"], input="\n".join(lines),
                           cwd=HERE, env=job_env, text=True, check=True, capture_output=True)
        else:
            for line in lines:
                subprocess.run(["sh", "-c", line], cwd=HERE, env=job_env, check=True, capture_output=True)
        computed = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
        assert len(computed) == len(set(computed)), computed  # no entry computed twice
        outs[mode] = {str(p.relative_to(out)): json.loads(p.read_text()) for p in out.rglob("results.json")}
    assert outs["parallel"].keys() == outs["sequential"].keys() and len(outs["parallel"]) > 20
    for key, r in outs["parallel"].items():
        other = outs["sequential"][key]
        assert (r["test_accuracy"], r["predictions"]) == (other["test_accuracy"], other["predictions"]), key
    tables = subprocess.run(["make", "tables", f"PY={sys.executable}", f"OUT={tmp_path / 'parallel' / 'runs'}",
                             f"TABLES={tmp_path / 'tables'}"], cwd=HERE, env=env, capture_output=True, text=True)
    assert tables.returncode == 0, tables.stderr
    assert "cpl (cpe init)" in (tmp_path / "tables" / "table4.md").read_text()


# The research instrument: student-supervisor agreement and intervals for differences
def test_agreement_report_hand_example():
    """6 images: the weak model is right on 0, 1, 2; the student copies its mistake on 3, fixes 4,
    makes a new one on 5 and drops 2."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    weak = F.one_hot(torch.tensor([0, 1, 2, 1, 2, 0]), 3).float()
    student = F.one_hot(torch.tensor([0, 1, 0, 1, 1, 1]), 3).float()
    r = w2s_clip.agreement_report(student, weak, labels)
    assert r == pytest.approx({"agreement_with_weak": 3 / 6, "accuracy_where_weak_right": 2 / 3,
                               "accuracy_where_weak_wrong": 1 / 3})
    assert w2s_clip.agreement_report(weak, weak, labels)["accuracy_where_weak_wrong"] == 0.0
    right = w2s_clip.agreement_report(student, F.one_hot(labels, 3).float(), labels)
    assert right["accuracy_where_weak_wrong"] is None  # no image where the weak model is wrong


def test_agreement_identity_and_predictions_on_a_real_run(demo, tmp_path):
    """weak accuracy * right + (1 - weak accuracy) * wrong = accuracy, from results.json; the
    per-image predictions give the accuracy; head.pt holds the trained prototypes."""
    w2s_clip.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache")])
    run = tmp_path / "out" / "sketch" / "cpl" / "seed0"
    r = json.loads((run / "results.json").read_text())
    w = r["weak_test_accuracy"]
    assert w * r["accuracy_where_weak_right"] + (1 - w) * r["accuracy_where_weak_wrong"] == pytest.approx(
        r["test_accuracy"], abs=1e-6)
    assert sum(p == y for p, y in zip(r["predictions"], r["d_test_labels"])) / r["n_test"] == pytest.approx(
        r["test_accuracy"])
    head = torch.load(run / "head.pt")
    assert list(head) == ["prototypes"] and head["prototypes"].shape[0] == 4


def test_bootstrap_interval_covers_a_known_difference_about_95_percent():
    """Two seeds of 400 paired images with P(A right) = 0.7, P(B right) = 0.6 (true difference
    10 points): over 200 draws the 95% interval holds 10 in 88-99% of them; identical methods
    give 0 [0, 0]."""
    g = torch.Generator().manual_seed(0)
    hits = 0
    for draw in range(200):
        u = [torch.rand(400, generator=g) for _ in range(2)]  # one latent per image: paired
        pairs = {"d": [(x < 0.7, x < 0.6) for x in u]}
        diff, low, high = report_w2s_clip.bootstrap_difference(pairs, n_boot=500, seed=draw)
        hits += low <= 10 <= high
    assert 0.88 <= hits / 200 <= 0.99, hits
    same = torch.rand(300, generator=g) < 0.5
    assert report_w2s_clip.bootstrap_difference({"d": [(same, same)]}) == (0.0, 0.0, 0.0)


def test_tables_group_a_sweep_by_the_setting_that_differs(demo, tmp_path):
    """Runs of one cell made with three τ (one out-dir each, under one folder): three rows of
    Table 2 named by τ, runs.csv with a tau column; CPL − weak with an interval in differences.md."""
    for tau in ("0.1", "0.3", "1"):
        w2s_clip.main([str(a) for a in cli_args(
            demo, demo / "data", tmp_path / "sweep" / tau, tmp_path / "cache",
            **{"--method": ["weak", "cpl"], "--tune": "none", "--tau": tau})])
    report_w2s_clip.build_tables(tmp_path / "sweep", tmp_path / "tables")
    table2 = (tmp_path / "tables" / "table2.md").read_text()
    labels = [line.split(" | ")[0][2:] for line in table2.split("Worst-10")[0].splitlines()
              if line.startswith("| cpl")]
    assert len(labels) == 3 and "cpl" in labels  # the most common settings (a tie: the first)
    assert {label for label in labels if label != "cpl"} in (
        {f"cpl (tau={a})", f"cpl (tau={b})"} for a, b in (("0.3", "1"), ("0.1", "1"), ("0.1", "0.3")))
    assert table2.split("Worst-10")[0].count("| weak |") == 1 and "weak (" not in table2  # counted once
    with open(tmp_path / "tables" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["tau"] for r in rows if r["method"] == "cpl"}) == ["0.1", "0.3", "1.0"]
    diff = (tmp_path / "tables" / "differences.md").read_text()
    assert re.search(r"\| weak \| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", diff), diff


# Decoding less: the pixel caches
def varied_images(folder, sizes=((40, 30), (31, 57), (64, 64), (5, 9))):
    """PNG images of the given (w, h) sizes with seeded random pixels; their relative paths."""
    import numpy as np
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        from PIL import Image
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(f"{i}.png")
    return paths


@pytest.mark.parametrize("short", [10 ** 6, 24])
def test_pixel_cache_holds_each_image_as_decoded_and_resized(tmp_path, short):
    """Each cached image equals PIL's decode (then its bicubic resize to the short side, never
    enlarged), whatever its size; no temporary file is left."""
    import numpy as np
    from PIL import Image
    paths = varied_images(tmp_path / "img")
    prepare, out_size = store_w2s_clip.short_side(short)
    cache = store_w2s_clip.build_pixel_cache(tmp_path / "c" / "px", tmp_path / "img", paths, prepare, out_size)
    assert len(cache) == len(paths)
    for i, rel in enumerate(paths):
        image = Image.open(tmp_path / "img" / rel).convert("RGB")
        w, h = image.size
        want = image if min(w, h) <= short else image.resize(
            (round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BICUBIC)
        assert min(cache[i].size) == min(min(w, h), short)
        assert np.array_equal(np.asarray(cache[i]), np.asarray(want))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".px.u8.lock", "px.idx.pt", "px.u8"]


@pytest.mark.parametrize("damage", ["truncate", "no-index", "other-count"])
def test_damaged_pixel_cache_is_rebuilt(tmp_path, damage):
    import numpy as np
    paths = varied_images(tmp_path / "img")
    prepare, out_size = store_w2s_clip.short_side(10 ** 6)
    stem = tmp_path / "c" / "px"
    first = store_w2s_clip.build_pixel_cache(stem, tmp_path / "img", paths, prepare, out_size)
    want = [np.asarray(first[i]) for i in range(len(paths))]
    if damage == "truncate":
        os.truncate(f"{stem}.u8", 100)
    elif damage == "no-index":
        os.remove(f"{stem}.idx.pt")
    assert not store_w2s_clip.PixelCache(stem).valid(len(paths) + (damage == "other-count"))
    n = len(paths) - (damage == "other-count")
    again = store_w2s_clip.build_pixel_cache(stem, tmp_path / "img", paths[:n], prepare, out_size)
    assert all(np.array_equal(np.asarray(again[i]), want[i]) for i in range(n))
    assert store_w2s_clip.PixelCache(stem).valid(n)


def test_eval_pixel_cache_gives_the_eval_transform_bit_for_bit(demo, tmp_path):
    """timm's eval transform cut at its tensor conversion: the cached crops plus the rest give the
    same tensors as the whole transform on the decoded file; open_clip's preprocessing can be cut
    too; a Hugging Face processor cannot (None)."""
    data = datasets_w2s_clip.load_domain(demo / "data", "sketch")
    _, _, eval_tf = w2s_clip.create_weak_model("test_resnet", 4, pretrained=False)
    pre, post, (h, w) = store_w2s_clip.eval_pixel_steps(eval_tf)
    paths, labels = data["test_paths"][:12], data["test_labels"][:12]
    cache = store_w2s_clip.build_pixel_cache(tmp_path / "px", demo / "data", paths, pre, lambda *_: (w, h))
    plain = datasets_w2s_clip.ImageList(demo / "data", paths, labels, eval_tf)
    cached = datasets_w2s_clip.ImageList(demo / "data", paths, labels, post, pixels=cache)
    for i in range(len(paths)):
        assert torch.equal(plain[i][0], cached[i][0]) and plain[i][1] == cached[i][1]
    _, preprocess, _ = w2s_clip.load_clip(str(demo / "tiny-clip.json"), None)
    assert store_w2s_clip.eval_pixel_steps(preprocess) is not None
    assert store_w2s_clip.eval_pixel_steps(hf_w2s_clip.HFEvalTransform(None)) is None


def test_decodes_per_image_reach_one_with_the_caches(demo, tmp_path, monkeypatch):
    """Counted in process: weak training and weak logits over two seeds decode
    seeds * (epochs * n_train + n_test) images without the caches, n_train + n_test with them
    (each image once); the weak logits are the same tensors."""
    decodes = []
    real = datasets_w2s_clip.decode_image
    for module in (datasets_w2s_clip, store_w2s_clip):  # ImageList's and the pixel cache's
        monkeypatch.setattr(module, "decode_image", lambda path: decodes.append(path) or real(path))
    n_train, n_test, epochs, seeds = 8 * 4, 20 * 4, 2, 2
    logits = {}
    for name, flags in (("plain", ["--no-eval-image-cache"]),
                        ("cached", ["--train-image-cache", "1000"])):
        decodes.clear()
        w2s_clip.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / name, tmp_path / f"c-{name}",
                                                **{"--method": "weak", "--seeds": ["0", "1"],
                                                   "--weak-epochs": str(epochs)})] + flags)
        logits[name] = sorted((p.name, torch.load(p)) for p in (tmp_path / f"c-{name}").glob("*logits.pt"))
        assert len(decodes) == {"plain": seeds * (epochs * n_train + n_test),
                                "cached": n_train + n_test}[name]
    assert len(set(decodes)) == n_train + n_test
    assert all(torch.equal(a[1], b[1]) for a, b in zip(logits["plain"], logits["cached"]))


def test_cli_huge_lr_never_returns_the_untrained_head_unless_the_start_is_a_candidate(demo, tmp_path):
    """`--lr 1000`: every trained method's best_epoch is >= 1 (the Trainer's candidates);
    `--select-from start-and-epochs` brings back the old behaviour, epoch 0 wherever the start
    would have won, and each run records whether it would have."""
    cache, methods = tmp_path / "cache", ["kd-lp", "kd-tp", "cpl"]
    best = {}
    for select_from in ("epochs", "start-and-epochs"):
        out = tmp_path / select_from
        proc = run_cli(cli_args(demo, demo / "data", out, cache, **{
            "--method": methods, "--lr": "1000", "--tau": "0.1", "--tune": "none",
            "--select-from": select_from}))
        assert proc.returncode == 0, proc.stderr
        rs = {m: json.loads((out / "sketch" / m / "seed0" / "results.json").read_text())
              for m in methods}
        best[select_from] = {m: (r["best_epoch"], r["start_would_win"]) for m, r in rs.items()}
    assert all(epoch >= 1 for epoch, _ in best["epochs"].values()), best
    assert any(won for _, won in best["epochs"].values()), best  # lr 1000 does hurt
    for m, (epoch, won) in best["start-and-epochs"].items():
        assert (epoch == 0) == won == best["epochs"][m][1], (m, best)


def assert_user_error(proc, out, *fragments):
    """Non-zero exit, stderr is one line `error: ...` naming the fragments, no traceback, no results."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not list(Path(out).rglob("results.json"))


def corrupt_copy(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    return data


def test_cli_error_missing_data_root(demo, tmp_path):
    missing = tmp_path / "no-such-folder"
    proc = run_cli(cli_args(demo, missing, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", str(missing))


def test_cli_error_malformed_split_line(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    split = data / "sketch_train.txt"
    lines = split.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]  # line 3 loses its label
    split.write_text("\n".join(lines) + "\n")
    proc = run_cli(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", "sketch_train.txt:3")


def test_cli_error_missing_image(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    rel = (data / "sketch_test.txt").read_text().splitlines()[25].split()[0]
    (data / rel).unlink()
    proc = run_cli(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", rel, "missing")


def test_cli_error_label_out_of_range(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    split = data / "sketch_test.txt"
    lines = split.read_text().splitlines()
    lines[-1] = lines[-1].rsplit(" ", 1)[0] + " 7"  # 4 classes: labels are 0..3
    split.write_text("\n".join(lines) + "\n")
    proc = run_cli(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", "label 7", "0..3")


def test_cli_error_unknown_timm_model(demo, tmp_path):
    proc = run_cli(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                            **{"--weak-model": "not_a_model"}))
    assert_user_error(proc, tmp_path / "out", "--weak-model not_a_model")


# ------------------------------------------------------------------------------------------------
# Weak models by their Hugging Face ids (`hf:`): a tiny transformers classifier saved to a folder
# ------------------------------------------------------------------------------------------------
HF_MEAN, HF_STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random-init transformers ResNet (3 labels) and a ConvNeXt-style image processor
    (shortest edge 32 / crop_pct 0.875, then a 32 x 32 centre crop), saved like a hub checkpoint."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-resnet")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3)
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875,
                                        image_mean=HF_MEAN, image_std=HF_STD).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pretrained", [True, False])
def test_hf_weak_model_fresh_k_way_head_logits_and_processor_transforms(hf_folder, pretrained):
    """hf:<folder> gives logits [n, k] for a new k, the saved backbone (or a random init from the
    config), and transforms whose output is the processor's size and its (x/255 - mean) / std."""
    from PIL import Image
    from transformers import AutoModelForImageClassification
    model, train_tf, eval_tf = w2s_clip.create_weak_model(f"hf:{hf_folder}", 7, pretrained)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    saved = AutoModelForImageClassification.from_pretrained(hf_folder).state_dict()
    ours = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    conv = "resnet.embedder.embedder.convolution.weight"
    assert torch.equal(ours[conv], saved[conv]) == pretrained
    assert ours["classifier.1.weight"].shape == (7, 16)
    colour = (200, 100, 50)
    image = Image.new("RGB", (50, 40), colour)
    expected = (torch.tensor(colour) / 255 - torch.tensor(HF_MEAN)) / torch.tensor(HF_STD)
    for tf in (train_tf, eval_tf):
        x = tf(image)
        assert x.shape == (3, 32, 32)
        torch.testing.assert_close(x, expected[:, None, None].expand(3, 32, 32), atol=1e-5, rtol=0)


def test_hf_weak_model_without_transformers_is_one_line_error(monkeypatch, demo):
    """With transformers missing, hf: names stop with one line that names the package."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises
    with pytest.raises(w2s_clip.UserError) as e:
        w2s_clip.create_weak_model("hf:microsoft/resnet-18", 5)
    assert "transformers" in str(e.value) and "\n" not in str(e.value)
    args = w2s_clip.parse_args(["--weak-model", "hf:microsoft/resnet-18", "--clip-model",
                                str(demo / "tiny-clip.json"), "--clip-pretrained", "none"])
    with pytest.raises(w2s_clip.UserError, match="--weak-model hf:microsoft/resnet-18 needs the "
                                                 "transformers package"):
        checks_w2s_clip.check_models(args)


def test_check_models_accepts_hf_classifier_and_refuses_bad_ids(hf_folder, demo, tmp_path):
    transformers = pytest.importorskip("transformers")
    clip_flags = ["--clip-model", str(demo / "tiny-clip.json"), "--clip-pretrained", "none"]
    checks_w2s_clip.check_models(w2s_clip.parse_args(["--weak-model", f"hf:{hf_folder}", *clip_flags]))
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    for name, fragment in (("hf:no-such-org/no-such-model", "not in the local cache"),  # offline
                           (f"hf:{tmp_path / 'bert'}", "not an image classifier")):
        with pytest.raises(w2s_clip.UserError, match=fragment) as e:
            checks_w2s_clip.check_models(w2s_clip.parse_args(["--weak-model", name, *clip_flags]))
        assert str(e.value).startswith(f"--weak-model {name}") and "\n" not in str(e.value)


def test_cli_weak_run_with_an_hf_weak_model(hf_folder, demo, tmp_path):
    """`--weak-model hf:<folder>` trains, caches (one flat file name) and scores the weak model."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    proc = run_cli(cli_args(demo, demo / "data", out, cache,
                            **{"--method": "weak", "--weak-model": f"hf:{hf_folder}"}))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "sketch" / "weak" / "seed0" / "results.json").read_text())
    assert 0.0 <= r["test_accuracy"] <= 1.0 and len(r["per_class_accuracy"]) == 4
    assert len([p for p in cache.iterdir() if p.name.startswith("weak-sketch-hf-")]) == 3  # model, history, logits


def test_cli_error_unknown_open_clip_model(demo, tmp_path):
    proc = run_cli(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                            **{"--clip-model": "not-a-clip-model"}))
    assert_user_error(proc, tmp_path / "out", "--clip-model not-a-clip-model")


def test_cli_error_empty_split_file(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    (data / "sketch_test.txt").write_text("\n")
    proc = run_cli(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", "sketch_test.txt", "empty")


def test_cli_error_unreadable_image(demo, tmp_path):
    """A listed file that exists but is not an image is named before any training."""
    data = corrupt_copy(demo, tmp_path)
    rel = (data / "sketch_train.txt").read_text().splitlines()[5].split()[0]
    (data / rel).write_bytes(b"this is not a jpeg")
    proc = run_cli(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", rel, "unreadable")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_cli_error_pretrained_tag_the_model_lacks(demo, tmp_path):
    proc = run_cli(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                            **{"--clip-model": "ViT-B-32", "--clip-pretrained": "no_such_tag"}))
    assert_user_error(proc, tmp_path / "out", "--clip-pretrained no_such_tag", "openai")


def record_hub_requests(monkeypatch, module):
    """Make `module.hf_hub_download` record (repo, filename) and answer "no such file"."""
    from huggingface_hub.errors import EntryNotFoundError
    asked = []

    def fake(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise EntryNotFoundError(f"{repo_id}/{filename}")
    monkeypatch.setattr(module, "hf_hub_download", fake)
    return asked


@pytest.mark.parametrize("tag", ["openai", "datacomp_s_s13m_b4k"])
def test_weight_files_are_the_files_open_clip_requests(monkeypatch, tag):
    """weights_w2s_clip names the hub files open_clip's own download asks for, in its order."""
    import open_clip.pretrained
    import weights_w2s_clip
    asked = record_hub_requests(monkeypatch, open_clip.pretrained)
    with pytest.raises(Exception):
        open_clip.download_pretrained(open_clip.get_pretrained_cfg("ViT-B-32", tag))
    ((repo, names),) = weights_w2s_clip.clip_files("ViT-B-32", tag)
    assert asked == [(repo, n) for n in names]


def test_weight_files_are_the_files_timm_requests(monkeypatch):
    import timm.models._hub
    import weights_w2s_clip
    asked = record_hub_requests(monkeypatch, timm.models._hub)
    with pytest.raises(Exception):
        timm.create_model("resnet18", pretrained=True)
    ((repo, names),) = weights_w2s_clip.timm_files("resnet18")
    assert asked == [(repo, n) for n in names]


def fake_hub_file(hub_cache, repo, filename, size):
    """A file laid out as huggingface_hub caches it: models--org--name/{refs/main, snapshots/<rev>/}."""
    folder = hub_cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / ("0" * 40) / filename).write_bytes(b"\0" * size)


def test_missing_weight_offline_is_one_line_naming_make_weights_and_a_cached_one_passes(demo, tmp_path):
    """Offline with an empty cache: the run stops before any work with `make weights` named, and
    `weights_w2s_clip.py --check` lists the file and exits 1; with the file in the cache (the hub's
    layout) the check passes, with its size."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                    **{"--clip-model": "ViT-B-32", "--clip-pretrained": "openai"})
    proc = subprocess.run([sys.executable, "w2s_clip.py", *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_user_error(proc, tmp_path / "out", "--clip-pretrained openai", "ViT-B-32 weights",
                      "timm/vit_base_patch32_clip_224.openai", "make weights", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "cache").exists()
    check = [sys.executable, "weights_w2s_clip.py", "--check", "--clip-tags", "openai",
             "--weak-models", "resnet18"]
    proc = subprocess.run(check, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "0 of 2 models cached" in proc.stdout, proc.stdout
    assert "timm/resnet18.a1_in1k/pytorch_model.bin" in proc.stdout
    fake_hub_file(tmp_path / "hf" / "hub", "timm/vit_base_patch32_clip_224.openai",
                  "open_clip_model.safetensors", 3 * 2**20)
    fake_hub_file(tmp_path / "hf" / "hub", "timm/resnet18.a1_in1k", "model.safetensors", 2**20)
    proc = subprocess.run(check, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ViT-B-32 openai: 3 MiB cached" in proc.stdout and "2 of 2 models cached" in proc.stdout


def test_cli_error_output_folder_not_writable(demo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli(cli_args(demo, demo / "data", blocker / "runs", tmp_path / "cache"))
    assert_user_error(proc, tmp_path, "--out-dir", str(blocker / "runs"))


def test_cli_error_too_few_test_images_for_the_splits(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    split = data / "sketch_test.txt"
    split.write_text("\n".join(split.read_text().splitlines()[:2]) + "\n")
    proc = run_cli(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"))
    assert_user_error(proc, tmp_path / "out", "sketch_test.txt", "2 images", "non-empty")


@pytest.mark.parametrize("flag,value", [("--aux-alpha", "1.5"), ("--warmup-ratio", "-0.1"),
                                        ("--weight-decay", "-1e-4"), ("--lr", "0"),
                                        ("--max-grad-norm", "-1"), ("--cpl-logit-scale", "0"),
                                        ("--prototype-norm", "l2"), ("--select-by", "acc")])
def test_parse_args_refuses_out_of_range_values(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_run_settings_change_with_what_shapes_a_result(tmp_path):
    """The resume check's hash moves with the device type, the precision, the split files and the
    data's real path, not with run-only flags (seeds, method, out-dir, --workers: augmentation is
    seeded per sample) or the device index."""
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    args = lambda *extra: w2s_clip.parse_args(["--data-root", str(tmp_path / "data"),
                                               "--clip-pretrained", "none", *extra])
    key = lambda a, digest="d1", device="cpu", precision="fp32": store_w2s_clip.run_settings(
        a, {"digest": digest}, device, precision)
    base = key(args())
    assert key(args("--seeds", "3", "--method", "kd-lp", "--out-dir", "x")) == base
    assert key(args("--data-root", str(tmp_path / "link"))) == base
    assert key(args(), device="cuda:0") == key(args(), device="cuda") != base
    assert key(args(), digest="d2") != base
    assert key(args("--workers", "3")) == key(args("--workers", "0")) == base
    assert key(args(), device="cuda", precision="bf16") != key(args(), device="cuda", precision="fp16")
    assert key(args("--tau", "0.5")) != base


def test_cli_kill_9_then_rerun_equals_an_uninterrupted_run(demo, tmp_path):
    """Resume: kill -9 right after the weak model is cached, rerun the same command; the result
    equals that of an uninterrupted run in fresh folders (so it is also deterministic)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = lambda tag: cli_args(demo, demo / "data", tmp_path / tag / "out", tmp_path / tag / "cache",
                                **{"--weak-epochs": "2", "--strong-epochs": "4"})
    proc = subprocess.Popen([sys.executable, "w2s_clip.py", *args("killed")], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "killed" / "cache"
    while proc.poll() is None and not list(cache.glob("weak-*-model.pt")):
        pass
    proc.kill()
    proc.wait()
    result = Path("sketch/cpl/seed0/results.json")
    assert not (tmp_path / "killed" / "out" / result).exists(), "the run ended before the kill"
    assert list(cache.glob("weak-*-model.pt")) and not list(cache.glob("weak-*-logits.pt"))
    weak_model_mtime = next(cache.glob("weak-*-model.pt")).stat().st_mtime_ns
    for tag in ("killed", "clean"):
        done = run_cli(args(tag))
        assert done.returncode == 0, done.stderr
    assert next(cache.glob("weak-*-model.pt")).stat().st_mtime_ns == weak_model_mtime  # reused
    resumed, clean = (json.loads((tmp_path / t / "out" / result).read_text()) for t in ("killed", "clean"))
    for key in ("test_accuracy", "per_class_accuracy", "weak_test_accuracy", "best_epoch", "curves"):
        assert resumed[key] == clean[key], key


# ------------------------------------------------------------------------------------------------
# Tables from results.json files (hand-made results with known aggregates)
# ------------------------------------------------------------------------------------------------
def write_result(out, domain, method, seed, acc, worst, weak_model="resnet18", init="single",
                 n_classes=None):
    curves = [{"epoch": 1, "step": 3, "train_acc": acc - 0.1, "test_acc": acc - 0.05},
              {"epoch": 2, "step": 6, "train_acc": acc, "test_acc": acc}]
    extra = {} if n_classes is None else {"n_predicted_classes": n_classes}
    store_w2s_clip.atomic_save({"domain": domain, "method": method, "seed": seed,
                                "test_accuracy": acc, "worst10_accuracy": worst, "curves": curves,
                                **extra, "config": {"weak_model": weak_model,
                                                    "clip_model": "ViT-B-32", "prototype_init": init}},
                               store_w2s_clip.result_path(out, domain, method, seed))


def table_row(text, name):
    """The cells of the markdown row whose first cell is `name`, in the first table of `text`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{text}")


def test_build_tables_mean_std_avg_delta_pgr_worst10(tmp_path):
    """Cells, Avg., Δ, the paper's values in brackets, and the PGR of the Avg. column: gaps of 40
    (clipart) and 20 (sketch) points make it differ from a mean of per-column PGRs."""
    runs = {("sketch", "weak"): [0.40, 0.42], ("sketch", "ce-lp"): [0.45, 0.45],
            ("sketch", "cpl"): [0.50, 0.54], ("sketch", "ceiling"): [0.60, 0.62],
            ("clipart", "weak"): [0.30], ("clipart", "ce-lp"): [0.50], ("clipart", "cpl"): [0.35],
            ("clipart", "ceiling"): [0.70]}
    for (domain, method), accs in runs.items():
        for seed, acc in enumerate(accs):
            write_result(tmp_path / "runs", domain, method, seed, acc, worst=acc / 2,
                         n_classes=round(10 * acc) + seed)
    write_result(tmp_path / "runs" / "t3", "clipart", "cpl", 0, 0.33, 0.1, weak_model="resnet34")
    write_result(tmp_path / "runs" / "ens", "sketch", "cpl", 0, 0.55, 0.2, init="ensemble")
    report_w2s_clip.build_tables(tmp_path / "runs", tmp_path / "tables")
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    # columns: clipart, sketch (DomainNet order), Avg., PGR; the paper's value in brackets
    # a cell over fewer seeds than most says so
    assert table_row(t2, "weak")[:4] == ["30.00 ± 0.00 (n=1) [67.15]", "41.00 ± 1.41 [52.26]",
                                         "35.50", "—"]
    # Avg.: weak 35.5, ceiling 65.5. PGR (43.5 - 35.5) / 30; the mean of .125 and .55 would be .34
    # (the paper's Avg. is over six domains: not shown beside an Avg. over two)
    assert table_row(t2, "cpl")[:4] == ["35.00 ± 0.00 (n=1) [73.10]", "52.00 ± 2.83 [64.01]", "43.50",
                                        "0.27"]
    assert table_row(t2, "ce-lp")[2:4] == ["47.50", "0.40"]  # not the mean of .5 and .2
    assert table_row(t2, "Δ (CPL − best baseline)")[:3] == ["-15.00 [2.41]", "+7.00 [3.83]", "-4.00"]
    assert table_row(t2, "kd-tp")[:4] == ["— [69.57]", "— [59.93]", "—", "—"]
    worst = t2[t2.index("Worst-10"):]
    assert table_row(worst, "cpl")[:3] == ["17.50 ± 0.00 (n=1)", "26.00 ± 1.41", "21.75"]
    classes = t2[t2.index("Distinct classes"):]  # round(10 acc) + seed: cpl 4; 5 and 6
    assert table_row(classes, "cpl")[:3] == ["4.00 ± 0.00 (n=1)", "5.50 ± 0.71", "4.75"]
    t3 = (tmp_path / "tables" / "table3.md").read_text()  # clipart by weak model
    assert table_row(t3, "cpl")[:2] == ["35.00 ± 0.00", "33.00 ± 0.00"]
    t4 = (tmp_path / "tables" / "table4.md").read_text()
    assert table_row(t4, "cpl (ensemble init)")[:2] == ["—", "55.00 ± 0.00"]
    csv_rows = (tmp_path / "tables" / "runs.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + sum(map(len, runs.values())) + 2
    fig = (tmp_path / "tables" / "figure2.csv").read_text().splitlines()
    assert fig[0] == "domain,method,epoch,step,seeds,train_acc,train_std,test_acc,test_std"
    assert fig[1].startswith("clipart,cpl,1,3,1,")  # one seed: std 0


def test_pgr_column_and_paper_gap_on_the_papers_own_table2(tmp_path):
    """PAPER's Table 2 cells fed in as results: CPL's PGR is (64.74 - 58.47) / (66.54 - 58.47)
    ≈ 0.78 (a mean of per-domain PGRs says 0.83: real's gap is 0.24 points), every bracket equals
    its cell, and paper_gap.md reads 0 up to the paper's own rounding of Avg. and Δ."""
    paper = report_w2s_clip.PAPER
    for (table, row, col), value in paper.items():
        if table == "table2" and col in w2s_clip.DOMAINS and row != report_w2s_clip.DELTA:
            write_result(tmp_path / "runs", col, row, 0, value / 100, worst=0.1)
    report_w2s_clip.build_tables(tmp_path / "runs", tmp_path / "tables")
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    mean = lambda row: sum(paper[("table2", row, d)] for d in w2s_clip.DOMAINS) / 6
    for row in [r for r in report_w2s_clip.TABLE2_ROWS[1:-1] if r != "zero-shot"]:  # the paper has no zero-shot row
        expected = (mean(row) - mean("weak")) / (mean("ceiling") - mean("weak"))
        assert table_row(t2, row)[7] == f"{expected:.2f}", row
    assert table_row(t2, "cpl")[7] == "0.78" and table_row(t2, "kd-lp")[7] == "0.32"
    for cell in table_row(t2, "cpl")[:6]:
        ours, ref = cell.split(" ± 0.00 ")
        assert f"[{ours}]" == ref
    gap = (tmp_path / "tables" / "paper_gap.md").read_text()
    gap2 = gap[gap.index("### Table 2"):gap.index("### Table 3")]
    for row in [r for r in report_w2s_clip.TABLE2_ROWS if r != "zero-shot"] + [report_w2s_clip.DELTA]:
        cells = table_row(gap2, row)
        assert len(cells) == 7 and all(abs(float(c.split()[0])) <= 0.011 for c in cells if c != "—")
        assert all(c == "+0.00" or c.startswith("+0.00 ± ") for c in cells[:6])
    assert table_row(gap2, "cpl")[0] == "+0.00 ± 0.00" and table_row(gap2, "weak")[6] == "—"
    assert table_row(t2, "cpl")[6] == "64.74 [64.74]"  # six domains: the paper's Avg. beside ours


def test_table3_columns_are_the_papers_five_weak_models_when_run(tmp_path):
    """With hf: runs on clipart, Table 3 is exactly the paper's five columns (resnet18's Table 2
    clipart run left out), each published cell and the Avg. beside ours."""
    out = tmp_path / "runs"
    for method, acc in (("weak", 0.5), ("cpl", 0.7), ("ceiling", 0.8)):
        write_result(out, "clipart", method, 0, acc, worst=0.1)  # Table 2's resnet18
        for i, w in enumerate(report_w2s_clip.PAPER_WEAK_MODELS):
            write_result(out / f"weak-{i}", "clipart", method, 0, acc + i / 100, worst=0.1,
                         weak_model=w)
    report_w2s_clip.build_tables(out, tmp_path / "tables")
    t3 = (tmp_path / "tables" / "table3.md").read_text()
    header = next(line for line in t3.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[1:6] == list(report_w2s_clip.PAPER_WEAK_MODELS)
    assert table_row(t3, "cpl")[:7] == ["70.00 ± 0.00 [72.25]", "71.00 ± 0.00 [71.84]",
                                        "72.00 ± 0.00 [72.06]", "73.00 ± 0.00 [71.91]",
                                        "74.00 ± 0.00 [72.47]", "72.00 [72.11]", "0.67"]


def test_pgr_is_na_when_ceiling_is_not_above_weak_in_box_and_table(tmp_path):
    out = tmp_path / "runs"
    for method, acc in (("weak", 0.60), ("ce-lp", 0.40), ("cpl", 0.55), ("ceiling", 0.50)):
        write_result(out, "sketch", method, 0, acc, worst=0.1)
    box = report_w2s_clip.summary_box(out, "sketch", 0, ["ce-lp", "cpl"])
    for method in ("ce-lp", "cpl"):
        line = next(line for line in box.splitlines() if f"| {method} " in line)
        assert line.split()[-2:] == ["n/a", "|"], box
    report_w2s_clip.build_tables(out, tmp_path / "tables")
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    assert table_row(t2, "ce-lp")[2] == "n/a" and table_row(t2, "cpl")[2] == "n/a"
    write_result(out, "sketch", "ceiling", 0, 0.80, worst=0.1)  # a gap again: numbers again
    assert "n/a" not in report_w2s_clip.summary_box(out, "sketch", 0, ["ce-lp", "cpl"])


def test_paper_gap_on_a_hand_made_grid():
    """ours − paper ± std over seeds; Avg.'s std over the per-seed row averages; Δ on means."""
    rows = [{"method": m, "domain": d, "seed": s, "test_accuracy": a / 100}
            for m, d, accs in (("weak", "sketch", (40, 42)), ("weak", "clipart", (30, 30)),
                               ("cpl", "sketch", (50, 54)), ("cpl", "clipart", (35, 37)),
                               ("ce-lp", "sketch", (45, 45)), ("ce-lp", "clipart", (36, 36)))
            for s, a in enumerate(accs)]
    paper = {("t", "cpl", "sketch"): 50.0, ("t", "cpl", "Avg."): 40.0, ("t", "weak", "sketch"): 45.0,
             ("t", report_w2s_clip.DELTA, "sketch"): 1.0, ("other", "ce-lp", "sketch"): 1.0}
    text = report_w2s_clip.paper_gap("T", "t", ("weak", "ce-lp", "cpl", "ceiling"), ["clipart", "sketch"],
                              rows, "domain", paper)
    # cpl Avg.: (36 + 52) / 2 = 44; per seed (35 + 50) / 2 = 42.5 and (37 + 54) / 2 = 45.5
    assert table_row(text, "cpl") == ["—", "+2.00 ± 2.83", f"+4.00 ± {math.sqrt(4.5):.2f}"]
    assert table_row(text, "weak") == ["—", "-4.00 ± 1.41", "—"]
    assert table_row(text, report_w2s_clip.DELTA) == ["—", "+6.00", "—"]  # (52 - 45) - 1
    with pytest.raises(AssertionError):  # rows without a published cell are left out
        table_row(text, "ce-lp")


def test_demo_tables_small_version_end_to_end(demo, tmp_path):
    """`make demo-tables` in small: every method on one generated domain, a second weak model,
    the ensemble init; then --build-tables writes every row and column from the results alone."""
    data = tmp_path / "data"
    minidomainnet.make_synthetic_domainnet(data, domains=("clipart",), classes=DEMO_NAMES[:3],
                                           n_train=6, n_test=15, size=32)
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = {"--data-root": data, "--domain": "clipart", "--cache-dir": cache}
    for out, extra in ((runs / "t2", {"--method": "all"}),
                       (runs / "t3", {"--method": "cpl", "--weak-model": "test_efficientnet"}),
                       (runs / "ens", {"--method": "cpl"})):
        args = cli_args(demo, data, out, cache, **common, **extra)
        args += ["--prototype-init", "ensemble"] if out.name == "ens" else []
        proc = run_cli(args)
        assert proc.returncode == 0, proc.stderr
    proc = run_cli(["--build-tables", "--out-dir", str(runs), "--tables-dir", str(tmp_path / "tables")])
    assert proc.returncode == 0, proc.stderr
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    for method in report_w2s_clip.TABLE2_ROWS:
        assert "±" in table_row(t2, method)[0], method  # a clipart cell with mean ± std
    for method in report_w2s_clip.TABLE2_ROWS[1:-1]:  # a PGR for every weak-to-strong row
        pgr = table_row(t2, method)[2]
        assert pgr == "n/a" or float(pgr) == float(pgr), pgr
    float(table_row(t2, "Δ (CPL − best baseline)")[0].split()[0])
    classes = t2[t2.index("Distinct classes"):]
    assert 1 <= float(table_row(classes, "cpl")[0].split()[0]) <= 3
    assert (tmp_path / "tables" / "paper_gap.md").exists()
    t3 = (tmp_path / "tables" / "table3.md").read_text()
    assert "test_resnet" in t3 and "test_efficientnet" in t3
    assert all("±" in cell for cell in table_row(t3, "cpl")[:2])
    t4 = (tmp_path / "tables" / "table4.md").read_text()
    for method in ("cpl", "cpl (ensemble init)", "cpl-text"):
        assert "±" in table_row(t4, method)[0], method
    figure = (tmp_path / "tables" / "figure2.csv").read_text()
    assert all(f"\nclipart,{m},2," in figure for m in ("auxconf-tp", "cpl", "auxconf-lp"))


def test_ablation_table_groups_runs_by_the_one_changed_flag(tmp_path, capsys):
    """Hand-made results: a run's variant is every setting (any flag, --lr too) in which it
    differs from the settings most runs share; cells are mean ± std over seeds with the
    difference from the reference cell; a damaged file is named and skipped."""
    import ablations_w2s_clip as ablations
    defaults = json.loads(json.dumps(vars(w2s_clip.parse_args([]))))
    runs = {("paper", "cpl"): [0.50, 0.54], ("paper", "kd-lp"): [0.40, 0.40],
            ("paper", "adaptconf-lp"): [0.2, 0.2], ("clip", "cpl"): [0.30, 0.34],
            ("norm", "kd-lp"): [0.10, 0.20], ("lr", "kd-lp"): [0.3, 0.3]}
    changes = {"paper": {}, "clip": {"cpl_logit_scale": 100.0}, "norm": {"lp_input": "normalized"},
               "lr": {"lr": 0.1}}
    for (variant, method), accs in runs.items():
        for seed, acc in enumerate(accs):
            settings = {**defaults, **changes[variant], "data_root": f"/data/{variant}"}
            store_w2s_clip.atomic_save({"domain": "clipart", "method": method, "seed": seed,
                                  "test_accuracy": acc, "worst10_accuracy": acc,
                                  "config": settings, "settings": settings},
                                 tmp_path / variant / "clipart" / method / f"seed{seed}" / "results.json")
    damaged = tmp_path / "lr" / "clipart" / "cpl" / "seed0" / "results.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"domain": "clipart", "method": "cpl", "seed": 0, "test_accuracy": "0.9"')
    text = ablations.ablation_table(tmp_path)
    assert str(damaged) in capsys.readouterr().err
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:] \
        == ["paper defaults", "--cpl-logit-scale 100.0", "--lp-input normalized", "--lr 0.1"]
    assert table_row(text, "variant") == ["kd-lp", "adaptconf-lp", "cpl"]  # Table 2's order
    assert table_row(text, "paper defaults") == ["40.00 ± 0.00", "20.00 ± 0.00", "52.00 ± 2.83"]
    assert table_row(text, "--cpl-logit-scale 100.0") == ["—", "—", "32.00 ± 2.83 (-20.00)"]
    assert table_row(text, "--lp-input normalized") == ["15.00 ± 7.07 (-25.00)", "—", "—"]
    assert table_row(text, "--lr 0.1") == ["30.00 ± 0.00 (-10.00)", "—", "—"]
    with pytest.raises(w2s_clip.UserError, match="no readable results.json"):
        ablations.ablation_table(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# Damaged state, full disks and odd inputs: one line, nothing lost, nothing half-written
# ------------------------------------------------------------------------------------------------
def main_error(argv, *fragments):
    """w2s_clip.main(argv) in process ends in sys.exit("error: ...") -- exit status 1 with that one
    line on stderr -- naming the fragments; any other exception (a traceback) fails the test."""
    with pytest.raises(SystemExit) as e:
        w2s_clip.main([str(a) for a in argv])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def tree_state(*folders):
    """{path: bytes digest} of every file under the folders (to show that none changed)."""
    return {str(p): store_w2s_clip.file_digest(p) for folder in folders
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def temp_files(*folders):
    return [p for folder in folders for p in Path(folder).rglob("*.tmp")]


@pytest.mark.parametrize("device", ["nonsense", "cuda:x", "cuda:99", "meta"])
def test_cli_error_device_strings(demo, tmp_path, device):
    """A device string torch cannot parse, or a device this build or machine lacks, stops in one
    line before anything is read or written."""
    before = tree_state(demo)
    main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                        **{"--device": device}), f"--device {device}", "--device cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert tree_state(demo) == before


def test_parse_args_seeds_are_what_a_torch_generator_takes(capsys):
    """--seeds takes 0 .. 2**64 - 1 (torch.Generator.manual_seed's range) and refuses the rest
    in one line (exit status 2, argparse's)."""
    top = w2s_clip.parse_args(["--seeds", "0", str(2 ** 64 - 1)]).seeds
    torch.Generator().manual_seed(top[1])  # the truth: torch accepts it
    for bad in ("-1", str(2 ** 64)):
        with pytest.raises(SystemExit) as e:
            w2s_clip.parse_args(["--seeds", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: argument --seeds: ") and bad in err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2 ** 64)  # ... and torch refuses it too


@pytest.mark.parametrize("flag, bad", [("--train-image-cache", "-3"), ("--train-image-cache", "x"),
                                       ("--split-share", "1.5"), ("--cpe-k", "0"),
                                       ("--dataset", "imagenet")])
def test_parse_args_refuses_bad_values_of_the_new_flags_in_one_line(capsys, flag, bad):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args([flag, bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: argument {flag}: ") and len(err.splitlines()) == 1


def test_cache_log_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("W2S_CLIP_CACHE_LOG", str(tmp_path / "no-such-folder" / "log"))
    assert store_w2s_clip.cached(tmp_path / "x.pt", lambda: torch.ones(2)).sum() == 2
    assert "warning: W2S_CLIP_CACHE_LOG" in capsys.readouterr().err


@pytest.mark.parametrize("config", [[1, 2], {"embed_dim": 64}, {**minidomainnet.TINY_CLIP, "embed_dim": "64"},
                                    {**minidomainnet.TINY_CLIP, "vision_cfg": {
                                        **minidomainnet.TINY_CLIP["vision_cfg"], "layers": "two"}},
                                    {**minidomainnet.TINY_CLIP, "text_cfg": {
                                        **minidomainnet.TINY_CLIP["text_cfg"], "no_such_key": 1}}],
                         ids=["list", "missing-keys", "str-embed-dim", "str-layers", "unknown-key"])
def test_cli_error_clip_config_that_is_not_an_open_clip_config(demo, tmp_path, config):
    """A --clip-model JSON that is a list, lacks keys or has wrong types stops before training."""
    bad = tmp_path / "bad-clip.json"
    bad.write_text(json.dumps(config))
    main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                        **{"--clip-model": bad}), f"--clip-model {bad}")
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached


@pytest.mark.parametrize("kind", ["garbage", "truncated", "wrong-shapes", "not-a-state-dict"])
def test_cli_error_clip_checkpoint_not_loadable(demo, tmp_path, kind):
    """A --clip-pretrained file that is not a checkpoint for the config stops before training;
    the matching checkpoint passes the same check."""
    config = str(demo / "tiny-clip.json")
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    torch.save(open_clip.CLIP(**minidomainnet.TINY_CLIP).state_dict(), good)
    checks_w2s_clip.check_clip_files(config, str(good))  # the truth that the check is not too strict
    ckpt = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        ckpt.write_bytes(b"these bytes are not a checkpoint" * 8)
    elif kind == "truncated":
        ckpt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "wrong-shapes":
        torch.save(open_clip.CLIP(**{**minidomainnet.TINY_CLIP, "embed_dim": 32}).state_dict(), ckpt)
    else:
        torch.save([1, 2, 3], ckpt)
    main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                        **{"--clip-pretrained": ckpt}), f"--clip-pretrained {ckpt}")
    assert not (tmp_path / "cache").exists()


def test_cli_error_unwritable_tables_dir_and_make_demo_target(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    write_result(tmp_path / "runs", "sketch", "cpl", 0, 0.5, 0.2)
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", blocker / "t"],
               "--tables-dir", str(blocker / "t"))
    main_error(["--make-demo", blocker / "demo"], "--make-demo", str(blocker / "demo"))
    assert blocker.read_text() == "mine"


def test_cli_error_split_file_not_utf8_names_file_and_line(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    split = data / "sketch_train.txt"
    lines = split.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b".jpg", b"\xe9.jpg")  # a Latin-1 byte on line 5
    split.write_bytes(b"".join(lines))
    before = tree_state(data)
    main_error(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"),
               "sketch_train.txt:5", "UTF-8")
    assert tree_state(data) == before


def test_split_files_with_a_byte_order_mark_read_like_without(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    for split in ("train", "test"):
        path = data / f"sketch_{split}.txt"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    plain, bom = datasets_w2s_clip.load_domain(demo / "data", "sketch"), datasets_w2s_clip.load_domain(data, "sketch")
    for key in ("train_paths", "test_paths", "classnames"):
        assert bom[key] == plain[key], key
    assert torch.equal(bom["train_labels"], plain["train_labels"])


def test_cli_error_image_listed_twice_in_a_split_file(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    split = data / "sketch_train.txt"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines + [lines[7], lines[3], lines[7]]) + "\n")
    main_error(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"),
               "sketch_train.txt", lines[3].split()[0], "3 repeated")


def test_cli_error_images_in_both_train_and_test(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    test_lines = (data / "sketch_test.txt").read_text().splitlines()
    with open(data / "sketch_train.txt", "a") as f:
        f.write("\n".join(test_lines[10:12]) + "\n")
    main_error(cli_args(demo, data, tmp_path / "out", tmp_path / "cache"),
               "2 images", "sketch_train.txt", "sketch_test.txt", test_lines[10].split()[0])


def test_cli_error_decompression_bomb(demo, tmp_path, monkeypatch):
    """PIL's decompression-bomb refusal (its limit lowered so that a 32x32 image trips it) is one
    line naming the first listed image, before any training."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused above 2 x 100 pixels
    first = (demo / "data" / "sketch_train.txt").read_text().split()[0]
    before = tree_state(demo)
    main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache"),
               first, "decompression-bomb")
    assert not list((tmp_path / "cache").glob("weak-*")) and tree_state(demo) == before


def test_cli_full_disk_one_line_no_temporary_file_then_rerun(demo, tmp_path, monkeypatch):
    """A write that fails with ENOSPC half-way (a full disk) ends in 'no space left on <folder>',
    leaves no temporary file; once there is space, the same command finishes."""
    import builtins
    import errno
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if "w" in mode and str(path).endswith(".tmp") else f

    args = cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache")
    monkeypatch.setattr(builtins, "open", full_open)
    main_error(args, "no space left on", str(tmp_path / "cache"))
    monkeypatch.undo()
    assert not temp_files(tmp_path) and not list((tmp_path / "cache").glob("weak-*"))
    w2s_clip.main([str(a) for a in args])
    assert (tmp_path / "out" / "sketch" / "cpl" / "seed0" / "results.json").exists()
    assert not temp_files(tmp_path)


def test_atomic_save_removes_its_temporary_file_and_stale_ones(tmp_path, monkeypatch):
    """torch.save raising OSError(ENOSPC) leaves no temporary file and says 'no space'; stale
    temporary files of dead processes are removed, those of live ones and other files kept."""
    import errno
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".feats.pt.{dead}.tmp"
    live = tmp_path / f".feats.pt.{os.getppid()}.tmp"  # pytest's parent is alive
    mine = tmp_path / ".notes.tmp"
    for p in (stale, live, mine):
        p.write_bytes(b"partial")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(w2s_clip.UserError, match=f"no space left on {tmp_path}"):
        store_w2s_clip.atomic_save({"x": torch.zeros(3)}, tmp_path / "feats.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])
    monkeypatch.undo()
    store_w2s_clip.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])


def test_cli_rerun_after_damaged_caches_equals_an_undamaged_run(demo, tmp_path, capsys):
    """Every cache file truncated (a full disk, a killed copy): the next command names each one in
    a warning, recomputes it, and its result equals that of a run in fresh folders."""
    args = lambda tag, method: cli_args(demo, demo / "data", tmp_path / tag / "out",
                                        tmp_path / tag / "cache", **{"--method": method})
    w2s_clip.main(args("damaged", "weak"))
    w2s_clip.main(args("damaged", "ce-lp"))  # the CLIP features are cached too
    damaged = sorted(p for p in (tmp_path / "damaged" / "cache").glob("*.pt")
                     if not p.name.startswith("pixels-"))
    assert len(damaged) == 3  # weak model, weak logits, CLIP features
    (pixels,) = (tmp_path / "damaged" / "cache").glob("pixels-*.u8")  # the weak model's eval crops
    for p in damaged + [pixels]:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    capsys.readouterr()
    w2s_clip.main(args("damaged", "cpl"))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for p in damaged:
        assert f"warning: cache file {p} cannot be loaded" in err, p.name
        torch.load(p, weights_only=True)  # rewritten whole
    assert f"warning: cache file {pixels} is incomplete or damaged" in err
    w2s_clip.main(args("clean", "cpl"))
    result = Path("sketch/cpl/seed0/results.json")
    redone, clean = (json.loads((tmp_path / t / "out" / result).read_text()) for t in ("damaged", "clean"))
    for key in ("test_accuracy", "per_class_accuracy", "weak_test_accuracy", "best_epoch", "curves"):
        assert redone[key] == clean[key], key


def test_cli_truncated_results_json_is_named_and_redone(demo, tmp_path, capsys):
    """A truncated results.json: the same command names it and redoes the run (equal to the first
    result); --build-tables names and skips such a file; another setting is named when it differs."""
    args = cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache")
    w2s_clip.main(args)
    path = tmp_path / "out" / "sketch" / "cpl" / "seed0" / "results.json"
    first = json.loads(path.read_text())
    assert first["settings"]["tau"] == 1.0 and first["settings_key"] == store_w2s_clip.settings_key(
        first["settings"])
    path.write_text(path.read_text()[:200])
    capsys.readouterr()
    w2s_clip.main(args)
    assert f"warning: {path} cannot be read" in capsys.readouterr().err
    redone = json.loads(path.read_text())
    for key in ("test_accuracy", "per_class_accuracy", "curves", "settings"):
        assert redone[key] == first[key], key
    msg = main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                              **{"--tau": "0.5", "--lr": "0.1"}), str(path), "other settings")
    assert "other settings (lr: 0.01 -> 0.1, tau: 1.0 -> 0.5);" in msg  # those two, nothing else
    weak = tmp_path / "out" / "sketch" / "weak" / "seed0" / "results.json"
    weak.parent.mkdir(parents=True)
    weak.write_text('{"domain": "sketch", "meth')
    w2s_clip.main(["--build-tables", "--out-dir", str(tmp_path / "out"),
                   "--tables-dir", str(tmp_path / "tables")])
    assert f"warning: {weak} cannot be read" in capsys.readouterr().err
    assert table_row((tmp_path / "tables" / "table2.md").read_text(), "cpl")[0].startswith(
        f"{100 * first['test_accuracy']:.2f} ± ")


def test_run_settings_relative_and_absolute_paths_are_one_setting(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(demo)
    args = lambda config, data: w2s_clip.parse_args(["--data-root", data, "--clip-model", config,
                                                     "--clip-pretrained", "none"])
    data = {"digest": "d1"}
    relative = store_w2s_clip.run_settings(args("tiny-clip.json", "data"), data, "cpu")
    absolute = store_w2s_clip.run_settings(args(str(demo / "tiny-clip.json"), str(demo / "data")), data, "cpu")
    assert relative == absolute and relative["clip_model"] == os.path.realpath(demo / "tiny-clip.json")
    assert store_w2s_clip.settings_key(relative) == store_w2s_clip.settings_key(json.loads(json.dumps(absolute)))


def test_tables_list_every_method_found_in_the_results(tmp_path):
    """A method w2s_clip.py does not know (a loss added in a copy of it) is a row of Table 2 after
    the paper's rows and before the ceiling; its results are read like any other."""
    for method, acc in (("weak", 0.4), ("cpl", 0.5), ("skl-lp", 0.55), ("ceiling", 0.7)):
        write_result(tmp_path / "runs", "sketch", method, 0, acc, acc / 2)
    w2s_clip.main(["--build-tables", "--out-dir", str(tmp_path / "runs"), "--tables-dir",
                   str(tmp_path / "t")])
    text = (tmp_path / "t" / "table2.md").read_text()
    names = [line.split("|")[1].strip() for line in text.split("\n\n")[1].splitlines()[2:]]
    assert names.index("cpl") < names.index("skl-lp") < names.index("ceiling")
    assert table_row(text, "skl-lp")[0].startswith("55.00")


def test_a_result_is_stale_only_when_a_setting_it_depends_on_changes():
    """Another loss's hyperparameter or grid, the text tower's lr outside cpl-text and the head's lr
    for the weak model leave a result valid; its own ones do not; a flag missing from an older
    file counts at its default (valid while the new run keeps that default)."""
    args = w2s_clip.parse_args([])
    base = json.loads(json.dumps({k: v for k, v in vars(args).items()
                                  if k not in store_w2s_clip.RUN_FLAGS}, default=str))
    key = store_w2s_clip.settings_key

    def stale(method, **change):
        return key(base, method) != key({**base, **change}, method)
    assert not stale("kd-lp", tau_grid=[0.1]) and stale("cpl", tau_grid=[0.1])
    assert not stale("cpl", kd_temperature=2.0) and stale("kd-lp", kd_temperature=2.0)
    assert stale("adaptconf-tp", kd_temperature=2.0) and not stale("auxconf-lp", kd_temperature=2.0)
    assert stale("auxconf-tp", aux_alpha_grid=[0.5]) and not stale("ce-lp", aux_alpha_grid=[0.5])
    assert not stale("cpl", text_lr=1e-4) and stale("cpl-text", text_lr=1e-4)
    assert not stale("cpl", ceiling_data="hold-train") and stale("ceiling", ceiling_data="hold-train")
    assert not stale("weak", lr=0.5, tau=0.1) and stale("weak", weak_lr=0.5) and stale("cpl", lr=0.5)
    older = {k: v for k, v in base.items() if k != "cpl_kl"}  # made before --cpl-kl existed
    assert key(older, "cpl") == key(base, "cpl") != key({**base, "cpl_kl": "printed"}, "cpl")
    assert "cpl_kl: summand -> printed" == store_w2s_clip.describe_difference(
        older, {**base, "cpl_kl": "printed"}, method="cpl")


def test_copied_functions_run_alone_with_the_papers_defaults(clip):
    """PrototypeHead, cpl_loss, text_prototypes and train_head copied into a fresh namespace with
    the definitions they use (at most four more, none of them the packed text path or the CLI's)
    give CPL's prototypes as open_clip's own encode_text and train exactly as w2s_clip does; their
    defaults are the command line's."""
    import ast
    source = (HERE / "w2s_clip.py").read_text()
    defs = {n.name if hasattr(n, "name") else n.targets[0].id: ast.get_source_segment(source, n)
            for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            or (isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name))}
    wanted, todo = [], ["PrototypeHead", "cpl_loss", "text_prototypes", "train_head"]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.append(name)
            todo += [m for m in re.findall(r"[A-Za-z_]\w*", defs[name]) if m in defs and m != name]
    extra = sorted(set(wanted) - {"PrototypeHead", "cpl_loss", "text_prototypes", "train_head"})
    assert len(extra) <= 4 and not {"TextTower", "UserError", "parse_args"} & set(extra), extra
    space = {}
    exec("import math, sys\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
         "from tqdm import tqdm\n" + "\n\n".join(
             ("@torch.no_grad()\n" if name in ("text_prototypes", "predict") else "") + defs[name]
             for name in extra + ["PrototypeHead", "cpl_loss", "text_prototypes", "train_head"]),
         space)
    model, tok = clip
    protos = space["text_prototypes"](model, tok, PROMPT_NAMES)
    with torch.no_grad():
        ref = model.encode_text(tok([f"a photo of a {n}" for n in PROMPT_NAMES]), normalize=False)
    torch.testing.assert_close(protos, ref)
    g = torch.Generator().manual_seed(0)
    x, weak = torch.randn(40, 64, generator=g), 3 * torch.randn(40, len(PROMPT_NAMES), generator=g)
    heads = []
    for ns in (space, vars(w2s_clip)):
        head = ns["PrototypeHead"](protos)
        ns["train_head"](head, functools.partial(ns["cpl_loss"], tau=0.5), x[:30], weak[:30], x[30:],
                         weak[30:], epochs=3, batch_size=8)
        heads.append(head.prototypes.detach())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], protos)
    args = w2s_clip.parse_args([])
    defaults = lambda fn: {k: p.default for k, p in inspect.signature(fn).parameters.items()}  # noqa: E731
    th = defaults(w2s_clip.train_head)
    assert (th["epochs"], th["batch_size"], th["lr"], th["warmup_ratio"], th["weight_decay"],
            th["max_grad_norm"], th["select_by"], th["lr_schedule"]) == (
        args.strong_epochs, args.batch_size, args.lr, args.warmup_ratio, args.weight_decay,
        args.max_grad_norm, args.select_by, w2s_clip.SCHEDULES[args.lr_schedule])
    assert th["start_candidate"] == (args.select_from == "start-and-epochs")
    assert defaults(w2s_clip.cpl_loss) == {"strong_logits": inspect.Parameter.empty,
                                           "weak_logits": inspect.Parameter.empty,
                                           "tau": args.tau, "direction": args.cpl_kl}
    tp = defaults(w2s_clip.text_prototypes)
    assert tp["templates"] == (args.prompt_template,) and tp["normalize"] == (args.prototype_norm == "unit")
    for head in (w2s_clip.PrototypeHead, w2s_clip.TextEncoderHead):
        assert defaults(head.__init__)["logit_scale"] == args.cpl_logit_scale
    assert defaults(w2s_clip.TextEncoderHead.__init__)["template"] == args.prompt_template
    for loss, (fn, kwargs) in w2s_clip.LOSSES.items():
        for keyword, hyper in kwargs.items():
            assert defaults(fn)[keyword] == getattr(args, hyper), (loss, keyword)


def write_result_with_settings(out, domain, method, seed, acc, settings):
    write_result(out, domain, method, seed, acc, acc / 2)
    path = Path(out) / domain / method / f"seed{seed}" / "results.json"
    store_w2s_clip.atomic_save({**json.loads(path.read_text()), "settings": settings}, path)


def test_summary_box_and_tables_use_only_runs_with_matching_settings(tmp_path, capsys):
    """A folder with runs of two settings: the box and each table cell use only those that
    match (the most common, for the tables) and say how many were left out and which settings
    differ; a different domain or weak model is a table axis, not a different setting, and a
    setting the run does not depend on (CPL's tau for ce-lp) is no difference at all."""
    a = {"tau": 1.0, "lr": 0.01, "domain": "sketch", "weak_model": "resnet18", "splits": "s1"}
    b = {**a, "lr": 0.02}
    out = tmp_path / "runs"
    for seed in (0, 1):
        write_result_with_settings(out, "sketch", "weak", seed, 0.40, a)
        write_result_with_settings(out, "sketch", "ceiling", seed, 0.60, a)
        write_result_with_settings(out, "sketch", "cpl", seed, 0.50, a)
        write_result_with_settings(out, "clipart", "cpl", seed, 0.30,
                                   {**a, "domain": "clipart", "splits": "s2"})
    write_result_with_settings(out, "sketch", "cpl", 2, 0.99, b)
    write_result_with_settings(out, "sketch", "ce-lp", 0, 0.45, b)
    write_result_with_settings(out, "sketch", "ce-lp", 1, 0.55, {**a, "tau": 0.5})
    box = report_w2s_clip.summary_box(out, "sketch", 0, ["ce-lp", "cpl"], a)
    assert "ce-lp" not in box.split("left out")[0] and "cpl" in box and "weak" in box
    assert "left out of the box" in box and "ce-lp (lr: 0.02 -> 0.01)" in box
    box = report_w2s_clip.summary_box(out, "sketch", 1, ["ce-lp", "cpl"], a)
    assert "| ce-lp            55.00" in box and "left out" not in box
    capsys.readouterr()
    report_w2s_clip.build_tables(out, tmp_path / "tables")
    note = capsys.readouterr().out
    assert "2 runs made with other settings" in note and "without a label have lr=0.01" in note
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    cells = [c.split(" [")[0] for c in table_row(t2, "cpl")[:2]]  # without the paper's value
    assert cells == ["30.00 ± 0.00", "50.00 ± 0.00"]  # not 0.99: that run is a row of its own
    assert [c.split(" [")[0] for c in table_row(t2, "ce-lp")[:2]] == ["—", "55.00 ± 0.00 (n=1)"]
    assert table_row(t2, "cpl (lr=0.02)")[:2] == ["—", "99.00 ± 0.00 (n=1)"]
    assert table_row(t2, "ce-lp (lr=0.02)")[:2] == ["—", "45.00 ± 0.00 (n=1)"]


def test_image_stats_digest_notices_replaced_images(demo, tmp_path):
    """The data key moves when an image is rewritten (size) or touched (mtime), not otherwise."""
    data = corrupt_copy(demo, tmp_path)
    paths = datasets_w2s_clip.read_split_file(data / "sketch_test.txt")[0]
    base = store_w2s_clip.image_stats_digest(data, paths)
    assert store_w2s_clip.image_stats_digest(data, paths) == base
    image = data / paths[3]
    image.write_bytes(image.read_bytes() + b"\0")
    grown = store_w2s_clip.image_stats_digest(data, paths)
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert len({base, grown, store_w2s_clip.image_stats_digest(data, paths)}) == 3


def test_make_clean_keeps_caches_runs_results_data_and_tables_installs_nothing():
    """make's own dry run: `clean` removes the demo's and the tests' outputs only; `tables`
    runs no pip (matplotlib comes from requirements.txt)."""
    dry = lambda target: subprocess.run(["make", "-n", "-o", "venv", "-o", ".venv/.installed",
                                         target], cwd=HERE, capture_output=True, text=True).stdout
    removed = [w for line in dry("clean").splitlines() if line.startswith("rm ") for w in line.split()[2:]]
    assert removed and not {"cache", "runs", "results", "data", "data/domainnet"} & set(removed)
    assert "pip" not in dry("tables")
    assert any(line.startswith("matplotlib==") for line in (HERE / "requirements.txt").read_text().splitlines())


def test_cli_build_tables_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    write_result(tmp_path / "runs", "sketch", "cpl", 0, 0.5, 0.2)

    import builtins
    real_open = builtins.open

    def full_open(path, mode="r", *a, **k):  # the folder's write probe passes, the tables fail
        if "w" in mode and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", full_open)
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", tmp_path / "t"],
               f"no space left on {tmp_path / 't'}")
    monkeypatch.undo()
    assert not temp_files(tmp_path) and not list((tmp_path / "t").iterdir())  # nothing half-written

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)  # now the probe fails too
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", tmp_path / "u"],
               "--tables-dir", f"no space left on {tmp_path / 'u'}")


# ------------------------------------------------------------------------------------------------
# Numbers that make sense, writes that cannot lose a run, and no traceback (reliability)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--lr", "inf"], ["--weak-lr=-inf"],
                                  ["--tau", "nan"], ["--cpl-logit-scale", "nan"],
                                  ["--max-grad-norm", "inf"], ["--weight-decay", "nan"],
                                  ["--warmup-ratio", "nan"], ["--aux-alpha", "nan"],
                                  ["--tau-grid", "0.1", "nan"], ["--text-lr-grid", "inf"]])
def test_parse_args_refuses_nan_and_infinity(argv, capsys):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and argv[0].split("=")[0] in err and len(err.splitlines()) == 1, err
    assert "finite" in err


def test_train_head_stops_on_a_non_finite_loss():
    torch.manual_seed(0)
    x, targets = torch.randn(16, 4), torch.randn(16, 3)
    targets[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        w2s_clip.train_head(w2s_clip.LinearHead(4, 3), functools.partial(w2s_clip.kd_loss, T=1.0),
                            x, targets, x, torch.randn(16, 3), epochs=2, batch_size=16, lr=0.1)


def test_train_head_warns_when_no_step_had_a_positive_learning_rate():
    """One step, all warm-up: its lr is 0 (step / warm-up steps), so the head never moves; the fit
    says so. With two epochs the second step has a positive lr and there is no warning."""
    torch.manual_seed(0)
    x, targets = torch.randn(16, 4), torch.randn(16, 3)
    head = w2s_clip.LinearHead(4, 3)
    start = copy.deepcopy(head.state_dict())
    fit = w2s_clip.train_head(head, functools.partial(w2s_clip.kd_loss, T=1.0), x, targets, x,
                              targets, epochs=1, batch_size=16, lr=0.1, warmup_ratio=1.0)
    assert len(fit["warnings"]) == 1 and "positive learning rate" in fit["warnings"][0]
    assert all(torch.equal(v, head.state_dict()[n]) for n, v in start.items())
    fit = w2s_clip.train_head(w2s_clip.LinearHead(4, 3), functools.partial(w2s_clip.kd_loss, T=1.0),
                              x, targets, x, targets, epochs=2, batch_size=16, lr=0.1,
                              warmup_ratio=0.5)
    assert fit["warnings"] == []


def test_cli_non_finite_loss_is_one_line_naming_method_epoch_and_flag(demo, tmp_path):
    out = tmp_path / "runs"
    proc = run_cli(cli_args(demo, demo / "data", out, tmp_path / "cache", **{
        "--method": "kd-lp", "--lr": "1e38", "--tune": "none"}))
    assert_user_error(proc, out, "kd-lp", "epoch", "--lr")


def test_cli_untrained_head_warning_is_printed_and_recorded(demo, tmp_path):
    """--strong-epochs 1 with one batch and --warmup-ratio 1: the only step has lr 0."""
    out = tmp_path / "runs"
    proc = run_cli(cli_args(demo, demo / "data", out, tmp_path / "cache", **{
        "--method": "kd-lp", "--strong-epochs": "1", "--batch-size": "512", "--warmup-ratio": "1",
        "--tune": "none"}))
    assert proc.returncode == 0, proc.stderr
    assert "warning: sketch seed 0 kd-lp: none of the 1 optimiser steps" in proc.stderr
    r = json.loads((out / "sketch" / "kd-lp" / "seed0" / "results.json").read_text())
    assert len(r["warnings"]) == 1 and r["curves"][1]["val_loss"] == r["curves"][0]["val_loss"]


def test_cli_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(demo, tmp_path):
    """SIGINT after the first finished run: exit status 130, one line, no traceback; the same
    command then finishes the rest."""
    import signal
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = cli_args(demo, demo / "data", out, cache, **{
        "--method": ["weak", "kd-lp", "kd-tp", "cpl", "ceiling"], "--seeds": ["0", "1", "2"]})
    proc = subprocess.Popen([sys.executable, "w2s_clip.py", *args], cwd=HERE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,  # as from a terminal: a job started in the
                            # background of a script inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # the device line, then the first finished run
    while first and "D'_test" not in first:
        first = proc.stdout.readline()
    assert "D'_test" in first, first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted; rerun the same command to resume"], err
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    assert len(list(out.rglob("results.json"))) == 15


def test_cli_error_data_root_is_a_file(demo, tmp_path):
    out = tmp_path / "runs"
    proc = run_cli(cli_args(demo, demo / "data" / "sketch_train.txt", out, tmp_path / "cache"))
    assert_user_error(proc, out, "is a file, not a folder", "sketch_train.txt")


def test_cli_error_label_too_large_for_int64(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    lines = (data / "sketch_train.txt").read_text().splitlines()
    path, _ = lines[2].rsplit(None, 1)
    lines[2] = f"{path} {2 ** 70}"
    (data / "sketch_train.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "runs"
    proc = run_cli(cli_args(demo, data, out, tmp_path / "cache"))
    assert_user_error(proc, out, "sketch_train.txt:3", "far too large")


def test_bench_error_device_nonsense_is_one_line():
    proc = subprocess.run([sys.executable, "bench_w2s_clip.py", "--device", "nonsense"], cwd=HERE,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "--device nonsense" in lines[0], proc.stderr


def test_make_demo_refuses_a_data_folder_that_is_a_symlink(tmp_path):
    """A user's dataset linked in as DIR/data is never written into nor deleted."""
    mine = tmp_path / "my-dataset"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / minidomainnet.MANIFEST).write_text(json.dumps({"written_by": "minidomainnet"}))
    (folder / "data").symlink_to(mine)
    main_error(["--make-demo", folder], "symbolic link", str(folder / "data"))
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


def test_a_result_written_meanwhile_with_other_settings_is_kept(demo, tmp_path, monkeypatch):
    """Another command writes the same cell, with other settings, while this one trains: at its
    write this one sees it (under the lock), keeps it and stops with one line naming both."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    path = out / "sketch" / "cpl" / "seed0" / "results.json"
    foreign = {"domain": "sketch", "method": "cpl", "seed": 0, "test_accuracy": 0.5,
               "worst10_accuracy": 0.5, "config": {"weak_model": "x", "clip_model": "y"},
               "settings": {"lr": 123.0}}
    real = w2s_clip.run_method

    def concurrent(method, *a, **k):
        result = real(method, *a, **k)
        if method == "cpl":
            store_w2s_clip.atomic_save(foreign, path)
        return result
    monkeypatch.setattr(w2s_clip, "run_method", concurrent)
    main_error(cli_args(demo, demo / "data", out, cache, **{"--tune": "none"}),
               str(path), "another command", "lr: 123.0 -> 0.01")
    assert json.loads(path.read_text()) == foreign


def test_tables_are_written_as_a_set_or_not_at_all(tmp_path, monkeypatch):
    """A failure while the tables are written replaces none of the earlier ones and leaves no
    temporary file; a figure the new build does not make is removed rather than left stale; a
    user's own file in the folder is left alone."""
    out, tables = tmp_path / "runs", tmp_path / "tables"
    write_result(out, "sketch", "cpl", 0, 0.5, 0.2)
    w2s_clip.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tables)])
    assert (tables / "figure2.csv").exists()
    (tables / "mine.md").write_text("a user's file")
    before = tree_state(tables)
    write_result(out, "sketch", "kd-lp", 0, 0.25, 0.1)
    real, calls = store_w2s_clip.atomic_save, []

    def fail_third(obj, path):
        calls.append(path)
        if len(calls) == 3:
            raise w2s_clip.UserError(f"no space left on {tables}")
        return real(obj, path)
    monkeypatch.setattr(report_w2s_clip, "atomic_save", fail_third)  # as save_together calls it
    main_error(["--build-tables", "--out-dir", out, "--tables-dir", tables], "no space left")
    assert tree_state(tables) == before and not temp_files(tables)
    monkeypatch.undo()
    for path in out.rglob("results.json"):  # results without curves: no Figure 2
        r = json.loads(path.read_text())
        store_w2s_clip.atomic_save({**r, "curves": []}, path)
    w2s_clip.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tables)])
    assert "kd-lp" in (tables / "table2.md").read_text()
    assert not (tables / "figure2.csv").exists() and not (tables / "figure2.png").exists()
    assert (tables / "mine.md").read_text() == "a user's file"


# ------------------------------------------------------------------------------------------------
# One results reader for every table: what is combined, what is left out (and named)
# ------------------------------------------------------------------------------------------------
def good_result(method="cpl", seed=0, acc=0.5, domain="sketch", **settings):
    """A results.json dict as the run command writes it, with a settings dict (flags overridden
    by `settings`)."""
    s = {**json.loads(json.dumps(vars(w2s_clip.parse_args([])))), "splits": "abc",
         "data_root": "/data", **settings}
    return {"domain": domain, "method": method, "seed": seed, "test_accuracy": acc,
            "worst10_accuracy": acc / 2, "curves": [], "config": s, "settings": s,
            "settings_key": store_w2s_clip.settings_key(s)}


def put(out, r, sub=""):
    path = store_w2s_clip.result_path(Path(out) / sub, r["domain"], r["method"], r["seed"])
    store_w2s_clip.atomic_save(r, path)
    return path


def test_weak_runs_of_other_weak_models_and_cpe_runs_are_table_axes_not_variants(tmp_path, capsys):
    """Table 3's layout (one folder per weak model) and Table 4's CPE runs (with --cpe-k): every
    weak model keeps its weak row, and CPE's flags make no variant rows."""
    out = tmp_path / "runs"
    for seed in (0, 1):
        for weak_model, acc in (("resnet18", 0.4), ("resnet34", 0.6)):
            sub = "" if weak_model == "resnet18" else f"weak-{weak_model}"
            put(out, good_result("weak", seed, acc, domain="clipart", weak_model=weak_model), sub)
            put(out, good_result("cpl", seed, acc + 0.1, domain="clipart", weak_model=weak_model), sub)
        put(out, good_result("cpl", seed, 0.8, domain="clipart", prototype_init="cpe", cpe_k=10),
            "cpe-init")
    report_w2s_clip.build_tables(out, tmp_path / "t")
    printed = capsys.readouterr().out
    assert "rows of their own" not in printed and "counted once" not in printed
    t3 = (tmp_path / "t" / "table3.md").read_text()
    assert table_row(t3, "weak")[:2] == ["40.00 ± 0.00", "60.00 ± 0.00"]
    assert table_row((tmp_path / "t" / "table4.md").read_text(), "cpl (cpe init)")[0] == "80.00 ± 0.00"


@pytest.mark.parametrize("edit", [
    {"test_accuracy": "0.5"}, {"test_accuracy": None}, {"test_accuracy": 50.0},
    {"test_accuracy": float("nan")}, {"seed": "0"}, {"seed": -1}, {"method": ""}, {"method": 3},
    {"domain": ""}, {"curves": {"epoch": 1}}, {"curves": [1, 2]}, {"curves": [{"epoch": 1}]},
    {"curves": None}, {"config": "flags"}, {"settings": 3}, {"n_predicted_classes": "ten"},
    {"worst10_accuracy": True}, {"agreement_with_weak": 2.0}, {"predictions": "0 1"},
    {"predictions": [0, 1], "d_test_index": [3], "d_test_labels": [1]}])
def test_a_hand_edited_results_json_is_named_and_skipped_by_tables_and_box(tmp_path, capsys, edit):
    """Each damaged file is named with its reason and left out of the tables and the box; the
    good runs beside it are still combined; no traceback."""
    out = tmp_path / "runs"
    put(out, good_result("weak", acc=0.4))
    put(out, good_result("ceiling", acc=0.8))
    bad = store_w2s_clip.result_path(out, "sketch", "cpl", 0)  # where the box looks for it
    store_w2s_clip.atomic_save({**good_result("cpl"), **edit}, bad)
    w2s_clip.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert f"warning: {bad} cannot be read as a results file" in err, err
    assert table_row((tmp_path / "t" / "table2.md").read_text(), "cpl")[0] == "— [64.01]"
    box = report_w2s_clip.summary_box(out, "sketch", 0, ["cpl"])
    assert "cpl" not in box.split("PGR", 1)[1] and "weak" in box and str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'{"a": 1}'])
def test_unreadable_results_files_are_skipped(tmp_path, capsys, content):
    out = tmp_path / "runs"
    put(out, good_result("weak", acc=0.4))
    bad = store_w2s_clip.result_path(out, "sketch", "cpl", 0)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    rows = report_w2s_clip.load_results(out)
    assert [r["method"] for r in rows] == ["weak"] and str(bad) in capsys.readouterr().err


def test_results_with_extra_keys_are_read():
    r = {**good_result(), "a_key_of_a_later_version": [1, 2, 3]}
    assert store_w2s_clip.result_problems(r) == []


def test_split_files_changed_between_seeds_are_not_averaged_in_one_cell(tmp_path, capsys):
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5 + seed / 10))
    put(out, good_result("cpl", 2, 0.9, splits="edited"))
    report_w2s_clip.build_tables(out, tmp_path / "t")
    printed = capsys.readouterr().out
    assert "left out 1 runs of sketch made with other split files" in printed, printed
    assert table_row((tmp_path / "t" / "table2.md").read_text(), "cpl")[0] == "55.00 ± 7.07 [64.01]"


def test_one_clip_config_typed_two_ways_is_one_setting_to_the_tables(tmp_path):
    """The settings hold the real path; the tables group on it, not on the typed string."""
    out = tmp_path / "runs"
    real = str(tmp_path / "cfg" / "tiny.json")
    for seed, typed in ((0, "cfg/tiny.json"), (1, "tiny.json")):
        r = good_result("cpl", seed, 0.5 + seed / 10, clip_model=real)
        r["config"] = {**r["config"], "clip_model": typed}
        put(out, r)
    rows = report_w2s_clip.load_results(out)
    assert {r["clip_model"] for r in rows} == {real}
    report_w2s_clip.build_tables(out, tmp_path / "t")
    text = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(text, "cpl")[0] == "55.00 ± 7.07 [64.01]" and "tiny.json with weak model" in text
    assert str(tmp_path) not in text.splitlines()[0]  # the title names the file, not the path


@pytest.mark.parametrize("other, note", [
    ({"clip_model": "ViT-L-14"}, "left out 1 runs of other CLIP models than the 2 of ViT-B-32 (ViT-L-14)"),
    ({"tune": "none"}, "rows of their own, named by what differs (the rows without a label have "
                       "tune=hold-val)")])
def test_runs_left_out_of_the_tables_are_named_with_what_differs(tmp_path, capsys, other, note):
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed))
    put(out, good_result("kd-lp", 0, **other), "other")
    report_w2s_clip.build_tables(out, tmp_path / "t")
    assert note in capsys.readouterr().out


def test_make_tables_over_a_folder_that_holds_the_ablations(tmp_path, capsys):
    """After `make ablations` into OUT: OUT/ablations/paper repeats the main grid's runs (same
    settings: counted once, named) and the variants differ in a flag (left out, named); Table 2
    is built from the main grid."""
    out = tmp_path / "runs"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5))
        put(out, good_result("kd-lp", seed, 0.4))
        put(out, good_result("cpl", seed, 0.5), "ablations/paper")
        put(out, good_result("cpl", seed, 0.9, cpl_kl="printed"), "ablations/cpl-kl=printed")
    w2s_clip.main(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    printed = capsys.readouterr().out
    assert printed.count("(same settings); counted once") == 2
    assert "2 runs made with other settings" in printed and "cpl_kl=summand" in printed
    t2 = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(t2, "cpl")[0] == "50.00 ± 0.00 [64.01]"
    assert table_row(t2, "cpl (cpl_kl=printed)")[0] == "90.00 ± 0.00"


def test_ablation_reference_other_than_the_papers_defaults_is_said(tmp_path):
    import ablations_w2s_clip as ablations
    out = tmp_path / "abl"
    for seed in (0, 1):
        put(out, good_result("cpl", seed, 0.5, batch_size=32), "paper")
        put(out, good_result("cpl", seed, 0.7, batch_size=32, tune="none"), "tune=none")
        put(out, good_result("cpl", seed, 0.6, batch_size=32, domain="clipart"), "paper")
    text = ablations.ablation_table(out)
    assert "reference: the paper's defaults but --batch-size 32" in text
    assert table_row(text, "--tune none") == ["70.00 ± 0.00 (+20.00)"]
    assert text.index("### clipart") < text.index("### sketch")  # DomainNet's order, two sections


def test_pretraining_table_rows_per_domain_and_settings(tmp_path, capsys):
    """Two domains under one label are two rows, never averaged; runs of other settings in a
    folder are named and kept out of the row (a better variant of kd-lp does not become the best
    baseline)."""
    out = tmp_path / "pt"
    for domain, acc in (("sketch", 0.6), ("clipart", 0.2)):
        for method, a in (("weak", 0.4), ("ceiling", 0.9), ("cpl", acc), ("kd-lp", 0.5)):
            put(out, good_result(method, 0, a, domain=domain))
    put(out, good_result("cpl", 1, 0.99, lr=0.5))
    put(out, good_result("kd-lp", 1, 0.95, lr=0.5))
    text = minidomainnet.pretraining_table([("300 steps", out)], tmp_path / "t")
    assert table_row(text, "300 steps (clipart)")[3:5] == ["kd-lp 50.00", "20.00"]
    assert table_row(text, "300 steps (sketch)")[3:5] == ["kd-lp 50.00", "60.00"]
    assert "rows of their own" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--out-dir", "--cache-dir"])
def test_cli_error_output_folder_is_a_file(demo, tmp_path, flag):
    target = tmp_path / "a-file"
    target.write_text("x")
    out = tmp_path / "runs" if flag != "--out-dir" else target
    main_error(cli_args(demo, demo / "data", tmp_path / "runs", tmp_path / "cache", **{flag: target}),
               flag, "is a file, not a folder")


def test_cli_error_build_tables_paths_that_are_files(tmp_path):
    f = tmp_path / "results.json"
    store_w2s_clip.atomic_save(good_result(), f)
    main_error(["--build-tables", "--out-dir", f, "--tables-dir", tmp_path / "t"],
               "--out-dir", "is a file, not a folder")
    put(tmp_path / "runs", good_result())
    main_error(["--build-tables", "--out-dir", tmp_path / "runs", "--tables-dir", f],
               "--tables-dir", "is a file, not a folder")
    main_error(["--build-tables", "--out-dir", tmp_path / "nothing-here", "--tables-dir",
                tmp_path / "t"], "no readable results.json")


def test_stale_temporary_table_files_of_a_killed_build_are_removed(tmp_path):
    put(tmp_path / "runs", good_result())
    tables = tmp_path / "t"
    tables.mkdir()
    stale = tables / ".table2.md.999999999.tmp"  # no such process
    stale.write_text("half")
    report_w2s_clip.build_tables(tmp_path / "runs", tables)
    assert not stale.exists() and (tables / "table2.md").exists()


def test_tables_of_weak_runs_only(tmp_path):
    put(tmp_path / "runs", good_result("weak", acc=0.3))
    report_w2s_clip.build_tables(tmp_path / "runs", tmp_path / "t")
    t2 = (tmp_path / "t" / "table2.md").read_text()
    assert table_row(t2, "weak")[0] == "30.00 ± 0.00 [52.26]" and table_row(t2, "cpl")[0] == "— [64.01]"


@pytest.mark.parametrize("argv", [["--tau-grid"], ["--aux-alpha-grid", "1.5"],
                                  ["--text-lr-grid", "0"], ["--kd-temperature-grid", "-1"],
                                  ["--tune", "sometimes"], ["--cpl-kl", "both"]])
def test_parse_args_refuses_bad_grids_and_choices_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and argv[0] in err and len(err.splitlines()) == 1, err


def test_a_leftover_lock_file_does_not_block_a_rerun(demo, tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    lock = store_w2s_clip.result_path(out, "sketch", "weak", 0).with_name(".results.json.lock")
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    proc = run_cli(cli_args(demo, demo / "data", out, cache, **{"--method": "weak"}))
    assert proc.returncode == 0, proc.stderr
    assert store_w2s_clip.result_path(out, "sketch", "weak", 0).exists()
    tables = run_cli(["--build-tables", "--out-dir", str(out), "--tables-dir", str(tmp_path / "t")])
    assert tables.returncode == 0 and "weak" in (tmp_path / "t" / "table2.md").read_text()


# ------------------------------------------------------------------------------------------------
# The device, the precision and the torch build; runs that resume on any machine
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("requested, device, capability, expected", [
    ("auto", "cpu", None, "fp32"), ("fp32", "cpu", None, "fp32"), ("auto", "cuda", (8, 0), "bf16"),
    ("auto", "cuda", (9, 0), "bf16"), ("auto", "cuda", (7, 0), "fp16"), ("auto", "cuda", (7, 5), "fp16"),
    ("fp32", "cuda", (8, 0), "fp32"), ("bf16", "cuda", (7, 0), "bf16")])
def test_resolve_precision(requested, device, capability, expected):
    assert checks_w2s_clip.resolve_precision(requested, device, capability) == expected


@pytest.mark.parametrize("requested", ["bf16", "fp16"])
def test_half_precision_on_the_cpu_is_a_user_error(requested):
    with pytest.raises(w2s_clip.UserError, match=f"--precision {requested} needs a CUDA device"):
        checks_w2s_clip.resolve_precision(requested, "cpu")


CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((7, 0), CU130, False),  # a V100 on the CUDA 13 wheel: no kernel image
    ((6, 1), CU130, False), ((8, 0), CU130, True), ((8, 9), CU130, True),  # sm_86 kernels run on 8.9
    ((12, 1), CU130, True), ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),
    ((9, 0), ["sm_80", "compute_80"], True), ((9, 0), ["sm_80", "sm_86"], False), ((8, 0), [], False)])
def test_gpu_build_problem_against_the_arch_list(capability, arch_list, runs):
    problem = checks_w2s_clip.gpu_build_problem(capability, arch_list, version="2.14.1+cu130")
    assert (problem is None) == runs, problem
    if not runs:
        assert f"sm_{10 * capability[0] + capability[1]}" in problem and "2.14.1+cu130" in problem


def test_device_line_names_device_gpu_capability_and_precision():
    gpu = {"device": "cuda:0", "name": "NVIDIA A100-SXM4-40GB", "capability": "sm_80",
           "precision": "bf16"}
    assert checks_w2s_clip.device_line(gpu) == "device: cuda:0, NVIDIA A100-SXM4-40GB, sm_80, bf16"
    cpu = checks_w2s_clip.hardware_report("cpu", "fp32")
    assert checks_w2s_clip.device_line(cpu) == "device: cpu, fp32"
    assert cpu["torch"] == torch.__version__ and cpu["threads"] == torch.get_num_threads()


def test_cpu_cost_warning_only_for_a_large_domain():
    assert checks_w2s_clip.cpu_cost_warning(320, 800, 2, 5) is None
    warning = checks_w2s_clip.cpu_cost_warning(48212, 20916, 5, 3)  # sketch, Table 1
    assert warning.startswith("warning: no usable GPU") and " h for 69128 images and 5 seeds" in warning


def test_cli_precision_bf16_on_the_cpu_is_one_line(demo, tmp_path):
    out = tmp_path / "runs"
    proc = run_cli(cli_args(demo, demo / "data", out, tmp_path / "cache", **{
        "--device": "cpu", "--precision": "bf16"}))
    assert_user_error(proc, out, "--precision bf16 needs a CUDA device")


def test_weak_model_does_not_depend_on_the_number_of_workers(demo, tmp_path):
    """Augmentation is seeded per sample (seed, epoch, image), so the weak model trained with 0 and
    with 2 data-loader workers is the same model: same logits, bit for bit; and a run made with
    one worker count is a finished run to a command with another."""
    logits = {}
    for workers in ("0", "2"):
        cache = tmp_path / f"cache{workers}"
        proc = run_cli(cli_args(demo, demo / "data", tmp_path / f"runs{workers}", cache,
                                **{"--method": "weak", "--workers": workers, "--weak-epochs": "2"}))
        assert proc.returncode == 0, proc.stderr
        logits[workers] = torch.load(next(cache.glob("weak-*-logits.pt")))
    assert torch.equal(logits["0"], logits["2"])
    again = run_cli(cli_args(demo, demo / "data", tmp_path / "runs0", tmp_path / "cache0",
                             **{"--method": "weak", "--workers": "2", "--weak-epochs": "2"}))
    assert again.returncode == 0 and "all runs exist" in again.stdout, again.stderr


def test_image_list_augmentation_is_seeded_per_sample_and_epoch(demo):
    """The same (seed, epoch, image) gives the same augmented tensor whatever was drawn before;
    another epoch gives another draw; the global RNGs are left as they were."""
    import random
    import timm
    paths, labels = datasets_w2s_clip.read_split_file(demo / "data" / "sketch_train.txt")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=True)
    ds = datasets_w2s_clip.ImageList(demo / "data", paths, labels, tf, seed=7)
    n = len(ds)
    first = ds[3][0]
    torch.manual_seed(123)
    random.seed(5)
    state = (torch.get_rng_state(), random.getstate())
    assert torch.equal(ds[3][0], first)  # after other draws
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert not torch.equal(ds[n + 3][0], first)  # epoch 1 of image 3
    sampler = datasets_w2s_clip.EpochSampler(n, seed=0)
    e0, e1 = list(sampler), list(sampler)
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n, 2 * n)) and e0 != [i - n for i in e1]


def test_progress_prints_lines_when_not_on_a_terminal(capsys):
    items = list(w2s_clip.progress(range(50), "stage", quiet_seconds=0))
    assert items == list(range(50))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("stage: 5/50 (10%)") and "50/50 (100%)" in lines[-1]
    list(w2s_clip.progress(range(50), "stage"))  # a short stage stays silent
    assert capsys.readouterr().err == ""


def test_tables_name_runs_made_on_different_hardware(tmp_path, capsys):
    out = tmp_path / "runs"
    for seed, name in ((0, "NVIDIA A100-SXM4-40GB"), (1, "Tesla V100-SXM2-32GB")):
        put(out, {**good_result("cpl", seed), "hardware": {"name": name, "capability": "sm_80",
                                                           "precision": "bf16"}})
    report_w2s_clip.build_tables(out, tmp_path / "t")
    printed = capsys.readouterr().out
    assert "combine runs made on different hardware" in printed and "V100" in printed


def test_gpu_check_dry_run_on_the_cpu():
    """`make gpu-check DEVICE=cpu`: every check of the GPU self-check runs and passes on the CPU
    (real-size models at batch 2), and the last line counts them."""
    proc = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--real-batch", "2"],
                          cwd=HERE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[0] == "device: cpu, fp32" and lines[-1] == "8 passed, 0 failed", proc.stdout
    assert sum(line.startswith("PASS") for line in lines) == 8


def test_file_lock_on_a_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "runs" / "results.json"
    with store_w2s_clip.file_lock(path):
        store_w2s_clip.atomic_save({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert "cannot lock" in capsys.readouterr().err


def test_older_results_without_settings_for_one_run_are_refused(tmp_path):
    """Two files of one run that record no settings cannot be told apart: named, not merged."""
    for sub in ("a", "b"):
        r = good_result()
        del r["settings"], r["settings_key"]
        put(tmp_path / "runs", r, sub)
    with pytest.raises(w2s_clip.UserError, match="record no settings"):
        report_w2s_clip.load_results(tmp_path / "runs")


def test_weak_micro_batches_give_the_whole_batch_step():
    """Without BatchNorm, a batch of 12 run as micro-batches of 5, 5 and 2 (losses weighted by
    their share) gives the weights of the whole-batch step, with clipping and the schedule; the
    history records the same loss and accuracy."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 8, 8, generator=g), torch.randint(4, (12,), generator=g))
               for _ in range(3)]

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(6, 4)).double()
    fits = {}
    for micro in (None, 5):
        history = []
        m = w2s_clip.train_weak_model(model(), [(x.double(), y) for x, y in batches], 2, 0.05, 0.1,
                                      "cpu", max_grad_norm=0.5, history=history, micro_batch=micro)
        fits[micro] = (m, history)
    for a, b in zip(fits[None][0].parameters(), fits[5][0].parameters()):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    for ra, rb in zip(fits[None][1], fits[5][1]):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-10)
        assert ra["train_accuracy"] == rb["train_accuracy"]


def test_the_method_file_imports_no_companion_and_every_module_is_packaged():
    """`import w2s_clip` loads none of the files beside it (they import it, it imports them only
    inside the branch that needs them), and pyproject.toml packages every module of the project."""
    import tomllib
    modules = sorted(p.stem for p in HERE.glob("*.py") if not p.name.startswith("test_"))
    code = ("import sys, w2s_clip; print(' '.join(sorted(m for m in sys.modules if m in "
            f"{modules!r} and m != 'w2s_clip')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == []
    packaged = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(packaged) == modules
