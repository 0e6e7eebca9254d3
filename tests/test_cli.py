"""Tests of the commands as a user runs them (`python w2s_clip.py` with the package beside it, and
`python -m w2s_clip_lab.run`): errors in one line, resuming, concurrency, full disks, Ctrl-C, the
make targets, the import graph, and train_head against transformers' own Trainer.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_cli.py
"""
import copy
import csv
import functools
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import w2s_clip
from conftest import (FILE, HERE, PACKAGE, assert_user_error, cli_args, corrupt_copy, main_error,
                      run_cli, temp_files, trainer_fit, tree_state)
from w2s_clip_lab import miniature, run


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
               "sketch_train.txt:", lines[7].split()[0], "again (first at line 8)")


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
    run.main(args("damaged", "weak"))
    run.main(args("damaged", "ce-lp"))  # the CLIP features are cached too
    damaged = sorted(p for p in (tmp_path / "damaged" / "cache").glob("*.pt")
                     if not p.name.startswith("pixels-"))
    assert len(damaged) == 3  # weak model, weak logits, CLIP features
    (pixels,) = (tmp_path / "damaged" / "cache").glob("pixels-*.u8")  # the weak model's eval crops
    for p in damaged + [pixels]:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    capsys.readouterr()
    run.main(args("damaged", "cpl"))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for p in damaged:
        assert f"warning: cache file {p} cannot be loaded" in err, p.name
        torch.load(p, weights_only=True)  # rewritten whole
    assert f"warning: cache file {pixels} is incomplete or damaged" in err
    run.main(args("clean", "cpl"))
    result = Path("sketch/cpl/seed0/results.json")
    redone, clean = (json.loads((tmp_path / t / "out" / result).read_text()) for t in ("damaged", "clean"))
    for key in ("test_accuracy", "per_class_accuracy", "weak_test_accuracy", "best_epoch", "curves"):
        assert redone[key] == clean[key], key


def test_make_clean_keeps_caches_runs_results_data_and_tables_installs_nothing():
    """make's own dry run: `clean` removes the demo's and the tests' outputs only; `tables`
    runs no pip (matplotlib comes from requirements.txt)."""
    dry = lambda target: subprocess.run(["make", "-n", "-o", "venv", "-o", ".venv/.installed",
                                         target], cwd=HERE, capture_output=True, text=True).stdout
    removed = [w for line in dry("clean").splitlines() if line.startswith("rm ") for w in line.split()[2:]]
    assert removed and not {"cache", "runs", "results", "data", "data/domainnet"} & set(removed)
    assert "pip" not in dry("tables")
    assert any(line.startswith("matplotlib==") for line in (HERE / "requirements-lab.txt").read_text().splitlines())


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


def test_bench_decode_counts_run_the_package_command_and_match_their_closed_forms(tmp_path, capsys):
    """make bench's decode count (2 seeds, 1 weak epoch, n_train + n_test images): without pixel
    caches each seed decodes D_train and D_test, CLIP's features D_test once: 2 (n_train + n_test)
    + n_test; with the eval cache D_test is decoded once for it: 2 n_train + 2 n_test; with the
    train cache too, every image once plus CLIP's pass: n_train + 2 n_test."""
    from w2s_clip_lab import bench
    per_image, (n_train, n_test) = bench.decode_counts(tmp_path, seeds=2, epochs=1)
    n = n_train + n_test
    assert list(per_image.values()) == pytest.approx([(2 * n + n_test) / n, (2 * n_train + 2 * n_test) / n,
                                                       (n_train + 2 * n_test) / n])


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


