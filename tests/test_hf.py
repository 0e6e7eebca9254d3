"""Tests for w2s_clip_lab/hf.py: Hugging Face weak models; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import json
import sys

import pytest
import torch

import w2s_clip
from w2s_clip_lab import checks, hf
from conftest import HF_MEAN, HF_STD, cli_args, run_cli


@pytest.mark.parametrize("pretrained", [True, False])
def test_hf_weak_model_fresh_k_way_head_logits_and_processor_transforms(hf_folder, pretrained):
    """hf:<folder> gives logits [n, k] for a new k, the saved backbone (or a random init from the
    config), and transforms whose output is the processor's size and its (x/255 - mean) / std."""
    from PIL import Image
    from transformers import AutoModelForImageClassification
    model, train_tf, eval_tf = hf.load_weak_model(f"hf:{hf_folder}", 7, pretrained)
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
        hf.load_weak_model("hf:microsoft/resnet-18", 5)
    assert "transformers" in str(e.value) and "\n" not in str(e.value)
    args = w2s_clip.parse_args(["--weak-model", "hf:microsoft/resnet-18", "--clip-model",
                                str(demo / "tiny-clip.json"), "--clip-pretrained", "none"])
    with pytest.raises(w2s_clip.UserError, match="--weak-model hf:microsoft/resnet-18 needs the "
                                                 "transformers package"):
        checks.check_models(args)


def test_check_models_accepts_hf_classifier_and_refuses_bad_ids(hf_folder, demo, tmp_path):
    transformers = pytest.importorskip("transformers")
    clip_flags = ["--clip-model", str(demo / "tiny-clip.json"), "--clip-pretrained", "none"]
    checks.check_models(w2s_clip.parse_args(["--weak-model", f"hf:{hf_folder}", *clip_flags]))
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    for name, fragment in (("hf:no-such-org/no-such-model", "not in the local cache"),  # offline
                           (f"hf:{tmp_path / 'bert'}", "not an image classifier")):
        with pytest.raises(w2s_clip.UserError, match=fragment) as e:
            checks.check_models(w2s_clip.parse_args(["--weak-model", name, *clip_flags]))
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
