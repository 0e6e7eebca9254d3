"""Tests for w2s_clip_lab/store.py: caches, atomic writes, locks, pixel caches, settings and results; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import w2s_clip
from w2s_clip_lab import checks, datasets, files, hf, run, store
from conftest import cli_args, corrupt_copy, folder_copy, good_result, main_error, varied_images
from test_w2s_clip import record_disk_events


def test_cached_computes_once_then_loads_and_leaves_no_temporary_files(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"feats": torch.arange(6.0).view(2, 3), "n": torch.tensor(len(calls))}

    path = tmp_path / "sub" / "feats.pt"
    first = files.cached(path, compute)
    second = files.cached(path, compute)
    assert len(calls) == 1
    assert torch.equal(second["feats"], first["feats"]) and second["n"].item() == 1
    assert files.cached(path, compute, force=True)["n"].item() == 2 and len(calls) == 2
    assert sorted(os.listdir(path.parent)) == [".feats.pt.lock", "feats.pt"]  # no .tmp left behind


def test_atomic_save_json_and_overwrite(tmp_path):
    path = tmp_path / "r.json"
    files.atomic_save({"a": 1, "p": Path("x")}, path)
    files.atomic_save({"a": 2, "p": Path("y")}, path)
    assert json.loads(path.read_text()) == {"a": 2, "p": "y"}
    assert os.listdir(tmp_path) == ["r.json"]


def test_cache_key_changes_with_every_part():
    base = dict(model="resnet18", seed=0, lr=1e-3, root="/data", pretrained=True, splits="abc")
    key = files.cache_key(**base)
    assert key == files.cache_key(**dict(reversed(list(base.items()))))  # order-free
    changed = dict(model="resnet50", seed=1, lr=1e-4, root="/data2", pretrained=False, splits="abd")
    for name, value in changed.items():
        assert files.cache_key(**{**base, name: value}) != key, name
    assert files.cache_key(**base, extra=None) != key


def test_folder_images_are_checked_once_per_data_folder(demo, tmp_path, monkeypatch):
    """Writing a folder's split files and the run itself share one stamped image check: the first
    command opens every image's header once, a second command not at all."""
    root = folder_copy(demo, tmp_path)
    calls = []
    real = checks.check_images
    monkeypatch.setattr(store, "check_images",  # as check_images_once calls it
                        lambda r, p, **kw: calls.append(len(p)) or real(r, p, **kw))
    for seed in ("0", "1"):
        run.main([str(a) for a in cli_args(demo, root, tmp_path / "out", tmp_path / "cache",
                                                 **{"--dataset": "folder", "--method": "weak",
                                                    "--seeds": seed})])
    assert calls == [(8 + 20) * 4]


@pytest.mark.parametrize("short", [10 ** 6, 24])
def test_pixel_cache_holds_each_image_as_decoded_and_resized(tmp_path, short):
    """Each cached image equals PIL's decode (then its bicubic resize to the short side, never
    enlarged), whatever its size; no temporary file is left."""
    import numpy as np
    from PIL import Image
    paths = varied_images(tmp_path / "img")
    prepare, out_size = store.short_side(short)
    cache = store.build_pixel_cache(tmp_path / "c" / "px", tmp_path / "img", paths, prepare, out_size)
    assert len(cache) == len(paths)
    for i, rel in enumerate(paths):
        image = Image.open(tmp_path / "img" / rel).convert("RGB")
        w, h = image.size
        want = image if min(w, h) <= short else image.resize(
            (round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BICUBIC)
        assert min(cache[i].size) == min(min(w, h), short)
        assert np.array_equal(np.asarray(cache[i]), np.asarray(want))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".px.u8.lock", "px.idx.pt", "px.u8"]


