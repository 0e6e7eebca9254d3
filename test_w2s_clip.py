"""Tests of w2s_clip.py alone: the method (losses, heads, training, tuning) against closed forms,
float64 references and open_clip's own code, and the protocol run end to end on a generated
DomainNet-format folder. Needs torch, open_clip, timm and pytest only (no conftest, no package):
copy it beside w2s_clip.py and run

    HF_HUB_OFFLINE=1 python -m pytest -q test_w2s_clip.py

The package's tests (w2s_clip_lab/, its command, the Trainer comparison) are in tests/.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import copy
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
from PIL import Image
from torch.distributions import Categorical, kl_divergence

import w2s_clip

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# Shared inputs: a tiny CLIP, float64 references of the losses, a planted signal
# ------------------------------------------------------------------------------------------------
PROMPT_NAMES = ["The Eiffel Tower", "t-shirt", "aircraft carrier", "cat"]


@pytest.fixture(scope="module")
def clip():
    """A tiny random-init open_clip CLIP (seeded) and the ViT-B-32 tokenizer that ships with it."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")


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


@pytest.mark.parametrize("flag,value", [("--aux-alpha", "1.5"), ("--warmup-ratio", "-0.1"),
                                        ("--weight-decay", "-1e-4"), ("--lr", "0"),
                                        ("--max-grad-norm", "-1"), ("--cpl-logit-scale", "0"),
                                        ("--prototype-norm", "l2"), ("--select-by", "acc")])