def test_the_file_imports_nothing_of_the_project_and_the_package_builds_on_it():
    """w2s_clip.py imports only torch, torchvision, open_clip, timm, tqdm, PIL and the standard
    library, and nothing of the project anywhere (main included); in w2s_clip_lab the imports
    have no circle and no module writes a second protocol loop (none calls protocol_splits or
    run_method: the package's command runs the file's `run_experiment`); two .py files at the
    top; `import w2s_clip` loads nothing of the package; pyproject.toml packages both."""
    import ast
    import tomllib
    assert sorted(p.name for p in HERE.glob("*.py")) == ["test_w2s_clip.py", "w2s_clip.py"]
    allowed = {"torch", "torchvision", "open_clip", "timm", "tqdm", "PIL"} | set(sys.stdlib_module_names)
    tree = ast.parse((HERE / "w2s_clip.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert {n.split(".")[0] for n in names} <= allowed, names
    assert project_imports(HERE / "w2s_clip.py") == []
    package = sorted((HERE / "w2s_clip_lab").glob("*.py"))
    graph = {p.stem: {m.split(".")[1] for _, m in project_imports(p) if m.startswith("w2s_clip_lab.")}
             for p in package}
    for p in package:
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                  for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call)}
        assert not called & {"protocol_splits", "run_method"}, p.name
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


def test_python_w2s_clip_py_loads_nothing_of_the_package(tmp_path):
    """`python w2s_clip.py` with the package beside it: Python's import log names no module of
    w2s_clip_lab, and a user's mistake still ends in its one line."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "w2s_clip.py", "--data-root",
                           str(tmp_path / "none"), "--device", "cpu", "--out-dir", str(tmp_path / "o"),
                           "--cache-dir", str(tmp_path / "c"), "--weak-model", "test_resnet"],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert imported and not [m for m in imported if m.startswith("w2s_clip")], imported
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: data root")


@pytest.mark.parametrize("flag, bad", [("--train-image-cache", "-3"), ("--train-image-cache", "x"),
                                       ("--split-share", "1.5"), ("--cpe-k", "0"),
                                       ("--dataset", "imagenet")])
def test_the_package_flags_refuse_bad_values_in_one_line(capsys, flag, bad):
    """The package's own flags, added to the file's parser, report a bad value as the file's do."""
    with pytest.raises(SystemExit) as e:
        w2s_clip.parse_args([flag, bad], run.build_parser())
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"error: argument {flag}: ") and len(err.splitlines()) == 1


