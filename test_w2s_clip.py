"""Tests for w2s_clip.py: the method (losses, heads, training, tuning, protocol) and its command line.

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
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import w2s_clip
from w2s_clip_lab import miniature
from conftest import (HERE, LOSS_CASES, LOSS_IDS, PACKED_NAMES, PROMPT_NAMES, assert_user_error,
                      cli_args, corrupt_copy, encode_text_with_context, logits_pair, main_error,
                      ref_ce_rows, ref_kl_rows, ref_log_softmax, ref_loss, run_cli, temp_files,
                      trainer_fit, tree_state, tuning_setup)


# ------------------------------------------------------------------------------------------------
# Losses: independent float64 references (explicit shifted log-sum-exp, no F.log_softmax / kl_div)
# ------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("name", list(w2s_clip.LOSSES))
def test_every_registered_loss_is_a_finite_batch_mean_for_any_k_at_its_defaults(name):
    """Whatever LOSSES holds (a loss added later included), bound to its hyperparameters' defaults:
    a scalar, the mean of its per-row values, finite with a finite gradient for k = 2 and 7 and
    for logits x1000, and its gradient moves the strong logits (the loss depends on them)."""
    defaults = {h: default for h, (default, *_) in w2s_clip.HYPERPARAMETERS.items()}
    fn, schedule = w2s_clip.bind_loss(name, defaults)
    extra = schedule(10, 10) if schedule else {}
    for k, scale in ((2, 3.0), (7, 3.0), (7, 1000.0)):
        s, w = logits_pair(6, k, scale=scale, seed=k)
        s = s.requires_grad_()
        loss = fn(s, w, **extra)
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(grad).all(), (k, scale)
        assert grad.abs().sum() > 0
        rows = torch.stack([fn(s[i:i + 1], w[i:i + 1], **extra) for i in range(len(s))])
        torch.testing.assert_close(loss, rows.mean(), rtol=1e-5, atol=1e-5 * scale)


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
# The packed text tower, against open_clip's own encode_text
# ------------------------------------------------------------------------------------------------
def test_text_tower_truncated_path_equals_full_encode_text(clip):
    """Running only max(eot)+1 positions gives open_clip's 77-token encode_text, for any lengths."""
    model, tok = clip
    prompts = ["a cat.", "a photo of The Eiffel Tower at night, seen from far away.", "t-shirt",
               "an aircraft carrier in the sea"]
    tokens, eot = w2s_clip.tokenize_prompts(model, tok, prompts)
    full = tok(prompts)
    assert torch.equal(eot, full.argmax(dim=-1))
    assert tokens.shape[1] == int(eot.max()) + 1 < 77
    with torch.no_grad():
        ours = w2s_clip.TextTower(model)(model.token_embedding(tokens), eot)
        ref = model.encode_text(full)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


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


# ------------------------------------------------------------------------------------------------
# Heads and text features, against open_clip's own code
# ------------------------------------------------------------------------------------------------
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
    model.zero_grad(set_to_none=True)  # the text-tower tests above leave gradients on it
    head = w2s_clip.PromptHead(model, tok, PROMPT_NAMES)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 64, generator=g), torch.randint(len(PROMPT_NAMES), (8,), generator=g)
    before = head.text_features().detach().clone()
    F.cross_entropy(head(x), y).backward()
    assert head.ctx.grad is not None and head.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    torch.optim.SGD([head.ctx], lr=10.0).step()
    assert (head.text_features().detach() - before).abs().max() > 1e-5


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


def test_n_predicted_classes_hand_example():
    logits = torch.tensor([[0.1, 0.2, 0.9], [0.0, 0.0, 1.0], [5.0, 1.0, 2.0], [-1.0, -2.0, 0.0]])
    assert w2s_clip.n_predicted_classes(logits) == 2  # argmax 2, 2, 0, 2
    assert w2s_clip.n_predicted_classes(torch.eye(5)) == 5
    assert w2s_clip.n_predicted_classes(torch.ones(7, 4)) == 1  # a collapsed head (ties -> 0)


