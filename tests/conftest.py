"""Fixtures and helpers of the package's tests: generated data, the command run as a user would,
hand-made results; the tiny models and float64 references are test_w2s_clip.py's own."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

import w2s_clip
from test_w2s_clip import (HERE, LOSS_CASES, LOSS_IDS, PACKED_NAMES, PROMPT_NAMES,  # noqa: F401
                           clip, encode_text_with_context, logits_pair, planted, planted_data,
                           ref_ce_rows, ref_kl_rows, ref_log_softmax, ref_loss, text_towers,
                           tuning_setup)
from w2s_clip_lab import files, miniature, run, store


class ReplaySampler(torch.utils.data.Sampler):
    """Each epoch's order as train_head draws it: torch.randperm from one generator seeded once."""

    def __init__(self, n, seed):
        self.n, self.g = n, torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.g).tolist())


def trainer_fit(tmp_path, head, x, targets, x_val, val_targets, epochs, batch_size, lr, T,
                eval_on_start=False):
    """Train `head` with transformers' own Trainer: eval and save every epoch, the best model by
    eval loss loaded at the end, warm-up ratio 0.1, linear decay, max_grad_norm 1, torch AdamW.
    Returns the chosen epoch (its global step / steps per epoch) and the eval losses per epoch."""
    transformers = pytest.importorskip("transformers")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, features, labels=None):
            logits = self.head(features)
            return {"loss": w2s_clip.kd_loss(logits, labels, T=T), "logits": logits}

    class Trainer(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return ReplaySampler(len(x), seed=0)

    rows = lambda f, t: [{"features": a, "labels": b} for a, b in zip(f, t)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=len(x_val), learning_rate=lr, weight_decay=0.0,
        warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch",
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="loss", eval_on_start=eval_on_start, save_only_model=True,
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_drop_last=False, seed=0)
    trainer = Trainer(model=Model(), args=args, train_dataset=rows(x, targets),
                      eval_dataset=rows(x_val, val_targets))
    trainer.train()
    steps_per_epoch = math.ceil(len(x) / batch_size)
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return trainer.state.best_global_step // steps_per_epoch, losses


DEMO_NAMES = miniature.DEMO_CLASSES[:4]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny synthetic DomainNet-layout domain (4 classes, 8 train / 20 test images each)."""
    root = tmp_path_factory.mktemp("demo")
    miniature.make_synthetic_domainnet(root / "data", domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, size=32, regime="paper-10class")
    (root / "tiny-clip.json").write_text(json.dumps(miniature.TINY_CLIP))
    return root


def cli_args(root, data, out, cache, **overrides):
    flags = {"--data-root": data, "--domain": "sketch", "--method": "cpl", "--seeds": "0",
             "--clip-model": root / "tiny-clip.json", "--clip-pretrained": "none",
             "--weak-model": "test_resnet", "--weak-epochs": "1", "--strong-epochs": "2",
             "--batch-size": "16", "--workers": "0", "--out-dir": out, "--cache-dir": cache}
    flags.update(overrides)
    return ([str(a) for k, v in flags.items() for a in [k, *(v if isinstance(v, list) else [v])]]
            + ["--no-weak-pretrained"])


PACKAGE = ["-m", "w2s_clip_lab.run"]  # the package's command; FILE: w2s_clip.py itself
FILE = ["w2s_clip.py"]


def run_cli(args, entry=PACKAGE):
    """The command `entry` (the package's by default) with `args`, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *entry, *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)


# Data sets beside DomainNet: Office-Home's layout and a folder of one's own
def tree_digest(folder):
    """Every file under `folder`: its relative path, bytes and modification time."""
    return sorted((str(p.relative_to(folder)), p.read_bytes(), p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def officehome(tmp_path_factory):
    """An Office-Home-layout folder: domain "Real World" (spaced, as in the official archive),
    4 classes of 8 + 20 images."""
    root = tmp_path_factory.mktemp("officehome")
    miniature.make_synthetic_domainnet(root, domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, layout="officehome",
                                           regime="paper-10class")
    (root / "sketch").rename(root / "Real World")
    return root


def folder_copy(demo_folder, tmp_path, classnames=True):
    """The fixture's images in the folder layout <root>/sketch/{train,test}/<class>/<image>."""
    root = tmp_path / "mine"
    miniature.make_synthetic_domainnet(root, domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, layout="folder",
                                           regime="paper-10class")
    if not classnames:
        (root / "classnames.txt").unlink()
    return root


# CPE (Shao et al. 2023): templates weighted by their worst-k CMM with pseudo-labels
def planted_templates(seed=0, k=10, d=32, n=2000, noise=1.5, template_noise=0.3, good=3):
    """Images of k classes around unit directions u_c; `good` templates near u_c and a last one
    that names the wrong class (u_{c+1}). Returns (features [n, d], labels [n], embeddings [k, T, d])."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    y = torch.randint(k, (n,), generator=g)
    x = u[y] + noise * torch.randn(n, d, generator=g) / d ** 0.5
    templates = [u + template_noise * torch.randn(k, d, generator=g) / d ** 0.5 for _ in range(good)]
    return x, y, torch.stack(templates + [u.roll(-1, 0)], dim=1)


# Decoding less: the pixel caches
def varied_images(folder, sizes=((40, 30), (31, 57), (64, 64), (5, 9))):
    """PNG images of the given (w, h) sizes with seeded random pixels; their relative paths."""
    import numpy as np
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        from PIL import Image
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(f"{i}.png")
    return paths


def assert_user_error(proc, out, *fragments):
    """Non-zero exit, stderr is one line `error: ...` naming the fragments, no traceback, no results."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not list(Path(out).rglob("results.json"))


def corrupt_copy(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    return data


HF_MEAN, HF_STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random-init transformers ResNet (3 labels) and a ConvNeXt-style image processor
    (shortest edge 32 / crop_pct 0.875, then a 32 x 32 centre crop), saved like a hub checkpoint."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-resnet")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3)
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875,
                                        image_mean=HF_MEAN, image_std=HF_STD).save_pretrained(folder)
    return folder


def record_hub_requests(monkeypatch, module):
    """Make `module.hf_hub_download` record (repo, filename) and answer "no such file"."""
    from huggingface_hub.errors import EntryNotFoundError
    asked = []

    def fake(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise EntryNotFoundError(f"{repo_id}/{filename}")
    monkeypatch.setattr(module, "hf_hub_download", fake)
    return asked


def fake_hub_file(hub_cache, repo, filename, size):
    """A file laid out as huggingface_hub caches it: models--org--name/{refs/main, snapshots/<rev>/}."""
    folder = hub_cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / ("0" * 40) / filename).write_bytes(b"\0" * size)


def write_result(out, domain, method, seed, acc, worst, weak_model="resnet18", init="single",
                 n_classes=None):
    curves = [{"epoch": 1, "step": 3, "train_acc": acc - 0.1, "test_acc": acc - 0.05},
              {"epoch": 2, "step": 6, "train_acc": acc, "test_acc": acc}]
    extra = {} if n_classes is None else {"n_predicted_classes": n_classes}
    files.atomic_save({"domain": domain, "method": method, "seed": seed,
                                "test_accuracy": acc, "worst10_accuracy": worst, "curves": curves,
                                **extra, "config": {"weak_model": weak_model,
                                                    "clip_model": "ViT-B-32", "prototype_init": init}},
                               store.result_path(out, domain, method, seed))


def table_row(text, name):
    """The cells of the markdown row whose first cell is `name`, in the first table of `text`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{text}")


def main_error(argv, *fragments):
    """The package's command in process (`w2s_clip_lab.run.main(argv)`, the file's main with the
    package's parser and hooks) ends in sys.exit("error: ...") -- exit status 1 with that one line
    on stderr -- naming the fragments; any other exception (a traceback) fails the test."""
    with pytest.raises(SystemExit) as e:
        run.main([str(a) for a in argv])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def tree_state(*folders):
    """{path: bytes digest} of every file under the folders (to show that none changed)."""
    return {str(p): store.file_digest(p) for folder in folders
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def temp_files(*folders):
    return [p for folder in folders for p in Path(folder).rglob("*.tmp")]


def write_result_with_settings(out, domain, method, seed, acc, settings):
    write_result(out, domain, method, seed, acc, acc / 2)
    path = Path(out) / domain / method / f"seed{seed}" / "results.json"
    files.atomic_save({**json.loads(path.read_text()), "settings": settings}, path)


def good_result(method="cpl", seed=0, acc=0.5, domain="sketch", **settings):
    """A results.json dict as the run command writes it, with a settings dict (flags overridden
    by `settings`)."""
    s = {**json.loads(json.dumps(vars(w2s_clip.parse_args([])))), "splits": "abc",
         "data_root": "/data", **settings}
    return {"domain": domain, "method": method, "seed": seed, "test_accuracy": acc,
            "worst10_accuracy": acc / 2, "curves": [], "config": s, "settings": s,
            "settings_key": store.settings_key(s)}


def put(out, r, sub=""):
    path = store.result_path(Path(out) / sub, r["domain"], r["method"], r["seed"])
    files.atomic_save(r, path)
    return path


CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
