"""load_run: a trained head back from its run folder scores D'_test as the run did."""
import json
import shutil

import pytest
import torch

import w2s_clip
from conftest import cli_args, run_cli
from w2s_clip_lab.load import load_run

METHODS = ["weak", "zero-shot", "ceiling", "kd-lp", "ce-tp", "cpl", "cpl-text"]


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """The demo's tiny domain run for every kind of head, with a CLIP config of its own."""
    root = tmp_path_factory.mktemp("load")
    shutil.copy(demo / "tiny-clip.json", root / "tiny-clip.json")
    args = cli_args(demo, demo / "data", root / "runs", root / "cache",
                    **{"--method": METHODS, "--clip-model": root / "tiny-clip.json",
                       "--tau-grid": ["0.01", "1"], "--text-lr-grid": ["1e-5"]})
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.mark.parametrize("method", METHODS[1:])
def test_a_loaded_head_scores_d_test_as_the_run_did(demo, runs, method):
    """On the run's D'_test features (its CLIP, its preprocessing, the run's batch), the loaded
    head's argmax is the saved per-image predictions and its accuracy the saved test_accuracy."""
    folder = runs / "runs" / "sketch" / method / "seed0"
    run = load_run(folder)
    r = json.loads((folder / "results.json").read_text())
    assert run.method == method and run.classnames == r["classnames"] and not run.head.training
    data = w2s_clip.load_domain(str(demo / "data"), "sketch")
    loader = torch.utils.data.DataLoader(w2s_clip.ImageList(str(demo / "data"), data["test_paths"],
                                                            data["test_labels"], run.preprocess),
                                         batch_size=16)
    feats = w2s_clip.encode_images(run.clip, loader, "cpu")[r["d_test_index"]]
    with torch.no_grad():
        pred = run.head(feats).argmax(dim=-1)
    assert pred.tolist() == r["predictions"]
    assert (pred == torch.tensor(r["d_test_labels"])).float().mean().item() == r["test_accuracy"]
    if method == "ceiling":
        kinds = {"lp": w2s_clip.LinearHead, "tp": w2s_clip.PromptHead, "cpl": w2s_clip.PrototypeHead}
        assert isinstance(run.head, kinds[r["ceiling_head"]])


def test_a_weak_run_a_changed_or_moved_config_and_a_lost_head_are_one_line(runs, tmp_path):
    base = runs / "runs" / "sketch"
    with pytest.raises(w2s_clip.UserError, match="a weak run keeps no head; its model is in"):
        load_run(base / "weak" / "seed0")
    copy = tmp_path / "cpl"
    shutil.copytree(base / "cpl" / "seed0", copy)
    (copy / "head.pt").unlink()
    with pytest.raises(w2s_clip.UserError, match="head.pt not found"):
        load_run(copy)
    foreign = tmp_path / "kd-lp"
    shutil.copytree(base / "kd-lp" / "seed0", foreign)
    shutil.copy(base / "ce-tp" / "seed0" / "head.pt", foreign / "head.pt")
    with pytest.raises(w2s_clip.UserError, match="is not the head this results.json was written with"):
        load_run(foreign)
    config = runs / "tiny-clip.json"
    original = config.read_text()
    try:
        config.write_text(original.replace('"layers": 2', '"layers": 3', 1))
        with pytest.raises(w2s_clip.UserError, match="has changed since the run"):
            load_run(base / "cpl" / "seed0")
        config.unlink()
        with pytest.raises(w2s_clip.UserError, match="is gone.*clip_model=<where it is now>"):
            load_run(base / "cpl" / "seed0")
        (tmp_path / "moved.json").write_text(original)  # the same config elsewhere: checked, loaded
        assert load_run(base / "cpl" / "seed0", clip_model=str(tmp_path / "moved.json")).method == "cpl"
    finally:
        config.write_text(original)
    with pytest.raises(w2s_clip.UserError, match="not found"):
        load_run(tmp_path / "nowhere")