# ------------------------------------------------------------------------------------------------
# Training: a planted signal where the right answer is known
# ------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("tune_by", ["agreement", "weak-kl", "val-loss"])
def test_tuning_picks_what_a_brute_force_loop_picks_without_true_labels(planted_data, tune_by):
    """fit_tuned's choice equals a plain loop over the same grid (train_head per tau, score each
    on hold-val against the weak logits), and scrambling every true label leaves the choice, the
    scores and the chosen head unchanged: no true label takes part in tuning. Each row records
    every rule's score (the chosen rule's is `score`) and which point is the flags' own."""
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
        else:  # weak-kl: at the head's own tau; val-loss: CPL's loss at the flag's tau, 1
            t = tau if tune_by == "weak-kl" else 1.0
            pw, ps = F.softmax(w.double() / (1 if tune_by == "weak-kl" else t), -1), \
                F.log_softmax(val.double() / t, -1)
            scores.append(-(pw * (pw.clamp_min(1e-300).log() - ps)).sum(-1).mean().item())
    assert [row["score"] for row in tuning] == pytest.approx(scores, rel=1e-5, abs=1e-6)
    assert [row["scores"][tune_by] for row in tuning] == [row["score"] for row in tuning]
    assert all(set(row["scores"]) == set(w2s_clip.TUNING_RULES) for row in tuning)
    assert [row["at_flags"] for row in tuning] == [False, False, True]  # --tau 1.0
    assert len(set(scores)) > 1  # the grid points differ, so the choice is not trivial
    assert tuned == {"tau": (0.02, 0.1, 1.0)[scores.index(max(scores))]}
    scrambled = p["y"][torch.randperm(len(p["y"]), generator=torch.Generator().manual_seed(9))]
    head2, _, _, tuned2, tuning2 = w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong, scrambled,
                                                      splits, None, args, seed=0)
    assert tuned2 == tuned and [r["score"] for r in tuning2] == [r["score"] for r in tuning]
    assert torch.equal(head2.prototypes, head.prototypes)
    assert [r["test_accuracy"] for r in tuning2] != [r["test_accuracy"] for r in tuning]


def test_a_diverging_grid_point_drops_out_named_and_a_head_that_never_learned_loses(planted_data):
    """tau 1e-50 makes CPL's loss NaN: that point is left out, named in the warnings, and the run
    goes on with the others; a grid of only diverging points raises FloatingPointError naming
    each. At tau 1e-30 the head's loss is huge but finite and never moves: it ties the learned
    tau 0.1 at the bottom of the agreement scale only if learning is ignored."""
    weak_logits, strong, splits, args = tuning_setup(planted_data)
    args.tau_grid = [1e-50, 0.1]
    _, fit, _, tuned, tuning = w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong,
                                                  planted_data["y"], splits, None, args, seed=0)
    assert tuned == {"tau": 0.1} and "diverged" in tuning[0] and "scores" in tuning[1]
    assert any(w.startswith("grid point tau 1e-50: ") for w in fit["warnings"])
    args.tau_grid = [1e-50]
    with pytest.raises(FloatingPointError, match="every grid point diverged \\(tau 1e-50: "):
        w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong, planted_data["y"], splits, None,
                           args, seed=0)
    args.tau_grid = [1e-30, 0.1]
    _, _, _, tuned, tuning = w2s_clip.fit_tuned("cpl", "cpl", weak_logits, strong,
                                                planted_data["y"], splits, None, args, seed=0)
    assert [row["learned"] for row in tuning] == [False, True] and tuned == {"tau": 0.1}


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
# The command line, as a user would type it
# ------------------------------------------------------------------------------------------------
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
    assert {"train_true_acc", "train_agreement", "test_acc"} <= log[0].keys()
    assert all(0 <= r["curves"][e][k] <= 1 for e in range(3) for k in ("train_true_acc", "train_agreement"))
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


# ------------------------------------------------------------------------------------------------
# The research instrument: student-supervisor agreement
# ------------------------------------------------------------------------------------------------
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
# One-line errors for models, files and folders
# ------------------------------------------------------------------------------------------------
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
# Damaged state, full disks and odd inputs: one line, nothing lost, nothing half-written
# ------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("config", [[1, 2], {"embed_dim": 64}, {**miniature.TINY_CLIP, "embed_dim": "64"},
                                    {**miniature.TINY_CLIP, "vision_cfg": {
                                        **miniature.TINY_CLIP["vision_cfg"], "layers": "two"}},
                                    {**miniature.TINY_CLIP, "text_cfg": {
                                        **miniature.TINY_CLIP["text_cfg"], "no_such_key": 1}}],
                         ids=["list", "missing-keys", "str-embed-dim", "str-layers", "unknown-key"])
