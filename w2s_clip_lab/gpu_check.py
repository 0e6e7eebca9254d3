"""`make gpu-check`: a self-check of a machine's GPU path for w2s_clip, with no network and no data.

    python -m w2s_clip_lab.gpu_check                       # the first GPU, --precision auto (about two minutes)
    python -m w2s_clip_lab.gpu_check --device cuda:1
    python -m w2s_clip_lab.gpu_check --device cpu          # the dry run: the same checks on the CPU

Each check prints one line, PASS or FAIL, with what it measured; the last line is `N passed, M
failed` and the exit status is 1 if any check failed. The checks:
  1. the kernels of the precision in use (autocast convolution, batch norm, linear, a scaled step);
  2. every head (LP, TP, CPL, cpl-text) with each of its losses gives the same per-epoch training and
     hold-val losses on the device as on the CPU in float32 (relative tolerance 1e-3, TF32 off);
  3. a `--method all` run of w2s_clip.py on a generated folder with tiny models, the same command
     again (it must find every run finished), and a rerun into a fresh folder from the warm caches
     (the same accuracies, up to one D'_test image);
  4. throughput and peak memory at real sizes: a training step of each weak model of Table 3's kinds
     (ResNet-18, ConvNeXt-T, CvT-13, 224 px, 345 classes), a ViT-B/32 image encoding, and a TP
     training step over DomainNet's 345 class names (batch 512 on a GPU, --real-batch on the CPU).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import w2s_clip as W
from w2s_clip_lab import bench, checks, hf, miniature

HERE = Path(__file__).resolve().parent.parent  # the repository, where w2s_clip.py is
NAMES = ["aircraft carrier", "zebra", "The Eiffel Tower", "t-shirt"]


def run_check(name, fn, passed):
    """Run fn(); print `PASS  name: detail (s)` or `FAIL  name: reason (s)`; record the outcome."""
    start = time.time()
    try:
        detail, ok = fn() or "", True
    except torch.cuda.OutOfMemoryError:
        detail, ok = "out of GPU memory; --real-batch 256 shows the rate on a smaller card", False
    except Exception as e:  # a check that fails is a finding, not a crash
        detail, ok = f"{type(e).__name__}: {checks.one_line(e, 200)}", False
    passed.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail} ({time.time() - start:.1f} s)", flush=True)


def peak_memory(device):
    """Peak allocated memory since the last reset, GiB, or 'n/a' off CUDA."""
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_kernels(device, precision):
    """w2s_clip's weak-training step (autocast convolution, batch norm and linear layers, AdamW
    through the gradient scaler) in `precision` on `device`: the loss is finite and the step
    changes the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4))
    before = model[-1].weight.detach().clone()
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(4, (16,))) for _ in range(2)]
    history = []
    W.train_weak_model(model, batches, 1, 1e-2, 0.0, device, precision=precision, history=history)
    synchronize(device)
    loss = history[0]["loss"]
    assert torch.isfinite(torch.tensor(loss)), f"loss {loss}"
    assert not torch.equal(before, model[-1].weight.detach().cpu()), "the step did not change the weights"
    return f"{precision}: loss {loss:.3f}, weights updated"


def tiny_clip():
    """The miniature's tiny CLIP at a seeded random init, and the ViT-B-32 tokenizer."""
    import open_clip
    torch.manual_seed(0)
    return open_clip.CLIP(**miniature.TINY_CLIP).eval(), open_clip.get_tokenizer("ViT-B-32")


def head_losses(kind, loss, device, clip_model, tokenizer, epochs=2):
    """Per-epoch training and hold-val losses of one head trained on fixed random data."""
    g = torch.Generator().manual_seed(0)
    x, weak = torch.randn(96, 64, generator=g), 3 * torch.randn(96, len(NAMES), generator=g)
    clip_model.to(device)
    protos = (W.text_prototypes(clip_model, tokenizer, NAMES, ["a photo of a {}"], normalize=False)
              if kind == "cpl" else None)
    torch.manual_seed(0)
    head = W.make_head(kind, clip_model, tokenizer, NAMES, 64, protos).to(device)
    loss_fn, loss_schedule = W.bind_loss(loss, {n: h[0] for n, h in W.HYPERPARAMETERS.items()})
    fit = W.train_head(head, loss_fn, x[:64].to(device),
                       weak[:64].to(device), x[64:].to(device), weak[64:].to(device), epochs=epochs,
                       batch_size=32, lr=1e-2, seed=0,
                       param_lrs={"text.": 1e-5} if kind == "cpl-text" else None,
                       loss_schedule=loss_schedule)
    return [v for row in fit["curves"] for v in (row["loss"], row["val_loss"])]