def test_parse_args_refuses_out_of_range_values(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args([flag, value])
    assert e.value.code == 1 and flag in capsys.readouterr().err


def test_parse_args_seeds_are_what_a_torch_generator_takes(capsys):
    """--seeds takes 0 .. 2**64 - 1 (torch.Generator.manual_seed's range) and refuses the rest
    in one line (exit status 2, argparse's)."""
    top = w2s_clip.parse_args(["--seeds", "0", str(2 ** 64 - 1)]).seeds
    torch.Generator().manual_seed(top[1])  # the truth: torch accepts it
    for bad in ("-1", str(2 ** 64)):
        with pytest.raises(SystemExit) as e:
            w2s_clip.parse_args(["--seeds", bad])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: argument --seeds: ") and bad in err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2 ** 64)  # ... and torch refuses it too


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
    assert e.value.code == 1 and argv[0].split("=")[0] in err and len(err.splitlines()) == 1, err
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


@pytest.mark.parametrize("argv", [["--tau-grid"], ["--aux-alpha-grid", "1.5"],
                                  ["--text-lr-grid", "0"], ["--kd-temperature-grid", "-1"],
                                  ["--tune", "sometimes"], ["--cpl-kl", "both"]])
def test_parse_args_refuses_bad_grids_and_choices_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and argv[0] in err and len(err.splitlines()) == 1, err


def test_progress_prints_lines_when_not_on_a_terminal(capsys):
    items = list(w2s_clip.progress(range(50), "stage", quiet_seconds=0))
    assert items == list(range(50))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("stage: 5/50 (10%)") and "50/50 (100%)" in lines[-1]
    list(w2s_clip.progress(range(50), "stage"))  # a short stage stays silent
    assert capsys.readouterr().err == ""


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
        w2s_clip.parse_args(["--domain", typed])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: argument --domain") and "\n" not in err
    assert "one folder name under --data-root" in err


# ------------------------------------------------------------------------------------------------
# The file alone, end to end: a generated DomainNet-format folder, tiny models, a subprocess
# ------------------------------------------------------------------------------------------------
TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CLASSES = ("zebra", "The_Eiffel_Tower", "aircraft_carrier", "cat")  # label order, not sorted()


def make_domainnet(root, domain="sketch", n_train=8, n_test=20, size=36):
    """DomainNet's official layout under `root`: <domain>/<class>/<image>.png and
    <domain>_{train,test}.txt, one `<path> <label>` a line; class y's images are noise around
    one colour per class, so that a weak model can learn them."""
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 40, 230], [200, 200, 40]])
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for y, name in enumerate(CLASSES):
            (root / domain / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel = f"{domain}/{name}/{split}_{i:03d}.png"
                pixels = (colours[y] + 60 * torch.randn(size, size, 3, generator=g)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / rel)
                lines.append(f"{rel} {y}\n")
        (root / f"{domain}_{split}.txt").write_text("".join(lines))
    (root / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    return root


def alone(tmp_path):
    """A folder with w2s_clip.py alone, and a w2s_clip_lab/ that raises on import, so that an
    installed package cannot hide a dependency."""
    folder = tmp_path / "alone"
    (folder / "w2s_clip_lab").mkdir(parents=True)
    (folder / "w2s_clip_lab" / "__init__.py").write_text("raise ImportError('w2s_clip.py must run alone')\n")
    (folder / "w2s_clip.py").write_text((HERE / "w2s_clip.py").read_text())
    return folder


def run_alone(folder, *flags):
    """`python w2s_clip.py` in `folder` with tiny models and the given flags, on the CPU."""
    tiny = ["--data-root", "data", "--domain", "sketch", "--clip-model", "data/tiny-clip.json",
            "--clip-pretrained", "none", "--weak-model", "test_resnet", "--no-weak-pretrained",
            "--weak-epochs", "2", "--strong-epochs", "2", "--batch-size", "16", "--workers", "0",
            "--device", "cpu", "--seeds", "0", "--tau-grid", "0.01", "1", "--kd-temperature-grid", "1", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "w2s_clip.py", *tiny, *map(str, flags)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=600)


def one_line_error(proc, *fragments):
    """Exit status 1 and one `error:` line on stderr holding each fragment, no traceback."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and err and err[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and all(f in err[-1] for f in fragments), err[-1]


def test_the_file_alone_runs_the_protocol_end_to_end_and_resumes(tmp_path):
    """Section 5 by w2s_clip.py alone on DomainNet's format: each method's results.json with the
    keys the package reads, a table of the seeds, then the same command finds every run and reads
    the cached weak logits and features instead of computing them again."""
    folder = alone(tmp_path)
    make_domainnet(folder / "data")
    methods = ["weak", "zero-shot", "ceiling", "kd-lp", "ce-tp", "cpl"]
    proc = run_alone(folder, "--method", *methods, "--out-dir", "runs", "--cache-dir", "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("device: cpu, fp32")
    table = proc.stdout[proc.stdout.index("sketch: accuracy on D'_test"):].splitlines()
    assert [row.split()[0] for row in table[2:]] == ["weak", "zero-shot", "kd-lp", "ce-tp", "cpl", "ceiling"]
    results = {m: json.loads((folder / "runs" / "sketch" / m / "seed0" / "results.json").read_text())
               for m in methods}
    for m, r in results.items():
        assert r["method"] == m and 0 <= r["test_accuracy"] <= 1 and r["n_test"] == 16
        assert isinstance(r["settings"], dict) and r["config"]["weak_model"] == "test_resnet"
        assert len(r["predictions"]) == len(r["d_test_index"]) == 16
        assert r["classnames"] == [c.replace("_", " ") for c in CLASSES]
        assert "agreement_with_weak" in r and "weak_test_accuracy" in r
    assert results["weak"]["weak_training"][-1]["epoch"] == 2
    assert [row["values"] for row in results["cpl"]["tuning"]] == [{"tau": 0.01}, {"tau": 1.0}]
    assert set(results["cpl"]["tuning"][0]["scores"]) == set(w2s_clip.TUNING_RULES)
    assert len(results["cpl"]["curves"]) == 3  # epoch 0 and the two epochs
    assert results["ceiling"]["ceiling_head"] in ("lp", "tp", "cpl")
    assert (folder / "runs" / "sketch" / "cpl" / "seed0" / "head.pt").exists()
    # the same command again: every run found, and the caches read, not recomputed
    caches = {p: p.stat().st_mtime_ns for p in (folder / "cache").iterdir()}
    again = run_alone(folder, "--method", *methods, "--out-dir", "runs", "--cache-dir", "cache")
    assert again.returncode == 0 and "all runs exist" in again.stdout, again.stderr
    # a new output folder from the warm caches: the same numbers, no cache file rewritten
    fresh = run_alone(folder, "--method", "weak", "kd-lp", "cpl", "--out-dir", "runs2", "--cache-dir", "cache")
    assert fresh.returncode == 0, fresh.stderr
    assert {p: p.stat().st_mtime_ns for p in (folder / "cache").iterdir()} == caches
    for m in ("weak", "kd-lp", "cpl"):
        r = json.loads((folder / "runs2" / "sketch" / m / "seed0" / "results.json").read_text())
        assert r["predictions"] == results[m]["predictions"], m
    # other settings are not mixed in: one line naming the setting
    other = run_alone(folder, "--method", "cpl", "--tune", "none", "--out-dir", "runs", "--cache-dir", "cache")
    one_line_error(other, "made with other settings", "tune: hold-val -> none", "--force")


@pytest.mark.parametrize("case", ["no-folder", "no-split-file", "missing-image", "not-an-image",
                                  "unknown-domain", "unknown-method", "hf-weak-model", "cuda",
                                  "out-dir-is-a-file"])
def test_the_file_alone_stops_a_users_mistake_in_one_line(tmp_path, case):
    """Each mistake: exit status 1, one `error:` line naming the file, flag or value, no traceback."""
    folder = alone(tmp_path)
    data = make_domainnet(folder / "data", n_train=2, n_test=5)
    flags, fragments = ["--method", "weak", "--out-dir", "runs", "--cache-dir", "cache"], []
    if case == "no-folder":
        flags, fragments = flags + ["--data-root", "nowhere"], ["data root nowhere not found"]
    elif case == "no-split-file":
        (data / "sketch_test.txt").unlink()
        fragments = ["sketch_test.txt not found"]
    elif case == "missing-image":
        (data / "sketch" / "cat" / "test_002.png").unlink()
        fragments = ["sketch/cat/test_002.png is missing"]
    elif case == "not-an-image":
        (data / "sketch" / "cat" / "test_002.png").write_text("not a png")
        fragments = ["sketch/cat/test_002.png is unreadable"]
    elif case == "unknown-domain":
        flags, fragments = flags + ["--domain", "photos"], ["--domain photos", "w2s_clip_lab.run"]
    elif case == "unknown-method":
        flags, fragments = flags + ["--method", "lora"], ["--method", "'lora'"]
    elif case == "hf-weak-model":
        flags, fragments = flags + ["--weak-model", "hf:microsoft/resnet-18"], ["python -m w2s_clip_lab.run"]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        flags, fragments = flags + ["--device", "cuda"], ["--device cuda: not usable here"]
    elif case == "out-dir-is-a-file":
        (folder / "taken").write_text("")
        flags, fragments = flags + ["--out-dir", "taken"], ["--out-dir taken is a file, not a folder"]
    proc = run_alone(folder, *flags)
    one_line_error(proc, *fragments)
    assert not (folder / "runs").exists() or not list((folder / "runs").rglob("results.json"))


def record_disk_events(monkeypatch):
    """Patch os.fsync and os.replace to log ("fsync", path) and ("replace", src, dst) in order (a
    descriptor's path read from /proc), doing what they do."""
    events, fsync, replace = [], os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return replace(src, dst)
    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return events


def test_every_write_is_flushed_then_renamed_then_its_folder_flushed(tmp_path, monkeypatch):
    """atomic_save (results, caches) and save_run (head.pt, results.json, epochs.csv): each file's
    data reach the disk before its rename, and the folder's entry after it, so that a node losing
    power leaves the old file or the new one, whole, never an empty or truncated one."""
    events = record_disk_events(monkeypatch)
    path = tmp_path / "cache" / "x.pt"
    w2s_clip.atomic_save({"a": torch.ones(3)}, path)
    (kind, tmp), rename, folder, made = events  # cache/ was made: its entry in tmp_path too
    assert kind == "fsync" and rename == ("replace", tmp, str(path.resolve()))
    assert folder == ("fsync", str(path.parent.resolve())) and made == ("fsync", str(tmp_path.resolve()))
    assert torch.load(path)["a"].sum() == 3
    events.clear()
    result = w2s_clip.result_path(tmp_path / "runs", "sketch", "cpl", 0)
    with w2s_clip.epochs_log(result) as on_epoch:
        on_epoch({"epoch": 1, "step": 2, "loss": 0.5})
    w2s_clip.save_run(result, {"method": "cpl", "test_accuracy": 0.5, "settings": {}},
                      {"prototypes": torch.zeros(2, 3)}, {})
    renamed = [e[2].rsplit("/", 1)[1] for e in events if e[0] == "replace"]
    assert renamed == ["head.pt", "results.json", "epochs.csv"]
    for i, e in enumerate(events):
        if e[0] == "replace":
            assert events[i - 1] == ("fsync", e[1]) and events[i + 1] == ("fsync", str(result.parent.resolve()))