def test_cli_error_clip_config_that_is_not_an_open_clip_config(demo, tmp_path, config):
    """A --clip-model JSON that is a list, lacks keys or has wrong types stops before training."""
    bad = tmp_path / "bad-clip.json"
    bad.write_text(json.dumps(config))
    main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                        **{"--clip-model": bad}), f"--clip-model {bad}")
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached


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
            names = [n for n in ast.walk(ast.parse(defs[name])) if isinstance(n, ast.Name)]
            local = {n.id for n in names if isinstance(n.ctx, ast.Store)}  # its own variables
            todo += sorted(({n.id for n in names} - local - {name}) & set(defs))  # code, not text
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


def test_make_clean_keeps_caches_runs_results_data_and_tables_installs_nothing():
    """make's own dry run: `clean` removes the demo's and the tests' outputs only; `tables`
    runs no pip (matplotlib comes from requirements.txt)."""
    dry = lambda target: subprocess.run(["make", "-n", "-o", "venv", "-o", ".venv/.installed",
                                         target], cwd=HERE, capture_output=True, text=True).stdout
    removed = [w for line in dry("clean").splitlines() if line.startswith("rm ") for w in line.split()[2:]]
    assert removed and not {"cache", "runs", "results", "data", "data/domainnet"} & set(removed)
    assert "pip" not in dry("tables")
    assert any(line.startswith("matplotlib==") for line in (HERE / "requirements.txt").read_text().splitlines())


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
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.bench", "--device", "nonsense"], cwd=HERE,
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
    (folder / miniature.MANIFEST).write_text(json.dumps({"written_by": "w2s_clip_lab.miniature"}))
    (folder / "data").symlink_to(mine)
    main_error(["--make-demo", folder], "symbolic link", str(folder / "data"))
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("flag", ["--out-dir", "--cache-dir"])
def test_cli_error_output_folder_is_a_file(demo, tmp_path, flag):
    target = tmp_path / "a-file"
    target.write_text("x")
    out = tmp_path / "runs" if flag != "--out-dir" else target
    main_error(cli_args(demo, demo / "data", tmp_path / "runs", tmp_path / "cache", **{flag: target}),
               flag, "is a file, not a folder")


@pytest.mark.parametrize("argv", [["--tau-grid"], ["--aux-alpha-grid", "1.5"],
                                  ["--text-lr-grid", "0"], ["--kd-temperature-grid", "-1"],
                                  ["--tune", "sometimes"], ["--cpl-kl", "both"]])
def test_parse_args_refuses_bad_grids_and_choices_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and argv[0] in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------
# The device, the precision and the torch build; runs that resume on any machine
# ------------------------------------------------------------------------------------------------
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


def test_progress_prints_lines_when_not_on_a_terminal(capsys):
    items = list(w2s_clip.progress(range(50), "stage", quiet_seconds=0))
    assert items == list(range(50))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("stage: 5/50 (10%)") and "50/50 (100%)" in lines[-1]
    list(w2s_clip.progress(range(50), "stage"))  # a short stage stays silent
    assert capsys.readouterr().err == ""


def test_gpu_check_dry_run_on_the_cpu():
    """`make gpu-check DEVICE=cpu`: every check of the GPU self-check runs and passes on the CPU
    (real-size models at batch 2), and the last line counts them."""
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.gpu_check", "--device", "cpu", "--real-batch", "2"],
                          cwd=HERE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[0] == "device: cpu, fp32" and lines[-1] == "8 passed, 0 failed", proc.stdout
    assert sum(line.startswith("PASS") for line in lines) == 8


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