@pytest.mark.parametrize("damage", ["truncate", "no-index", "other-count"])
def test_damaged_pixel_cache_is_rebuilt(tmp_path, damage):
    import numpy as np
    paths = varied_images(tmp_path / "img")
    prepare, out_size = store.short_side(10 ** 6)
    stem = tmp_path / "c" / "px"
    first = store.build_pixel_cache(stem, tmp_path / "img", paths, prepare, out_size)
    want = [np.asarray(first[i]) for i in range(len(paths))]
    if damage == "truncate":
        os.truncate(f"{stem}.u8", 100)
    elif damage == "no-index":
        os.remove(f"{stem}.idx.pt")
    assert not store.PixelCache(stem).valid(len(paths) + (damage == "other-count"))
    n = len(paths) - (damage == "other-count")
    again = store.build_pixel_cache(stem, tmp_path / "img", paths[:n], prepare, out_size)
    assert all(np.array_equal(np.asarray(again[i]), want[i]) for i in range(n))
    assert store.PixelCache(stem).valid(n)


def test_eval_pixel_cache_gives_the_eval_transform_bit_for_bit(demo, tmp_path):
    """timm's eval transform cut at its tensor conversion: the cached crops plus the rest give the
    same tensors as the whole transform on the decoded file; open_clip's preprocessing can be cut
    too; a Hugging Face processor cannot (None)."""
    data = datasets.load_domain(demo / "data", "sketch")
    _, _, eval_tf = w2s_clip.create_weak_model("test_resnet", 4, pretrained=False)
    pre, post, (h, w) = store.eval_pixel_steps(eval_tf)
    paths, labels = data["test_paths"][:12], data["test_labels"][:12]
    cache = store.build_pixel_cache(tmp_path / "px", demo / "data", paths, pre, lambda *_: (w, h))
    plain = datasets.ImageList(demo / "data", paths, labels, eval_tf)
    cached = datasets.ImageList(demo / "data", paths, labels, post, pixels=cache)
    for i in range(len(paths)):
        assert torch.equal(plain[i][0], cached[i][0]) and plain[i][1] == cached[i][1]
    _, preprocess, _ = w2s_clip.load_clip(str(demo / "tiny-clip.json"), None)
    assert store.eval_pixel_steps(preprocess) is not None
    assert store.eval_pixel_steps(hf.HFEvalTransform(None)) is None


def test_decodes_per_image_reach_one_with_the_caches(demo, tmp_path, monkeypatch):
    """Counted in process: weak training and weak logits over two seeds decode
    seeds * (epochs * n_train + n_test) images without the caches, n_train + n_test with them
    (each image once); the weak logits are the same tensors."""
    decodes = []
    real = datasets.decode_image
    for module in (w2s_clip, store):  # ImageList's and the pixel cache's
        monkeypatch.setattr(module, "decode_image", lambda path: decodes.append(path) or real(path))
    n_train, n_test, epochs, seeds = 8 * 4, 20 * 4, 2, 2
    logits = {}
    for name, flags in (("plain", ["--no-eval-image-cache"]),
                        ("cached", ["--train-image-cache", "1000"])):
        decodes.clear()
        run.main([str(a) for a in cli_args(demo, demo / "data", tmp_path / name, tmp_path / f"c-{name}",
                                                **{"--method": "weak", "--seeds": ["0", "1"],
                                                   "--weak-epochs": str(epochs)})] + flags)
        logits[name] = sorted((p.name, torch.load(p)) for p in (tmp_path / f"c-{name}").glob("*logits.pt"))
        assert len(decodes) == {"plain": seeds * (epochs * n_train + n_test),
                                "cached": n_train + n_test}[name]
    assert len(set(decodes)) == n_train + n_test
    assert all(torch.equal(a[1], b[1]) for a, b in zip(logits["plain"], logits["cached"]))