def check_heads(device, tol=1e-3):
    """Every head and loss: the same losses per epoch on `device` as on the CPU, in float32."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    worst, runs = 0.0, 0
    try:
        clip_model, tokenizer = tiny_clip()
        for kind in ("lp", "tp", "cpl", "cpl-text"):
            for loss in (("cpl",) if kind.startswith("cpl") else W.LOSS_NAMES):
                ref = head_losses(kind, loss, torch.device("cpu"), clip_model, tokenizer)
                got = head_losses(kind, loss, device, clip_model, tokenizer)
                rel = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(ref, got))
                assert rel <= tol, f"{kind} {loss}: relative difference {rel:.1e} > {tol}"
                worst, runs = max(worst, rel), runs + 1
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return f"{runs} head-loss pairs, largest relative difference {worst:.1e} (tolerance {tol})"


def check_cli(device, folder):
    """`--method all` on a generated folder with tiny models, the same command again, and a rerun
    into a fresh output folder from the warm caches."""
    root = Path(folder)
    miniature.make_synthetic_domainnet(root / "data", domains=("sketch",),
                                           classes=tuple(n.replace(" ", "_") for n in NAMES),
                                           n_train=8, n_test=20, size=32)
    (root / "tiny-clip.json").write_text(json.dumps(miniature.TINY_CLIP))
    flags = ["--data-root", root / "data", "--domain", "sketch", "--method", "all", "--seeds", "0",
             "--clip-model", root / "tiny-clip.json", "--clip-pretrained", "none",
             "--weak-model", "test_resnet", "--no-weak-pretrained", "--weak-epochs", "1",
             "--strong-epochs", "2", "--batch-size", "16", "--workers", "0", "--device", str(device),
             "--cache-dir", root / "cache"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out):
        proc = subprocess.run([sys.executable, str(HERE / "w2s_clip.py"), *map(str, flags),
                               "--out-dir", str(out)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return proc.stdout

    first = run(root / "runs")
    assert "all runs exist" in run(root / "runs"), "the same command did not find its runs"
    run(root / "again")
    acc = lambda out: {p.parent.parent.name: json.loads(p.read_text())["test_accuracy"]
                       for p in sorted((root / out).rglob("results.json"))}
    a, b = acc("runs"), acc("again")
    n_test = json.loads(next((root / "runs").rglob("results.json")).read_text())["n_test"]
    differ = {m for m in a if abs(a[m] - b[m]) > 1.0 / n_test + 1e-9}
    assert len(a) == len(W.METHODS) and not differ, f"methods that differ on rerun: {sorted(differ)}"
    assert first.startswith("device: "), "the run did not say its device first"
    return f"{len(a)} methods finished, found again, and equal on rerun within one image"


def weak_step_rate(name, device, precision, batch, size=224, classes=345):
    """Images per second of w2s_clip's weak-training step (`train_weak_model`, random init) at
    `batch`, timed over two steps after a warm-up step, and the peak memory."""
    torch.manual_seed(0)
    if name == "cvt-13":  # Table 3's CvT-13: transformers' default CvtConfig is CvT-13
        import transformers
        model = hf.HFLogits(transformers.CvtForImageClassification(
            transformers.CvtConfig(num_labels=classes)))
    else:
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=classes)
    step = [(torch.randn(batch, 3, size, size), torch.randint(classes, (batch,)))]
    W.train_weak_model(model, step, 1, 1e-3, 0.0, device, precision=precision)  # warm-up
    reset_memory(device)
    start = time.perf_counter()
    W.train_weak_model(model, step * 2, 1, 1e-3, 0.0, device, precision=precision)
    synchronize(device)
    seconds = time.perf_counter() - start
    return f"{2 * batch / seconds:.1f} images/s at batch {batch}, peak {peak_memory(device)}"


def random_vit_b32(device):
    """open_clip's ViT-B-32 at random init (its "no pretrained weights" warning silenced: asked for)."""
    import logging
    import open_clip
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model("ViT-B-32").to(device).eval().requires_grad_(False)
    finally:
        logging.disable(logging.NOTSET)


def clip_encode_rate(device, precision, batch):
    """Images per second of ViT-B/32 image encoding (random init) at `batch`, and peak memory."""
    model = random_vit_b32(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    reset_memory(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        W.encode_images(model, [(x, None)], device, precision)  # w2s_clip's own encoding
        synchronize(device)
        times.append(time.perf_counter() - start)
    return f"{batch / min(times[1:]):.1f} images/s at batch {batch}, peak {peak_memory(device)}"


def tp_step_time(device, batch):
    """Seconds of one TP training step over DomainNet's 345 class names with ViT-B/32's text tower
    (random init, packed text path), `batch` image features, and peak memory."""
    import open_clip
    model = random_vit_b32(device)
    names = [n.replace("_", " ") for n in bench.DOMAINNET_CLASSES]
    head = W.make_head("tp", model, open_clip.get_tokenizer("ViT-B-32"), names, 512).to(device)
    opt = torch.optim.AdamW([head.ctx], lr=1e-3)
    x, weak = torch.randn(batch, 512, device=device), torch.randn(batch, len(names), device=device)
    reset_memory(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss = W.kd_loss(head(x), weak)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return f"{min(times[1:]):.3f} s per step, {len(names)} classes, peak {peak_memory(device)}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu; default: cuda if usable")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="as w2s_clip.py's --precision")
    p.add_argument("--real-batch", type=W.positive(int), default=None,
                   help="batch of the real-size checks (default 512 on a GPU, 8 on the CPU)")
    args = p.parse_args(argv)
    try:
        device, precision, hardware = checks.choose_device(args.device, args.precision)
    except W.UserError as e:
        sys.exit(f"error: {e}")
    device = torch.device(device)
    batch = args.real_batch or (512 if device.type == "cuda" else 8)
    print(checks.device_line(hardware), flush=True)
    passed = []
    run_check("kernels", lambda: check_kernels(device, precision), passed)
    run_check("heads and losses as on the CPU", lambda: check_heads(device), passed)
    with tempfile.TemporaryDirectory() as folder:
        run_check("--method all, the same command, a rerun", lambda: check_cli(device, folder), passed)
    for name in ("resnet18", "convnext_tiny", "cvt-13"):
        run_check(f"weak step {name}", lambda n=name: weak_step_rate(n, device, precision, batch),
                  passed)
    run_check("ViT-B/32 image encoding", lambda: clip_encode_rate(device, precision, batch), passed)
    run_check("TP step, 345 classes", lambda: tp_step_time(device, batch), passed)
    print(f"{sum(passed)} passed, {len(passed) - sum(passed)} failed")
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