def project_imports(path):
    """(function or None, module) for every `import` of the project (w2s_clip, w2s_clip_lab.*) in
    the file at `path`, read from its syntax tree; None: at module level."""
    import ast
    found, tree = [], ast.parse(path.read_text())

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((function, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.extend((function, f"{child.module}.{a.name}" if child.module == "w2s_clip_lab"
                              else child.module) for a in child.names)
            visit(child, inner)
    visit(tree, None)
    return [(f, m) for f, m in found if m.split(".")[0] in ("w2s_clip", "w2s_clip_lab")]


def test_the_method_imports_only_the_runner_in_main_and_the_package_runs_one_way():
    """w2s_clip.py imports only torch, torchvision, open_clip, timm (and tqdm, which both of those
    install) and the standard library at module level and the project only in `main` (the runner); in w2s_clip_lab no module imports
    the runner and the imports among the files have no circle; at most three .py files at the
    top; `import w2s_clip` loads nothing of the package; pyproject.toml packages both."""
    import tomllib
    tops = sorted(p.name for p in HERE.glob("*.py"))
    assert tops == ["conftest.py", "test_w2s_clip.py", "w2s_clip.py"]
    import ast
    allowed = {"torch", "torchvision", "open_clip", "timm", "tqdm"} | set(sys.stdlib_module_names)
    for node in ast.parse((HERE / "w2s_clip.py").read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert {n.split(".")[0] for n in names} <= allowed, names
    assert project_imports(HERE / "w2s_clip.py") == [("main", "w2s_clip_lab.runner")]
    package = sorted((HERE / "w2s_clip_lab").glob("*.py"))
    graph = {p.stem: {m.split(".")[1] for _, m in project_imports(p) if m.startswith("w2s_clip_lab.")}
             for p in package}
    assert not any("runner" in deps for deps in graph.values())
    done, path = set(), []

    def walk(name):  # depth first: a module met again on the current path closes a circle
        assert name not in path, f"circle: {' -> '.join(path + [name])}"
        if name not in done:
            path.append(name)
            for dep in sorted(graph[name]):
                walk(dep)
            path.pop()
            done.add(name)
    for name in graph:
        walk(name)
    code = "import sys, w2s_clip; print(' '.join(m for m in sys.modules if m.startswith('w2s_clip_lab')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == []
    setup = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["py-modules"] == ["w2s_clip"] and setup["packages"] == ["w2s_clip_lab"]


def test_w2s_clip_run_as_a_script_is_one_module(tmp_path):
    """`python w2s_clip.py` loads no second copy of itself when the runner imports `w2s_clip`
    (one UserError class, one registry): Python's import log names no module `w2s_clip`, and a
    user's mistake caught in the runner still ends in its one line."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "w2s_clip.py", "--build-tables",
                           "--out-dir", str(tmp_path / "none"), "--tables-dir", str(tmp_path / "t")],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "w2s_clip_lab.runner" in imported and "w2s_clip" not in imported
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("error: ")


def test_fit_head_probes_hold_train_against_true_labels_and_against_its_training_labels(planted_data):
    """Per epoch, `train_true_acc` is the head's accuracy on hold-train against the true labels and
    `train_agreement` its agreement with the labels it trains on (the weak argmax): the selected
    epoch's row equals both computed from the returned head; with weak labels right 60% of the
    time, the two differ."""
    p = planted_data
    weak_logits, strong, splits, args = tuning_setup(planted_data)
    ht, hv = splits["hold_train"], splits["hold_val"]
    head, fit, _ = w2s_clip.fit_head("cpl", "cpl", weak_logits[ht], weak_logits[hv], strong, p["y"],
                                     splits, [str(c) for c in range(p["k"])], args, 0,
                                     values={"tau": 0.1})
    row = fit["curves"][fit["best_epoch"]]
    pred = w2s_clip.predict(head, p["x"][ht]).argmax(dim=-1)
    assert row["train_true_acc"] == pytest.approx((pred == p["y"][ht]).float().mean().item())
    assert row["train_agreement"] == pytest.approx((pred == p["weak"][ht]).float().mean().item())
    assert abs(row["train_agreement"] - row["train_true_acc"]) > 0.05


@pytest.mark.parametrize("typed, domain", [("sketch/", "sketch"), ("./sketch", "sketch"),
                                           ("./sketch/", "sketch")])
def test_domain_typed_with_a_slash_or_dot_is_the_domain(typed, domain):
    assert w2s_clip.parse_args(["--domain", typed]).domain == domain


@pytest.mark.parametrize("typed", ["../data/sketch", "sketch/train", ".", ".."])
def test_domain_that_is_a_path_is_refused_in_one_line(typed, capsys):
    """Never results outside --out-dir (out-dir/../data/...) or cache files under `pixels-..`."""
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args(["--dataset", "folder", "--domain", typed])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: argument --domain") and "\n" not in err
    assert "one folder name under --data-root" in err
