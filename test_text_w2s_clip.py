"""Tests for text_w2s_clip.py: the packed text path against open_clip's own encode_text; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported


import pytest
import torch
import torch.nn.functional as F

import text_w2s_clip
import w2s_clip
from conftest import PACKED_NAMES, encode_text_with_context


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