def test_the_file_and_the_package_give_the_same_numbers_and_share_runs_and_caches(demo, tmp_path):
    """On a generated DomainNet-format folder, `python w2s_clip.py` and `python -m w2s_clip_lab.run`
    (pixel caches on, thorough preflight, CMM and a box per seed added) write identical metrics
    for weak, zero-shot, ceiling, kd-lp, ce-tp and cpl; and each finds the other's runs and caches
    under the same keys: no "other settings" refusal, no cache entry computed again."""
    methods = ["weak", "zero-shot", "ceiling", "kd-lp", "ce-tp", "cpl"]
    env_log = tmp_path / "computed.log"
    runs = {}
    for name, entry in (("file", FILE), ("package", PACKAGE)):
        args = cli_args(demo, demo / "data", tmp_path / name, tmp_path / f"cache-{name}",
                        **{"--method": methods, "--tau-grid": ["0.01", "1"]})
        proc = run_cli(args, entry)
        assert proc.returncode == 0, proc.stderr
        runs[name] = {m: json.loads((tmp_path / name / "sketch" / m / "seed0" / "results.json").read_text())
                      for m in methods}
    keys = ("test_accuracy", "weak_test_accuracy", "weak_label_accuracy_hold", "worst10_accuracy",
            "per_class_accuracy", "agreement_with_weak", "predictions", "d_test_index", "tuned",
            "curves", "settings", "settings_key")
    for m in methods:
        for key in keys:
            assert runs["file"][m].get(key) == runs["package"][m].get(key), (m, key)
    tuning = lambda r: [{k: v for k, v in row.items()} for row in r["tuning"]]  # noqa: E731
    assert tuning(runs["file"]["cpl"]) == tuning(runs["package"]["cpl"])
    assert "cmm" in runs["package"]["cpl"] and "cmm" not in runs["file"]["cpl"]  # the package adds its own
    for out, cache, entry in (("file", "cache-file", PACKAGE), ("package", "cache-package", FILE)):
        args = cli_args(demo, demo / "data", tmp_path / out, tmp_path / cache,
                        **{"--method": methods, "--tau-grid": ["0.01", "1"]})
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "W2S_CLIP_CACHE_LOG": str(env_log)}
        proc = subprocess.run([sys.executable, *entry, *args], cwd=HERE, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and "all runs exist" in proc.stdout, proc.stderr
        fresh = tmp_path / f"again-{out}"
        proc = subprocess.run([sys.executable, *entry, *cli_args(demo, demo / "data", fresh, tmp_path / cache,
                                                                 **{"--method": ["weak", "cpl"]})],
                              cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    computed = env_log.read_text().splitlines() if env_log.exists() else []
    assert not [line for line in computed if "weak-" in line or "clip-" in line], computed


def test_console_scripts_and_python_m_w2s_clip_lab(tmp_path):
    """Each [project.scripts] entry of pyproject.toml, run as its console script would be (without
    installing), prints its help and exits 0: the file's command lists no package flag, the
    package's lists them; `python -m w2s_clip_lab` lists the package's commands, each a module
    with a `main`, and exits 0."""
    import importlib
    import tomllib
    scripts = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"w2s-clip", "w2s-clip-lab"}
    for name, target in scripts.items():
        module, function = target.split(":")
        code = f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {function}; {function}()"
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "--data-root" in proc.stdout, proc.stderr
        assert ("--dataset" in proc.stdout) == (name == "w2s-clip-lab"), name
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab"], cwd=HERE, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.startswith("  ")]
    assert {"run", "grid", "miniature", "regret", "bench", "gpu_check", "weights"} <= set(listed)
    for name in listed:
        assert callable(importlib.import_module(f"w2s_clip_lab.{name}").main), name


def test_first_per_class_keeps_each_class_first_n_in_order():
    indices = torch.tensor([7, 3, 9, 1, 4, 8, 0])
    labels = torch.tensor([0, 1, 0, 1, 0, 2, 1, 0, 1, 2])  # labels of images 0..9
    # classes of the indices in order: 0, 1, 2, 1, 0, 1, 0 -> the first two of each
    assert run.first_per_class(indices, labels, 2).tolist() == [7, 3, 9, 1, 4]
    assert run.first_per_class(indices, labels, 5).tolist() == indices.tolist()


def test_cli_hold_train_per_class_trains_heads_on_fewer_images_only(demo, tmp_path):
    """--hold-train-per-class 2: the heads see each class's first 2 hold-train images; D'_test,
    the weak model and its logits are the full run's; the flag is in the run's settings, and a
    run without it keeps the file's settings (no such key)."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    full = run_cli(cli_args(demo, demo / "data", out / "full", cache), PACKAGE)
    few = run_cli(cli_args(demo, demo / "data", out / "few", cache,
                           **{"--hold-train-per-class": "2"}), PACKAGE)
    assert full.returncode == 0 and few.returncode == 0, few.stderr
    r = {k: json.loads((out / k / "sketch" / "cpl" / "seed0" / "results.json").read_text())
         for k in ("full", "few")}
    assert r["full"]["n_hold_train"] == 51 and r["few"]["n_hold_train"] == 4 * 2
    assert r["few"]["d_test_index"] == r["full"]["d_test_index"]
    assert r["few"]["weak_test_accuracy"] == r["full"]["weak_test_accuracy"]
    assert r["few"]["settings"]["hold_train_per_class"] == 2
    assert "hold_train_per_class" not in r["full"]["settings"]
    assert "weak_input_size" not in r["full"]["settings"]


def test_weak_input_size_sets_timm_transforms_and_refuses_hugging_face():
    from PIL import Image
    from w2s_clip_lab import hf
    model, train_tf, eval_tf = hf.load_weak_model("test_resnet", 4, pretrained=False, input_size=32)
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    assert eval_tf(image).shape == train_tf(image).shape == (3, 32, 32)
    _, _, own = hf.load_weak_model("test_resnet", 4, pretrained=False)
    assert own(image).shape == (3, 160, 160)  # test_resnet's own input size
    with pytest.raises(w2s_clip.UserError, match="--weak-input-size 32: timm weak models only"):
        hf.load_weak_model("hf:microsoft/resnet-18", 4, pretrained=False, input_size=32)
    with pytest.raises(w2s_clip.UserError, match="test_coatnet cannot run at --weak-input-size 32"):
        hf.load_weak_model("test_coatnet", 4, pretrained=False, input_size=32)  # fixed-size tables