def test_run_settings_change_with_what_shapes_a_result(tmp_path):
    """The resume check's hash moves with the device type, the precision, the split files and the
    data's real path, not with run-only flags (seeds, method, out-dir, --workers: augmentation is
    seeded per sample) or the device index."""
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    args = lambda *extra: w2s_clip.parse_args(["--data-root", str(tmp_path / "data"),
                                               "--clip-pretrained", "none", *extra])
    key = lambda a, digest="d1", device="cpu", precision="fp32": store.run_settings(
        a, {"digest": digest}, device, precision)
    base = key(args())
    assert key(args("--seeds", "3", "--method", "kd-lp", "--out-dir", "x")) == base
    assert key(args("--data-root", str(tmp_path / "link"))) == base
    assert key(args(), device="cuda:0") == key(args(), device="cuda") != base
    assert key(args(), digest="d2") != base
    assert key(args("--workers", "3")) == key(args("--workers", "0")) == base
    assert key(args(), device="cuda", precision="bf16") != key(args(), device="cuda", precision="fp16")
    assert key(args("--tau", "0.5")) != base


def test_cache_log_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("W2S_CLIP_CACHE_LOG", str(tmp_path / "no-such-folder" / "log"))
    assert files.cached(tmp_path / "x.pt", lambda: torch.ones(2)).sum() == 2
    assert "warning: W2S_CLIP_CACHE_LOG" in capsys.readouterr().err


def test_atomic_save_removes_its_temporary_file_and_stale_ones(tmp_path, monkeypatch):
    """torch.save raising OSError(ENOSPC) leaves no temporary file and says 'no space'; stale
    temporary files of dead processes are removed, those of live ones and other files kept."""
    import errno
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".feats.pt.{dead}.tmp"
    live = tmp_path / f".feats.pt.{os.getppid()}.tmp"  # pytest's parent is alive
    mine = tmp_path / ".notes.tmp"
    for p in (stale, live, mine):
        p.write_bytes(b"partial")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(w2s_clip.UserError, match=f"no space left on {tmp_path}"):
        files.atomic_save({"x": torch.zeros(3)}, tmp_path / "feats.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])
    monkeypatch.undo()
    files.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])


