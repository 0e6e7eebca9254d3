"""Speed and memory of w2s_clip on a generated domain (`make bench`); prints a markdown table.

    python -m w2s_clip_lab.bench                      # CPU or the first GPU: ViT-B-32, resnet18, k=345
    python -m w2s_clip_lab.bench --device cuda --images 20000 --json bench.json
    python -m w2s_clip_lab.bench --steps-only         # only the text-tower step table (a minute or two)

Models are random-init (no download): speed does not depend on the weights.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import w2s_clip as W
from w2s_clip_lab import checks, datasets, hf, miniature, report, run, store


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (random init)")
    p.add_argument("--weak-model", default="resnet18", help="timm model (random init)")
    p.add_argument("--classes", type=int, default=345, choices=range(1, 346), metavar="1..345",
                   help="the first k of DomainNet's class names")
    p.add_argument("--images", type=int, default=2070, help="D_test images (hold + test)")
    p.add_argument("--clip-images", type=int, default=512,
                   help="images of the timed CLIP pass; its rate gives one pass over D_test")
    p.add_argument("--strong-epochs", type=int, default=10, help="head epochs (paper: 10)")
    p.add_argument("--weak-images", type=int, default=345, help="D_train images for the weak model")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--dir", default="bench", help="generated data, caches and runs go here")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--steps-only", action="store_true",
                   help="only the TP / cpl-text step table, plain vs packed text path")
    p.add_argument("--step-batch", type=int, default=512, help="image features per timed step")
    return p.parse_args()


DOMAINNET_CLASSES = miniature.DOMAINNET_CLASSES  # DomainNet's 345 names, in label order


def timed(fn):
    """(result, seconds) of fn(), with the device synchronised."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def text_steps(clip_model, tokenizer, names, device, batch=512, repeats=3):
    """One training step of TP and of cpl-text, the plain text path vs the packed one.

    A step is what `train_head` does per batch: head logits for `batch` image features, the KL
    loss to random weak logits, backward, AdamW (lr 0: both paths see the same weights). The
    plain path pads every prompt to the longest and runs every position; the packed one runs the
    shared prefix once and each class's own tokens (`TextTower.encode_prefixed`). Each path: a
    warm-up step, then the fastest of `repeats`; the paths alternate, so both see the same load.
    Returns:
        table rows (head, path, tokens, seconds, speed-up, max feature difference).
    """
    classes = [n.replace("_", " ") for n in names]
    g = torch.Generator().manual_seed(0)
    rows = []
    for kind in ("tp", "cpl-text"):
        dim = clip_model.visual.output_dim
        head = W.make_head(kind, clip_model, tokenizer, classes, dim).to(device)
        x = torch.randn(batch, dim, generator=g).to(device)
        weak = torch.randn(batch, len(classes), generator=g).to(device)
        opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.0)
        prefix = head.sos.shape[0] + head.ctx.shape[0] if kind == "tp" else head.prefix.shape[0]
        tokens = {"plain": len(classes) * (prefix + int(head.lengths.max())),
                  "packed": prefix + int(head.lengths.sum())}
        feats, seconds = {}, {"plain": [], "packed": []}
        for path in ("plain", "packed"):
            head.text.packed = path == "packed"
            with torch.no_grad():
                feats[path] = head.text_features()

        def step(path):
            head.text.packed = path == "packed"
            loss = W.cpl_loss(head(x), weak)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for r in range(repeats + 1):  # the paths alternate, so that both see the same load
            for path in ("plain", "packed"):
                seconds[path] += [timed(lambda: step(path))[1]] * (r > 0)  # r = 0: warm-up
        seconds = {path: min(s) for path, s in seconds.items()}
        diff = (feats["plain"] - feats["packed"]).abs().max().item()
        for path in ("plain", "packed"):
            rows.append((kind, path, str(tokens[path]), f"{seconds[path]:.3f}",
                         f"{seconds['plain'] / seconds[path]:.2f}x",
                         f"{diff:.1e}" if path == "packed" else ""))
    return rows


