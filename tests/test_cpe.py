"""Tests for w2s_clip_lab/cpe.py: CMM and CPE prototypes; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import w2s_clip
from w2s_clip_lab import cpe, datasets, run
from conftest import (DEMO_NAMES, PROMPT_NAMES, assert_user_error, cli_args, planted_templates,
                      run_cli)


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
    margins, confused = cpe.class_matching_margin(feats, protos, torch.tensor(labels), 3)
    assert margins[:2].tolist() == pytest.approx([m0, m1], abs=1e-6)
    assert math.isnan(margins[2].item())  # class 2 has no image
    assert confused[:2].tolist() == [1, 2]


def test_cpe_drops_a_template_naming_the_wrong_class_and_beats_the_uniform_ensemble():
    x, y, emb = planted_templates()
    weights, worst = cpe.cpe_weights(emb, x)
    assert weights[-1] == 0 and worst.argmin() == 3 and torch.isclose(weights.sum(), torch.tensor(1.0))
    acc = lambda p: ((F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).T).argmax(1) == y).float().mean()
    uniform = cpe.weighted_prototypes(emb, torch.full((4,), 0.25), normalize=True)
    assert acc(cpe.weighted_prototypes(emb, weights, normalize=True)) > acc(uniform) + 0.02


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
    weights, worst = cpe.cpe_weights(emb, x, k_worst=3)
    torch.testing.assert_close(worst, m)
    torch.testing.assert_close(weights, (m - m.min()) / (m - m.min()).sum())
    extra = torch.randn(2, emb.shape[2])
    protos = cpe.weighted_prototypes(emb, weights, descriptions={4: extra})
    torch.testing.assert_close(protos[4], ((weights[:, None] * emb[4]).sum(0) + extra.sum(0) / T) / (1 + 2 / T))
    torch.testing.assert_close(protos[3], (weights[:, None] * emb[3]).sum(0))


@pytest.mark.parametrize("norm", ["raw", "unit"])
def test_cpe_with_one_template_equals_the_single_template_prototypes(clip, norm):
    model, tokenizer = clip
    emb = cpe.prompt_embeddings(model, tokenizer, PROMPT_NAMES, ["a photo of a {}"])
    weights, _ = cpe.cpe_weights(emb, torch.randn(50, emb.shape[-1]))
    assert weights.tolist() == [1.0]
    single = w2s_clip.text_prototypes(model, tokenizer, PROMPT_NAMES, ["a photo of a {}"],
                                      normalize=norm == "unit")
    torch.testing.assert_close(cpe.weighted_prototypes(emb, weights, norm == "unit"), single)


def test_cli_cpe_weights_use_no_true_label(demo, tmp_path, monkeypatch):
    """`zero-shot --prototype-init cpe`: results.json records the 80 templates' weights and k, equal
    to cpe_weights on the seed's hold-train features; a run with every D_test label scrambled records
    the same weights."""
    flags = {"--method": "zero-shot", "--prototype-init": "cpe", "--cpe-k": "2"}
    run.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / "a", tmp_path / "c", **flags)])
    r = json.loads((tmp_path / "a" / "sketch" / "zero-shot" / "seed0" / "results.json").read_text())
    assert r["cpe"]["k_worst"] == 2 and len(r["cpe"]["weights"]) == len(open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert r["cpe"]["templates"][0] == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("{}")
    real = datasets.load_domain

    def scrambled(*a, **kw):
        data = real(*a, **kw)
        data["test_labels"] = data["test_labels"][torch.randperm(len(data["test_labels"]),
                                                                 generator=torch.Generator().manual_seed(1))]
        return data
    monkeypatch.setattr(datasets, "load_domain", scrambled)  # as preflight calls it
    run.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / "b", tmp_path / "c2", **flags)])
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
    for tag, desc in (("plain", None), ("described", cpe.read_class_descriptions(path, names))):
        protos[tag], report = cpe.cpe_prototypes(model, tokenizer, names, feats, descriptions=desc)
    changed = (protos["plain"] - protos["described"]).abs().amax(dim=1) > 0
    assert changed.tolist() == [n == "zebra" for n in names]
    assert report["described_classes"] == ["zebra"]


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


@pytest.mark.parametrize("content", [
    '{"aircraft carrier": ["a big ship"], "aircraft_carrier": ["a naval vessel"]}',
    '{"zebra": ["striped"], "zebra": ["a horse with stripes"]}'], ids=["two-spellings", "key-twice"])
def test_class_descriptions_naming_one_class_twice_are_refused(tmp_path, content):
    """JSON keeps the last of two keys of one class: the other's sentences would be lost."""
    path = tmp_path / "d.json"
    path.write_text(content)
    names = ["aircraft carrier", "zebra"]
    with pytest.raises(w2s_clip.UserError, match="both name the class") as info:
        cpe.read_class_descriptions(path, names)
    assert str(path) in str(info.value) and "merge their sentences" in str(info.value)


@pytest.mark.parametrize("content, want", [("{}", {}), ('{"zebra": ["striped"]}', {1: ["striped"]})])
def test_class_descriptions_empty_or_plain_are_read(tmp_path, content, want):
    path = tmp_path / "d.json"
    path.write_text(content)
    assert cpe.read_class_descriptions(path, ["aircraft carrier", "zebra"]) == want


def test_class_descriptions_that_are_an_empty_list_are_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]")
    with pytest.raises(w2s_clip.UserError, match="expected an object"):
        cpe.read_class_descriptions(path, ["zebra"])