def test_run_settings_relative_and_absolute_paths_are_one_setting(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(demo)
    args = lambda config, data: w2s_clip.parse_args(["--data-root", data, "--clip-model", config,
                                                     "--clip-pretrained", "none"])
    data = {"digest": "d1"}
    relative = store.run_settings(args("tiny-clip.json", "data"), data, "cpu")
    absolute = store.run_settings(args(str(demo / "tiny-clip.json"), str(demo / "data")), data, "cpu")
    assert relative == absolute and relative["clip_model"] == os.path.realpath(demo / "tiny-clip.json")
    assert store.settings_key(relative) == store.settings_key(json.loads(json.dumps(absolute)))


def test_a_result_is_stale_only_when_a_setting_it_depends_on_changes():
    """Another loss's hyperparameter or grid, the text tower's lr outside cpl-text and the head's lr
    for the weak model leave a result valid; its own ones do not; a flag missing from an older
    file counts at its default (valid while the new run keeps that default)."""
    args = w2s_clip.parse_args([])
    base = json.loads(json.dumps({k: v for k, v in vars(args).items()
                                  if k not in store.RUN_FLAGS}, default=str))
    key = store.settings_key

    def stale(method, **change):
        return key(base, method) != key({**base, **change}, method)
    assert not stale("kd-lp", tau_grid=[0.1]) and stale("cpl", tau_grid=[0.1])
    assert not stale("cpl", kd_temperature=2.0) and stale("kd-lp", kd_temperature=2.0)
    assert stale("adaptconf-tp", kd_temperature=2.0) and not stale("auxconf-lp", kd_temperature=2.0)
    assert stale("auxconf-tp", aux_alpha_grid=[0.5]) and not stale("ce-lp", aux_alpha_grid=[0.5])
    assert not stale("cpl", text_lr=1e-4) and stale("cpl-text", text_lr=1e-4)
    assert not stale("cpl", ceiling_data="hold-train") and stale("ceiling", ceiling_data="hold-train")
    assert not stale("weak", lr=0.5, tau=0.1) and stale("weak", weak_lr=0.5) and stale("cpl", lr=0.5)
    older = {k: v for k, v in base.items() if k != "cpl_kl"}  # made before --cpl-kl existed
    assert key(older, "cpl") == key(base, "cpl") != key({**base, "cpl_kl": "printed"}, "cpl")
    assert "cpl_kl: summand -> printed" == store.describe_difference(
        older, {**base, "cpl_kl": "printed"}, method="cpl")


def test_image_stats_digest_notices_replaced_images(demo, tmp_path):
    """The data key moves when an image is rewritten (size) or touched (mtime), not otherwise."""
    data = corrupt_copy(demo, tmp_path)
    paths = datasets.read_split_file(data / "sketch_test.txt")[0]
    base = store.image_stats_digest(data, paths)
    assert store.image_stats_digest(data, paths) == base
    image = data / paths[3]
    image.write_bytes(image.read_bytes() + b"\0")
    grown = store.image_stats_digest(data, paths)
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert len({base, grown, store.image_stats_digest(data, paths)}) == 3


def test_a_result_written_meanwhile_with_other_settings_is_kept(demo, tmp_path, monkeypatch):
    """Another command writes the same cell, with other settings, while this one trains: at its
    write this one sees it (under the lock), keeps it and stops with one line naming both."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    path = out / "sketch" / "cpl" / "seed0" / "results.json"
    foreign = {"domain": "sketch", "method": "cpl", "seed": 0, "test_accuracy": 0.5,
               "worst10_accuracy": 0.5, "config": {"weak_model": "x", "clip_model": "y"},
               "settings": {"lr": 123.0}}
    real = w2s_clip.run_method

    def concurrent(method, *a, **k):
        result = real(method, *a, **k)
        if method == "cpl":
            files.atomic_save(foreign, path)
        return result
    monkeypatch.setattr(w2s_clip, "run_method", concurrent)  # as run_and_save calls it
    main_error(cli_args(demo, demo / "data", out, cache, **{"--tune": "none"}),
               str(path), "another command", "lr: 123.0 -> 0.01")
    assert json.loads(path.read_text()) == foreign


def test_results_with_extra_keys_are_read():
    r = {**good_result(), "a_key_of_a_later_version": [1, 2, 3]}
    assert store.result_problems(r) == []


def test_file_lock_on_a_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "runs" / "results.json"
    with files.file_lock(path):
        files.atomic_save({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert "cannot lock" in capsys.readouterr().err


def test_atomic_save_never_replaces_a_link(tmp_path):
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("{}")
    link.symlink_to(target)
    with pytest.raises(w2s_clip.UserError, match="symbolic link"):
        files.atomic_save({"a": 1}, link)
    assert link.is_symlink() and target.read_text() == "{}" and not list(tmp_path.glob("*.tmp"))


def test_a_run_whose_results_json_is_a_link_is_refused_before_training(demo, tmp_path):
    """--force over a results.json that is a link to the user's file: one line before any work,
    the link and its target as they were."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": true}')
    path = store.result_path(out, "sketch", "weak", 0)
    path.parent.mkdir(parents=True)
    path.symlink_to(mine)
    main_error(cli_args(demo, demo / "data", out, cache, **{"--method": "weak"}) + ["--force"],
               str(path), "symbolic link")
    assert path.is_symlink() and mine.read_text() == '{"mine": true}'
    assert not list(Path(cache).glob("weak-*"))