def decode_counts(folder, seeds=5, epochs=3, short=256):
    """Images decoded by weak training, weak logits and CLIP features for `seeds` seeds, counted in
    process (decode_image patched where ImageList and the pixel caches call it, no workers) on a
    small generated domain with tiny models: the paper's defaults, then with the pixel caches
    (--train-image-cache `short`), through the package's command (its pixel-cache flags).
    Returns:
        {setting: decodes per image}, and the counts (n_train, n_test)."""
    root = Path(folder) / "decodes"
    miniature.make_synthetic_domainnet(root / "data", domains=("sketch",),
                                           classes=DOMAINNET_CLASSES[:4], n_train=8, n_test=20)
    (root / "tiny-clip.json").write_text(json.dumps(miniature.TINY_CLIP))
    data = datasets.load_domain(root / "data", "sketch")
    n_train, n_test = len(data["train_paths"]), len(data["test_paths"])
    count, real = [0], W.decode_image
    counted = lambda path: count.__setitem__(0, count[0] + 1) or real(path)  # noqa: E731
    W.decode_image = store.decode_image = counted  # where ImageList and the pixel cache call it
    per_image = {}
    try:
        for name, flags in (("paper defaults, no pixel cache", ["--no-eval-image-cache"]),
                            ("eval cache (default)", []),
                            (f"eval + --train-image-cache {short}", ["--train-image-cache", str(short)])):
            count[0] = 0
            run.main(["--data-root", str(root / "data"), "--domain", "sketch",
                      "--method", "weak", "zero-shot", "--seeds", *map(str, range(seeds)),
                      "--clip-model", str(root / "tiny-clip.json"), "--clip-pretrained", "none",
                      "--weak-model", "test_resnet", "--no-weak-pretrained",
                      "--weak-epochs", str(epochs), "--batch-size", "32", "--workers", "0",
                      "--device", "cpu", "--cache-dir", str(root / f"cache-{len(per_image)}"),
                      "--out-dir", str(root / f"runs-{len(per_image)}"), "--force", *flags])
            per_image[name] = count[0] / (n_train + n_test)
    finally:
        W.decode_image = store.decode_image = real
    return per_image, (n_train, n_test)


def grid_decodes(seeds=5, epochs=3, weak_models=5, pretrain_tags=3):
    """Decodes of `make paper-tables` and the pretraining table on DomainNet (Table 1's counts),
    by the per-stage rule the counts above follow: per domain, each seed's weak training
    (epochs x n_train) and weak logits (n_test), and one CLIP pass (n_test); Table 3 adds
    `weak_models` Hugging Face weak models on clipart (their processors are not cached), the
    pretraining table `pretrain_tags` CLIP passes on sketch, Table 4 none (all cached).
    Returns {setting: (decodes, per image)}."""
    table1 = report.PAPER_TABLE1
    images = sum(a + b for a, b in table1.values())
    ct, cv = table1["clipart"]
    extra_clip = pretrain_tags * table1["sketch"][1]
    counts = {
        "paper defaults, no pixel cache": sum(seeds * (epochs * a + b) + b for a, b in table1.values())
        + weak_models * seeds * (epochs * ct + cv) + extra_clip,
        "eval cache (default)": sum(seeds * epochs * a + 2 * b for a, b in table1.values())
        + weak_models * seeds * (epochs * ct + cv) + extra_clip,
        "eval + --train-image-cache 256": sum(a + 2 * b for a, b in table1.values())
        + weak_models * seeds * cv + extra_clip}
    return {k: (v, v / images) for k, v in counts.items()}


