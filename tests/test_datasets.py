"""Tests for w2s_clip_lab/datasets.py: split files, image loading and the other layouts; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import json
import shutil

import pytest
import torch

import w2s_clip
from w2s_clip_lab import datasets
from conftest import (DEMO_NAMES, assert_user_error, cli_args, corrupt_copy, folder_copy, run_cli,
                      tree_digest)


def test_read_split_file_keeps_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "sketch_train.txt"
    path.write_text("sketch/aircraft_carrier/x.jpg 0\nsketch/zebra/b.jpg 1\n\n"
                    "sketch/aircraft_carrier/a.jpg 0\nsketch/The_Eiffel_Tower/e f.jpg 2\n")
    paths, labels = datasets.read_split_file(path)
    assert paths == ["sketch/aircraft_carrier/x.jpg", "sketch/zebra/b.jpg",
                     "sketch/aircraft_carrier/a.jpg", "sketch/The_Eiffel_Tower/e f.jpg"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 0, 2]


def test_classnames_follow_label_order_not_sorted_order():
    paths = ["sketch/apple/1.jpg", "sketch/zebra/2.jpg", "sketch/The_Eiffel_Tower/3.jpg",
             "sketch/zebra/4.jpg"]
    names = datasets.classnames_from_splits(paths, torch.tensor([1, 0, 2, 0]))
    assert names == ["zebra", "apple", "The Eiffel Tower"]


@pytest.mark.parametrize("labels", [[0, 2], [0, -1], [1, 1]], ids=["gap", "negative", "no-zero"])
def test_classnames_reject_labels_outside_range(labels):
    with pytest.raises(w2s_clip.UserError, match="label"):
        datasets.classnames_from_splits(["s/apple/1.jpg", "s/zebra/2.jpg"], torch.tensor(labels))


def test_read_split_file_missing_or_empty(tmp_path):
    with pytest.raises(w2s_clip.UserError, match="not found"):
        datasets.read_split_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(w2s_clip.UserError, match="empty"):
        datasets.read_split_file(tmp_path / "empty.txt")


@pytest.mark.parametrize("bad", ["sketch/zebra/x.jpg", "x.jpg 1", "sketch/zebra/x.jpg one",
                                 "sketch/zebra/x.jpg 1.5", "sketch/zebra/x.jpg --1"])
def test_read_split_file_malformed_line_names_file_and_line(tmp_path, bad):
    """Any malformed line stops with a UserError naming `<file>:<lineno>`, never a ValueError."""
    path = tmp_path / "sketch_test.txt"
    path.write_text(f"sketch/zebra/a.jpg 0\n\nsketch/zebra/b.jpg 0\n{bad}\n")
    with pytest.raises(w2s_clip.UserError) as info:
        datasets.read_split_file(path)
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
    assert proc.returncode == 1 and "--domain" in proc.stderr and "--dataset officehome" in proc.stderr


def test_split_files_with_a_byte_order_mark_read_like_without(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    for split in ("train", "test"):
        path = data / f"sketch_{split}.txt"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    plain, bom = datasets.load_domain(demo / "data", "sketch"), datasets.load_domain(data, "sketch")
    for key in ("train_paths", "test_paths", "classnames"):
        assert bom[key] == plain[key], key
    assert torch.equal(bom["train_labels"], plain["train_labels"])


def test_image_list_augmentation_is_seeded_per_sample_and_epoch(demo):
    """The same (seed, epoch, image) gives the same augmented tensor whatever was drawn before;
    another epoch gives another draw; the global RNGs are left as they were."""
    import random
    import timm
    paths, labels = datasets.read_split_file(demo / "data" / "sketch_train.txt")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=True)
    ds = datasets.ImageList(demo / "data", paths, labels, tf, seed=7)
    n = len(ds)
    first = ds[3][0]
    torch.manual_seed(123)
    random.seed(5)
    state = (torch.get_rng_state(), random.getstate())
    assert torch.equal(ds[3][0], first)  # after other draws
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert not torch.equal(ds[n + 3][0], first)  # epoch 1 of image 3
    # the draw is what torch.manual_seed and random.seed of the sample's seed give (the CPU
    # generator is all the transforms use), and no CUDA seeding is queued per image
    import hashlib
    sample_seed = int(hashlib.sha1(b"7 0 3").hexdigest()[:15], 16)
    image = datasets.decode_image(str(demo / "data" / paths[3]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        assert torch.equal(tf(image), first)
    calls = []
    original = torch.cuda.manual_seed_all
    torch.cuda.manual_seed_all = lambda seed: calls.append(seed)
    try:
        assert torch.equal(ds[3][0], first) and calls == []
    finally:
        torch.cuda.manual_seed_all = original
    sampler = datasets.EpochSampler(n, seed=0)
    e0, e1 = list(sampler), list(sampler)
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n, 2 * n)) and e0 != [i - n for i in e1]


# ------------------------------------------------------------------------------------------------
# One image, one class: paths compared after normalisation, class folders that name one class
# ------------------------------------------------------------------------------------------------
def respelled(path, spelling, data):
    """`path` (`sketch/<class>/<file>`) written another way that names the same file."""
    domain, cls, name = path.split("/")
    return {"dot": f"./{path}", "dotdot": f"{domain}/{cls}/../{cls}/{name}",
            "double-slash": f"{domain}//{cls}/{name}",
            "absolute-real": str(data.resolve() / path),
            "linked-folder": f"alias/{cls}/{name}"}[spelling]


@pytest.mark.parametrize("spelling", ["dot", "dotdot", "double-slash", "absolute-real",
                                      "linked-folder"])
def test_an_image_in_train_and_test_under_two_spellings_is_refused(demo, tmp_path, spelling):
    """A test image listed in the train file as `./sketch/...`, `.../zebra/../zebra/...`,
    `sketch//...`, through the real path of a symlinked data root, or through a linked folder,
    is the same image: one line names both spellings."""
    data = corrupt_copy(demo, tmp_path)
    (data / "alias").symlink_to(data / "sketch")
    link = tmp_path / "link"  # the data root is reached through a link
    link.symlink_to(data)
    test_line = (data / "sketch_test.txt").read_text().splitlines()[5]
    path, label = test_line.rsplit(" ", 1)
    with open(data / "sketch_train.txt", "a") as f:
        f.write(f"{respelled(path, spelling, data)} {label}\n")
    with pytest.raises(w2s_clip.UserError, match="listed in both") as info:
        datasets.load_domain(str(link), "sketch")
    assert path in str(info.value) and "1 images" in str(info.value)


@pytest.mark.parametrize("spelling", ["dot", "dotdot", "double-slash", "linked-folder"])
def test_an_image_listed_twice_under_two_spellings_in_one_file_is_refused(demo, tmp_path, spelling):
    data = corrupt_copy(demo, tmp_path)
    (data / "alias").symlink_to(data / "sketch")
    lines = (data / "sketch_test.txt").read_text().splitlines()
    path, label = lines[3].rsplit(" ", 1)
    (data / "sketch_test.txt").write_text("\n".join(lines + [f"{respelled(path, spelling, data)} "
                                                             f"{label}"]) + "\n")
    with pytest.raises(w2s_clip.UserError, match="sketch_test.txt") as info:
        datasets.load_domain(data, "sketch")
    assert path in str(info.value) and ("again" in str(info.value) or "both" in str(info.value))


def test_spelled_paths_read_as_the_plain_ones_with_their_class_folder(demo, tmp_path):
    """`./`, `//` and `x/..` in every line give the same paths, labels and class names as the
    plain file (the class is the folder named, not `.`)."""
    data = corrupt_copy(demo, tmp_path)
    for split in ("train", "test"):
        f = data / f"sketch_{split}.txt"
        lines = [line.rsplit(" ", 1) for line in f.read_text().splitlines()]
        f.write_text("".join(f"./{p.replace('/', '//', 1)} {y}\n" if i % 2 else
                             f"{p.replace('/', '/./')} {y}\n" for i, (p, y) in enumerate(lines)))
    plain, spelled = (datasets.load_domain(d, "sketch") for d in (demo / "data", data))
    for key in ("train_paths", "test_paths", "classnames"):
        assert spelled[key] == plain[key], key


def test_file_names_differing_in_case_are_two_images_on_a_case_sensitive_file_system(demo, tmp_path):
    data = corrupt_copy(demo, tmp_path)
    (tmp_path / "probe").touch()
    if (tmp_path / "PROBE").exists():
        pytest.skip("case-insensitive file system")
    path, label = (data / "sketch_test.txt").read_text().splitlines()[0].rsplit(" ", 1)
    upper = path.rsplit("/", 1)[0] + "/" + path.rsplit("/", 1)[1].upper()
    shutil.copy(data / path, data / upper)
    with open(data / "sketch_train.txt", "a") as f:
        f.write(f"{upper} {label}\n")
    got = datasets.load_domain(data, "sketch")
    assert upper in got["train_paths"] and path in got["test_paths"]


def twin_split(tmp_path, order):
    """Split files of 3 classes where folders `t_shirt` (label 1) and `t shirt` (label 2) name
    one class; `order` permutes the lines."""
    rows = [(f"sketch/{c}/{i}.jpg", y) for y, c in enumerate(["zebra", "t_shirt", "t shirt"])
            for i in range(3)]
    rows = [rows[i] for i in order]
    for split, part in (("train", rows[::2]), ("test", rows[1::2])):
        (tmp_path / f"sketch_{split}.txt").write_text("".join(f"{p} {y}\n" for p, y in part))


@pytest.mark.parametrize("seed", range(4))
def test_two_class_folders_that_name_one_class_are_named_whatever_the_line_order(tmp_path, seed):
    """Never `label 2 is outside 0..1`: the line names both folders, the same in every order."""
    import random
    order = list(range(9))
    random.Random(seed).shuffle(order)
    twin_split(tmp_path, order)
    with pytest.raises(w2s_clip.UserError) as info:
        datasets.load_domain(tmp_path, "sketch")
    assert str(info.value).endswith("class folders 't shirt' and 't_shirt' both name the class "
                                    "'t shirt' (`_` is a space, case is ignored as CLIP's "
                                    "tokenizer ignores it); rename or merge one of them")


@pytest.mark.parametrize("labels", [[0, 1], [1, 1]], ids=["two-labels", "one-label"])
def test_class_folders_differing_in_case_name_one_class(labels):
    paths = ["s/zebra/0.jpg", "s/T-shirt/1.jpg", "s/t-shirt/2.jpg"]
    with pytest.raises(w2s_clip.UserError, match="'T-shirt' and 't-shirt' both name"):
        datasets.classnames_from_splits(paths, torch.tensor([labels[0], *labels]))


@pytest.mark.parametrize("layout", ["folder", "officehome"])
def test_a_layout_with_two_folders_of_one_class_is_one_line_naming_them(demo, officehome, tmp_path,
                                                                        layout):
    """Office-Home or a folder data set with `t-shirt` and `T-Shirt` beside it: one line naming the
    folder and both class folders, before any split file is written."""
    if layout == "folder":
        root = folder_copy(demo, tmp_path)
        (root / "classnames.txt").unlink()
        classes = root / "sketch" / "train"
        shutil.copytree(root / "sketch" / "test" / "zebra", root / "sketch" / "test" / "Zebra")
    else:
        root = tmp_path / "oh"
        shutil.copytree(officehome, root)
        classes = root / "Real World"
    shutil.copytree(classes / "zebra", classes / "Zebra")
    before = tree_digest(root)
    domain = "sketch" if layout == "folder" else "Real_World"
    proc = run_cli(cli_args(demo, root, tmp_path / "out", tmp_path / "cache",
                            **{"--dataset": layout, "--domain": domain, "--method": "weak"}))
    assert_user_error(proc, tmp_path / "out", "class folders 'Zebra' and 'zebra' both name")
    assert not (tmp_path / "out" / "splits").exists() and tree_digest(root) == before


@pytest.mark.parametrize("side", ["missing-here", "missing-there"])
def test_officehome_domains_with_other_class_folders_are_one_line(officehome, tmp_path, side):
    """A class folder missing in one domain (an incomplete copy) would shift every later label:
    one line names the class and both domain folders, whichever domain is run."""
    root = tmp_path / "oh"
    shutil.copytree(officehome / "Real World", root / "Real World")
    shutil.copytree(officehome / "Real World", root / "Art")
    shutil.rmtree(root / ("Real World" if side == "missing-here" else "Art") / "zebra")
    with pytest.raises(w2s_clip.UserError, match="class folder zebra is in") as info:
        datasets.officehome_lists(root, "Real_World")
    assert "Art" in str(info.value) and "Real World" in str(info.value)


def test_an_unreadable_image_of_ones_own_folder_is_named_with_what_to_do(demo, tmp_path):
    """Not `make data` alone (which fetches DomainNet): replace or remove the file."""
    from w2s_clip_lab.checks import check_images
    root = folder_copy(demo, tmp_path)
    bad = next((root / "sketch" / "train" / "zebra").iterdir())
    bad.write_bytes(b"")
    with pytest.raises(w2s_clip.UserError, match="replace it or remove it") as info:
        check_images(str(root), [str(bad.relative_to(root))])
    assert str(bad) in str(info.value)


def test_classnames_txt_and_folders_in_other_unicode_normalisations_are_named(tmp_path):
    """classnames.txt in NFC, the folder in NFD (a copy from macOS): they look the same, the line
    says they differ in normalisation."""
    import unicodedata
    folders = [unicodedata.normalize("NFD", "café_crème"), "zebra"]
    (tmp_path / "classnames.txt").write_text("café_crème\nzebra\n", encoding="utf-8")
    with pytest.raises(w2s_clip.UserError, match="Unicode normalisation"):
        datasets.class_order(tmp_path, folders)
