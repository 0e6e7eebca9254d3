"""Tests for w2s_clip_lab/weights.py: the files `make weights` fetches and the offline check; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import subprocess
import sys

import pytest

from conftest import HERE, assert_user_error, cli_args, fake_hub_file, record_hub_requests


@pytest.mark.parametrize("tag", ["openai", "datacomp_s_s13m_b4k"])
def test_weight_files_are_the_files_open_clip_requests(monkeypatch, tag):
    """weights names the hub files open_clip's own download asks for, in its order."""
    import open_clip.pretrained
    from w2s_clip_lab import weights
    asked = record_hub_requests(monkeypatch, open_clip.pretrained)
    with pytest.raises(Exception):
        open_clip.download_pretrained(open_clip.get_pretrained_cfg("ViT-B-32", tag))
    ((repo, names),) = weights.clip_files("ViT-B-32", tag)
    assert asked == [(repo, n) for n in names]


def test_weight_files_are_the_files_timm_requests(monkeypatch):
    import timm.models._hub
    from w2s_clip_lab import weights
    asked = record_hub_requests(monkeypatch, timm.models._hub)
    with pytest.raises(Exception):
        timm.create_model("resnet18", pretrained=True)
    ((repo, names),) = weights.timm_files("resnet18")
    assert asked == [(repo, n) for n in names]


def test_missing_weight_offline_is_one_line_naming_make_weights_and_a_cached_one_passes(demo, tmp_path):
    """Offline with an empty cache: the run stops before any work with `make weights` named, and
    `w2s_clip_lab/weights.py --check` lists the file and exits 1; with the file in the cache (the hub's
    layout) the check passes, with its size."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                    **{"--clip-model": "ViT-B-32", "--clip-pretrained": "openai"})
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.run", *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_user_error(proc, tmp_path / "out", "--clip-pretrained openai", "ViT-B-32 weights",
                      "timm/vit_base_patch32_clip_224.openai", "make weights", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "cache").exists()
    check = [sys.executable, "-m", "w2s_clip_lab.weights", "--check", "--clip-tags", "openai",
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


def test_make_weights_interrupted_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C while a checkpoint is fetched: no traceback, exit status 130, rerun to go on."""
    from w2s_clip_lab import weights
    monkeypatch.setattr(weights, "missing", lambda files: list(files))
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=3.0: True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(weights, "fetch", interrupted)
    assert weights.run(["--clip-tags", "openai", "--weak-models", "resnet18"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("interrupted; run the same command again")


@pytest.mark.parametrize("argv, fragment", [
    (["--clip-tags", "nonsense", "--weak-models"], "--clip-tags nonsense: ViT-B-32 has tags"),
    (["--clip-model", "NotAModel", "--clip-tags", "openai", "--weak-models"], "--clip-model NotAModel"),
    (["--clip-tags", "openai", "--weak-models", "resnet_18"], "--weak-models resnet_18")])
def test_make_weights_with_a_misspelt_name_is_one_line_not_a_cached_model(argv, fragment, capsys):
    from w2s_clip_lab import weights
    assert weights.run(["--check", *argv]) == 1
    out = capsys.readouterr()
    assert out.err.strip().startswith("error: ") and fragment in out.err and "\n" not in out.err.strip()
    assert "cached" not in out.out