def test_a_temporary_file_of_another_machine_sharing_the_folder_is_kept_until_stale(tmp_path):
    """Two nodes writing one cache over NFS: node A's `.x.<pid>@nodeA.tmp` is not removed by this
    machine for want of that pid here (a job is writing it); once a day untouched, it is."""
    import socket
    import time
    fresh = tmp_path / ".clip-x.pt.4242@another-node.example.tmp"
    stale = tmp_path / ".clip-y.pt.4242@another-node.example.tmp"
    mine_dead = tmp_path / f".clip-z.pt.999999999@{socket.gethostname()}.tmp"
    for f in (fresh, stale, mine_dead):
        f.write_bytes(b"half")
    day_ago = time.time() - 2 * 86400
    os.utime(stale, (day_ago, day_ago))
    files.remove_stale_temps(tmp_path)
    assert fresh.exists() and not stale.exists() and not mine_dead.exists()
    assert files.temp_path(tmp_path / "a.json").name == \
        f".a.json.{os.getpid()}@{socket.gethostname()}.tmp"


def test_a_job_killed_while_holding_a_cache_lock_leaves_it_free(tmp_path):
    """kill -9 of a process inside `file_lock`: the system releases the flock, the next process
    computes the entry, and no temporary file is left."""
    import signal
    import time
    path = tmp_path / "entry.pt"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom w2s_clip_lab import files\n"
        "with files.file_lock(sys.argv[1]):\n"
        "    print('held', flush=True); time.sleep(600)\n"), str(path)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        start = time.time()
        got = files.cached(path, lambda: torch.arange(3))
        assert torch.equal(got, torch.arange(3)) and time.time() - start < 10
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        holder.kill()


def test_a_file_size_limit_during_the_pixel_cache_is_one_line_and_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    """EFBIG (`ulimit -f`, a quota) half-way through the pixel cache's data file."""
    import builtins
    import errno
    paths = varied_images(tmp_path / "img")
    prepare, out_size = store.short_side(10 ** 6)

    class Limited:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4000:
                raise OSError(errno.EFBIG, "File too large")
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    def limited_open(p, mode="r", **kwargs):  # the data file's writes only
        f = builtins.open(p, mode, **kwargs)
        return Limited(f) if str(p).endswith(".tmp") and ".u8." in str(p) else f
    monkeypatch.setattr(store, "open", limited_open, raising=False)
    with pytest.raises(w2s_clip.UserError, match="File too large") as info:
        store.build_pixel_cache(tmp_path / "c" / "px", tmp_path / "img", paths, prepare, out_size)
    assert "px.u8" in str(info.value) and "--cache-dir" in str(info.value)
    assert not list((tmp_path / "c").glob("*.tmp")) and not (tmp_path / "c" / "px.u8").exists()


def test_a_full_disk_when_saving_a_run_leaves_neither_its_log_nor_a_temporary_file(tmp_path, monkeypatch):
    """head.pt cannot be written: no results.json, no epochs.csv, no `.epochs.csv.*.tmp`."""
    path = store.result_path(tmp_path, "sketch", "cpl", 0)
    with store.epochs_log(path) as on_epoch:
        on_epoch({"epoch": 0, "step": 0, "loss": 1.0})
    real = files.atomic_save

    def full(obj, p):
        if Path(p).name == "head.pt":
            raise w2s_clip.UserError(f"no space left on {Path(p).parent} (writing head.pt)")
        return real(obj, p)
    monkeypatch.setattr(w2s_clip, "atomic_save", full)  # as save_run calls it
    with pytest.raises(w2s_clip.UserError, match="no space left"):
        store.save_run(path, good_result(), {"w": torch.zeros(1)}, {})
    assert sorted(p.name for p in path.parent.iterdir()) == [".results.json.lock"]


def test_a_full_disk_while_the_epochs_log_is_written_names_the_log(tmp_path, monkeypatch):
    import builtins
    import errno
    path = store.result_path(tmp_path, "sketch", "cpl", 0)

    class Full:
        def __init__(self, f):
            self.f, self.rows = f, 0

        def write(self, text):
            self.rows += 1
            if self.rows > 2:  # the header and one row fit
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(w2s_clip, "open", lambda p, mode="r", **k: Full(builtins.open(p, mode, **k)),
                        raising=False)
    with pytest.raises(w2s_clip.UserError, match="epochs.csv") as info:
        with store.epochs_log(path) as on_epoch:
            on_epoch({"epoch": 0})
            on_epoch({"epoch": 1})
    assert "No space left" in str(info.value) and not list(path.parent.glob("*.tmp"))