def print_steps(rows, k, name):
    print(f"\nText-tower training step, {k} DomainNet classes, on {name}\n")
    print("| head | text path | tokens | step (s) | speed-up | max feature diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main():
    a = parse_args()
    try:
        device, precision, hardware = checks.choose_device(a.device, "auto")
        device = torch.device(device)
    except W.UserError as e:
        sys.exit(f"error: {e}")
    print(checks.device_line(hardware), flush=True)
    names = list(DOMAINNET_CLASSES[:a.classes])
    k = len(names)
    name = (hardware["name"] if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    if a.steps_only:
        clip_model, _, tokenizer = W.load_clip(a.clip_model, None, device)
        steps = text_steps(clip_model, tokenizer, names, device, a.step_batch)
        print_steps(steps, k, f"{a.clip_model}, {name}")
        if a.json:
            Path(a.json).write_text(json.dumps({"device": name, "text_steps": steps}, indent=1))
        return
    root = Path(a.dir) / f"domainnet{k}-n{a.images}-w{a.weak_images}"
    if not (root / "data" / "sketch_test.txt").exists():
        miniature.make_synthetic_domainnet(
            root / "data", domains=("sketch",), classes=names,
            n_train=-(-a.weak_images // k), n_test=-(-a.images // k), size=64)
    rows = []
    clip_model, preprocess, tokenizer = W.load_clip(a.clip_model, None, device)
    data = datasets.load_domain(root / "data", "sketch")
    n = len(data["test_paths"])

    # 1. CLIP image features, decoding included; one pass over D_test takes n / rate.
    m = min(n, a.clip_images)
    loader = datasets.make_loader(datasets.ImageList(root / "data", data["test_paths"][:m], data["test_labels"][:m],
                                       preprocess), 256, device, a.workers)
    W.encode_images(clip_model, [next(iter(loader))], device, precision)  # warm-up
    _, seconds = timed(lambda: W.encode_images(clip_model, loader, device, precision))
    clip_s = n * seconds / m
    rows.append(("CLIP image features (decode + encode)", f"{m / seconds:.1f} images/s",
                 f"one pass over {n} images: {clip_s:.1f} s"))

    # 2. Weak-model training: a warm-up epoch, then one timed epoch over D_train.
    model, train_tf, _ = hf.load_weak_model(a.weak_model, k, pretrained=False)
    wl = datasets.make_loader(datasets.ImageList(root / "data", data["train_paths"], data["train_labels"], train_tf),
                       128, device, a.workers, shuffle=True)
    W.train_weak_model(model, wl, 1, 1e-3, 0.1, device, precision=precision)
    _, weak_s = timed(lambda: W.train_weak_model(model, wl, 1, 1e-3, 0.1, device,
                                                 precision=precision))
    rows.append(("weak-model training (batch 128)", f"{len(wl.dataset) / weak_s:.1f} images/s",
                 f"one epoch of {len(wl.dataset)} images: {weak_s:.1f} s"))

    # 3. One TP and one cpl-text step at k classes: the plain text path vs the packed one.
    steps = text_steps(clip_model, tokenizer, names, device, a.step_batch)

    # 4. The CLI: a first method (fresh caches), a second one (cached), then every method.
    cli = [sys.executable, "w2s_clip.py", "--data-root", str(root / "data"), "--domain", "sketch",
           "--seeds", "0", "--clip-model", a.clip_model, "--clip-pretrained", "none",
           "--weak-model", a.weak_model, "--no-weak-pretrained", "--device", a.device,
           "--workers", str(a.workers), "--cache-dir", str(root / "cache"), "--weak-epochs", "1",
           "--strong-epochs", str(a.strong_epochs), "--out-dir", str(root / "runs")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(root / "runs", ignore_errors=True)
    wall = {}
    for tag, method in (("first", "cpl"), ("second", "kd-lp"), ("all", "all")):
        cmd = cli + ["--method", method] + ["--force"] * (tag == "first")
        _, wall[tag] = timed(lambda: subprocess.run(cmd, check=True, env=env, capture_output=True))
    rows.append(("first method (cpl), fresh caches", f"{wall['first']:.1f} s", ""))
    rows.append(("second method (kd-lp), cached", f"{wall['second']:.1f} s",
                 f"{wall['second'] / wall['first']:.2f}x the first"))
    per_method, gpu_peak = {}, 0.0
    for path in (root / "runs" / "sketch").glob("*/seed0/results.json"):
        r = json.loads(path.read_text())
        gpu_peak = max(gpu_peak, r.get("peak_gpu_memory_gib", 0.0))
        if r["method"] != "weak":
            per_method[r["method"]] = r["seconds"]
    for m in sorted(per_method):
        rows.append((f"  train {m} on cached features", f"{per_method[m]:.1f} s", ""))
    total = sum(per_method.values())
    rows.append(("all strong methods / one CLIP image pass", f"{total / clip_s:.2f}",
                 f"{total:.1f} s / {clip_s:.1f} s"))
    no_text = sum(v for m, v in per_method.items() if not m.endswith("-tp") and m != "cpl-text")
    rows.append(("  the same without the text-tower methods (TP, cpl-text; ceiling keeps TP)",
                 f"{no_text / clip_s:.2f}", f"{no_text:.1f} s"))
    rss = [resource.getrusage(who).ru_maxrss / 2**20  # KiB -> GiB
           for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    rows.append(("peak host memory (RSS)", f"{max(rss):.2f} GiB",
                 f"bench process {rss[0]:.2f} GiB, largest CLI run {rss[1]:.2f} GiB"))
    if device.type == "cuda":
        rows.append(("peak GPU memory, method runs", f"{gpu_peak:.2f} GiB",
                     "largest peak_gpu_memory_gib in results.json (feature extraction and weak "
                     "training not included)"))

    # 5. Decodes per image: counted on a small domain, then the same rule on DomainNet's grid.
    per_image, (n_train, n_test) = decode_counts(a.dir)
    decode_rows = [(setting, f"{v:.2f}", f"{grid[0] / 1e6:.2f} M ({grid[1]:.2f} per image)")
                   for (setting, v), grid in zip(per_image.items(), grid_decodes().values())]

    print(f"\n{a.clip_model} + {a.weak_model}, {k} classes, {n} D_test images, on {name}\n")
    print("| measure | value | detail |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print_steps(steps, k, f"{a.clip_model}, {name}")
    print(f"\nImages decoded, 5 seeds x 3 weak epochs: counted on {n_train} + {n_test} generated "
          f"images; `make paper-tables` + pretraining table on DomainNet by the same rule\n")
    print("| setting | decodes per image (counted) | DomainNet grid |\n|---|---|---|")
    for r in decode_rows:
        print("| " + " | ".join(r) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "rows": rows, "text_steps": steps,
                                            "decodes": decode_rows}, indent=1))


if __name__ == "__main__":
    main()
