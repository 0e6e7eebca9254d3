"""Tests for datasets_w2s_clip.py: split files, image loading and the other layouts; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import json
import shutil

import pytest
import torch

import datasets_w2s_clip
import w2s_clip
from conftest import (DEMO_NAMES, assert_user_error, cli_args, corrupt_copy, folder_copy, run_cli,
                      tree_digest)


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


def test_split_files_with_a_byte_order_mark_read_like_without(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    for split in ("train", "test"):
        path = data / f"sketch_{split}.txt"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    plain, bom = datasets_w2s_clip.load_domain(demo / "data", "sketch"), datasets_w2s_clip.load_domain(data, "sketch")
    for key in ("train_paths", "test_paths", "classnames"):
        assert bom[key] == plain[key], key
    assert torch.equal(bom["train_labels"], plain["train_labels"])


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
