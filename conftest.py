"""Fixtures and helpers shared by the test files: tiny models, generated data, hand-made
results, and the float64 references the losses are checked against."""

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
from w2s_clip_lab import files, miniature, store


HERE = Path(__file__).resolve().parent


PROMPT_NAMES = ["The Eiffel Tower", "t-shirt", "aircraft carrier", "cat"]


@pytest.fixture(scope="module")
def clip():
    """A tiny random-init open_clip CLIP (seeded) and the ViT-B-32 tokenizer that ships with it."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")


def ref_log_softmax(z):
    """log softmax of float64 rows as z - max - log(sum(exp(z - max)))."""
    m = z.max(dim=-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def ref_kl_rows(w, s):
    """Per-row KL(softmax(w) || softmax(s)) = sum_j p_j (log p_j - log q_j), float64."""
    log_p, log_q = ref_log_softmax(w), ref_log_softmax(s)
    return (torch.exp(log_p) * (log_p - log_q)).sum(dim=-1)


def ref_ce_rows(s, target):
    """Per-row -log softmax(s)[target]."""
    return -ref_log_softmax(s)[torch.arange(len(s)), target]


def ref_loss(name, s, w, **h):
    """The docstring formula of loss `name` in float64; s may require grad, w must not."""
    if name == "ce":
        return ref_ce_rows(s, w.argmax(dim=-1)).mean()
    if name in ("kd", "cpl"):
        t = h.get("T", h.get("tau", 1.0))
        factor = t * t if name == "kd" else 1.0  # KD has Hinton's T^2, CPL (Eq. 4-5) has none
        return factor * ref_kl_rows(w / t, s / t).mean()
    if name == "auxconf":
        a = h["alpha"]
        soft = -(torch.exp(ref_log_softmax(w)) * ref_log_softmax(s)).sum(dim=-1)
        self_hard = ref_ce_rows(s, s.detach().argmax(dim=-1))
        return ((1 - a) * soft + a * self_hard).mean()
    if name == "adaptconf":
        T, tau = h["T"], h["tau"]
        ce_self = ref_ce_rows(s, s.detach().argmax(dim=-1))
        ce_weak = ref_ce_rows(s, w.argmax(dim=-1))
        with torch.no_grad():  # beta = e^{a/tau} / (e^{a/tau} + e^{b/tau}), shifted, detached
            a, b = ce_self / tau, ce_weak / tau
            m = torch.maximum(a, b)
            beta = torch.exp(a - m) / (torch.exp(a - m) + torch.exp(b - m))
        return ((1 - beta) * T * T * ref_kl_rows(w / T, s / T) + beta * ce_self).mean()
    raise KeyError(name)


LOSS_CASES = [("ce", {}), ("kd", {"T": 1.0}), ("kd", {"T": 2.5}), ("auxconf", {"alpha": 0.3}),
              ("adaptconf", {"T": 2.0, "tau": 0.5}), ("cpl", {"tau": 1.0}), ("cpl", {"tau": 0.7})]


LOSS_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in h.items())}" for n, h in LOSS_CASES]


def logits_pair(n, k, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, k, generator=g), scale * torch.randn(n, k, generator=g)


# Prompts of very different lengths, one name far longer than the rest, and a single class.
PACKED_NAMES = {"mixed": ["cat", "The Great Wall of China", "t-shirt", "aircraft carrier", "ant"],
                "one-long": ["ant", "bee", "cow",
                             "a very long and winding class name that goes on for many words"],
                "single": ["The Eiffel Tower"]}


@pytest.fixture(scope="module")
def text_towers(clip):
    """Random-init CLIPs whose text towers differ: the tiny one, the tiny one with layer scale
    (random gammas), a ViT-B-32-shaped one (width 512, 8 heads, 12 layers), and a qk-norm one
    (open_clip's CustomResidualAttentionBlock, which the packed path does not handle)."""
    def build(**text):
        torch.manual_seed(0)
        cfg = {**dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2), **text}
        model = open_clip.CLIP(embed_dim=text.get("width", 64), text_cfg=cfg, vision_cfg=dict(
            image_size=32, layers=1, width=64, patch_size=8, head_width=32)).eval()
        for name, p in model.named_parameters():
            if ".ls_" in name:
                p.data.uniform_(0.5, 1.5)
        return model
    return {"tiny": clip[0], "tiny-layerscale": build(ls_init_value=1.0),
            "vit-b-32-text": build(width=512, heads=8, layers=12), "qk-norm": build(qk_norm=True)}