def test_two_data_sets_in_one_out_dir_are_one_line_naming_the_difference(demo, tmp_path):
    """A folder data set's run of domain sketch, then DomainNet's sketch into the same --out-dir:
    the finished run is kept and the line names the data set and what to do."""
    out = tmp_path / "runs"
    root = folder_copy(demo, tmp_path)
    mine = {**good_result("weak"), "settings": {**good_result("weak")["settings"], "dataset": "folder",
                                                 "data_root": str(root)}}
    path = store.result_path(out, "sketch", "weak", 0)
    files.atomic_save(mine, path)
    before = path.read_bytes()
    main_error(cli_args(demo, demo / "data", out, tmp_path / "cache", **{"--method": "weak"}),
               str(path), "other settings", "dataset: folder -> (not set)", "--out-dir")
    assert path.read_bytes() == before


def test_zero_shot_and_the_ceiling_are_not_stale_for_flags_they_do_not_use():
    """zero-shot is CPL's head before any step: --lr, --strong-epochs, --select-by, the grids and
    the tuning criterion leave it as it is; the ceiling tunes nothing; both still follow the
    prompt and the weak model's flags (weak_test_accuracy is part of every result)."""
    base = json.loads(json.dumps({k: v for k, v in vars(w2s_clip.parse_args([])).items()
                                  if k not in store.RUN_FLAGS}, default=str))
    key = store.settings_key

    def stale(method, **change):
        return key(base, method) != key({**base, **change}, method)
    for change in ({"lr": 0.3}, {"strong_epochs": 3}, {"tune_by": "weak-kl"}, {"tau_grid": [0.1]},
                   {"select_by": "agreement"}, {"tune": "none"}):
        assert not stale("zero-shot", **change) and stale("cpl", **change), change
    assert stale("zero-shot", prompt_template="a {}") and stale("zero-shot", weak_lr=0.5)
    assert not stale("ceiling", tune_by="weak-kl") and stale("ceiling", lr=0.3)


def test_the_package_writers_flush_each_file_before_its_rename_and_the_folder_after(demo, tmp_path,
                                                                                  monkeypatch):
    """The pixel cache, the images-checked stamp and the tables (written as a set): every file
    renamed into place had its data flushed to disk first, and its folder is flushed after."""
    from w2s_clip_lab import report
    events = record_disk_events(monkeypatch)
    data = demo / "data"
    paths = [line.split()[0] for line in (data / "sketch_test.txt").read_text().splitlines()[:3]]
    prepare, out_size = store.short_side(16)
    store.build_pixel_cache(tmp_path / "pixels", str(data), paths, prepare, out_size)
    store.check_images_once(str(data), paths, tmp_path / "cache", "sketch")
    report.save_together({"table2.md": "| a |\n", "runs.csv": "a\n"}, tmp_path / "tables")
    renamed = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    finals = {e[2] for _, e in renamed}
    assert {Path(f).name for f in finals} >= {"pixels.u8", "pixels.idx.pt", "table2.md", "runs.csv"}
    assert any(Path(f).name.startswith("images-checked-sketch-") for f in finals)
    flushed = set()
    for i, e in enumerate(events):
        if e[0] == "fsync":
            flushed.add(e[1])
        else:  # a rename: its source's data were flushed before it, its folder is flushed after it
            assert e[1] in flushed or any(r[2] == e[1] for _, r in renamed[:[j for j, _ in renamed].index(i)]), e
            assert ("fsync", os.path.dirname(e[2])) in events[i + 1:], e