def encode_text_with_context(model, tokens, ctx):
    """open_clip's own encode_text over all 77 tokens, token positions 1..m replaced by ctx [m, w]."""
    m = ctx.shape[0]
    hook = model.token_embedding.register_forward_hook(lambda mod, inp, out: torch.cat(
        [out[:, :1], ctx.expand(len(out), -1, -1), out[:, 1 + m:]], dim=1))
    try:
        return model.encode_text(tokens)
    finally:
        hook.remove()


def planted(seed=0, n=3400, k=10, d=64, spread=0.2, noise=1.0, text_noise=2.0, weak_acc=0.6):
    """CLIP-like features in a narrow cone around e: x = normalize(e + spread (mu_y + noise)).

    Text prototypes t_c = normalize(e + spread (mu_c + text noise)) are imperfect zero-shot
    classifiers; weak labels are right with probability weak_acc, else a uniformly random wrong class.
    """
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(d, generator=g), dim=0)
    mu = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    t = F.normalize(e + spread * (mu + text_noise * torch.randn(k, d, generator=g) / d ** 0.5), dim=-1)
    y = torch.randint(k, (n,), generator=g)
    x = F.normalize(e + spread * (mu[y] + noise * torch.randn(n, d, generator=g) / d ** 0.5), dim=-1)
    right = torch.rand(n, generator=g) < weak_acc
    weak = torch.where(right, y, (y + torch.randint(1, k, (n,), generator=g)) % k)
    tr, va, te = slice(0, 2000), slice(2000, 2400), slice(2400, n)
    return {"t": t, "x": x, "y": y, "weak": weak, "tr": tr, "va": va, "te": te, "k": k}


@pytest.fixture(scope="module")
def planted_data():
    return planted()


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


def tuning_setup(planted_data, tune_by="agreement"):
    """fit_tuned's inputs on the planted data: a CPL head from text prototypes, weak logits."""
    p = planted_data
    n = len(p["y"])
    splits = {"hold_train": torch.arange(0, 600), "hold_val": torch.arange(2000, 2400),
              "test": torch.arange(2400, n)}
    strong = {"clip": None, "tokenizer": None, "feats": p["x"], "prototypes": 3.0 * p["t"]}
    args = w2s_clip.parse_args(["--tau-grid", "0.02", "0.1", "1", "--strong-epochs", "4",
                                "--batch-size", "128", "--tune-by", tune_by])
    return 5.0 * F.one_hot(p["weak"], p["k"]).float(), strong, splits, args


DEMO_NAMES = miniature.DEMO_CLASSES[:4]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny synthetic DomainNet-layout domain (4 classes, 8 train / 20 test images each)."""
    root = tmp_path_factory.mktemp("demo")
    miniature.make_synthetic_domainnet(root / "data", domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, size=32)
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


def run_cli(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "w2s_clip.py", *args], cwd=HERE, env=env,
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
                                           n_train=8, n_test=20, layout="officehome")
    (root / "sketch").rename(root / "Real World")
    return root


def folder_copy(demo_folder, tmp_path, classnames=True):
    """The fixture's images in the folder layout <root>/sketch/{train,test}/<class>/<image>."""
    root = tmp_path / "mine"
    miniature.make_synthetic_domainnet(root, domains=("sketch",), classes=DEMO_NAMES,
                                           n_train=8, n_test=20, layout="folder")
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
    """w2s_clip.main(argv) in process ends in sys.exit("error: ...") -- exit status 1 with that one
    line on stderr -- naming the fragments; any other exception (a traceback) fails the test."""
    with pytest.raises(SystemExit) as e:
        w2s_clip.main([str(a) for a in argv])
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
