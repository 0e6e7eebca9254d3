"""Model weights for w2s_clip: fetch every checkpoint a grid needs (`make weights`), and tell at
once when one is missing on a machine without network.

    python -m w2s_clip_lab.weights                    # the paper's grid: fetch what is not cached
    python -m w2s_clip_lab.weights --check            # only report, never download (exit 1 if missing)
    python -m w2s_clip_lab.weights --clip-tags openai --weak-models resnet18

Every weight is fetched by its own library (open_clip, timm, transformers) into that library's
standard cache (Hugging Face's HF_HOME; open_clip's ~/.cache/clip for URL-only tags), which is where
a run on a compute node without network looks for it: run this where there is network, with the
same HF_HOME. A weight counts as cached when one of the files its library would request is in the
cache (huggingface_hub.try_to_load_from_cache).
"""
import argparse
import os
import socket
import sys
from urllib.parse import urlparse

GRID_CLIP = ("ViT-B-32", ("openai", "datacomp_s_s13m_b4k", "datacomp_m_s128m_b4k",
                          "datacomp_xl_s13b_b90k"))  # Table 2-4 and the pretraining table
GRID_WEAK = ("resnet18", "hf:microsoft/resnet-18", "hf:microsoft/resnet-26",
             "hf:microsoft/resnet-34", "hf:microsoft/cvt-13", "hf:facebook/convnext-tiny-224")


def safetensors_first(filename, safe_name):
    """The file names a library tries for `filename`, in order: its safetensors twin, then it."""
    return (safe_name, filename) if safe_name else (filename,)


def clip_files(model_name, tag):
    """What open_clip fetches for `model_name` with pretrained `tag`: [(repo id or URL, file names
    of which one suffices)]; [] for a file or no weights. open_clip prefers the hub entry of the
    tag's config ('org/repo/' -> open_clip_pytorch_model.bin, safetensors first), else its URL."""
    import open_clip
    if tag.lower() == "none" or os.path.isfile(tag) or model_name.endswith(".json"):
        return []
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' or 'org/repo/file'
        filename = filename or "open_clip_pytorch_model.bin"
        safe = ("open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                else filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
        return [(repo, safetensors_first(filename, safe))]
    if cfg.get("url"):
        return [(cfg["url"], (os.path.basename(urlparse(cfg["url"]).path),))]
    return []


def timm_files(model_name):
    """What timm fetches for a pretrained `model_name`: the hub id of its default (or named) tag
    and pytorch_model.bin (model.safetensors first), or the config's own file name."""
    import timm
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return []
    if cfg.hf_hub_id:
        if cfg.hf_hub_filename:
            return [(cfg.hf_hub_id, (cfg.hf_hub_filename,))]
        return [(cfg.hf_hub_id, safetensors_first("pytorch_model.bin", "model.safetensors"))]
    if cfg.url:
        return [(cfg.url, (os.path.basename(urlparse(cfg.url).path),))]
    return []


def hf_files(hub_id, pretrained=True):
    """What transformers fetches for `hf:<hub_id>`: its config, its image processor's config and,
    when pretrained, its weights (model.safetensors, else pytorch_model.bin)."""
    if os.path.isdir(hub_id):
        return []
    files = [(hub_id, ("config.json",)), (hub_id, ("preprocessor_config.json",))]
    if pretrained:
        files.append((hub_id, safetensors_first("pytorch_model.bin", "model.safetensors")))
    return files


def weak_files(name, pretrained=True):
    """What the weak model `name` (timm name or hf:<id>) needs fetched."""
    if name.startswith("hf:"):
        return hf_files(name[3:], pretrained)
    return timm_files(name) if pretrained else []


def url_cache_path(url):
    """Where open_clip and timm keep a checkpoint fetched by URL: open_clip's ~/.cache/clip, torch
    hub's checkpoints folder for timm. Either counts."""
    import torch
    name = os.path.basename(urlparse(url).path)
    return [os.path.join(os.path.expanduser("~/.cache/clip"), name),
            os.path.join(torch.hub.get_dir(), "checkpoints", name)]


def cached_file(source, filenames):
    """The local path of the first of `filenames` cached for `source` (a hub repo id, possibly
    with @revision, or a URL), or None."""
    if "://" in source:
        return next((p for p in url_cache_path(source) if os.path.isfile(p)), None)
    from huggingface_hub import try_to_load_from_cache
    repo, _, revision = source.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def missing(files):
    """The (source, filenames) of `files` with none of their files cached."""
    return [(source, names) for source, names in files if cached_file(source, names) is None]


def hub_reachable(timeout=3.0):
    """False when huggingface_hub is set offline (HF_HUB_OFFLINE=1) or its endpoint's host does
    not answer a TCP connection within `timeout` seconds."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_problem(clip_model, clip_pretrained, weak_model, weak_pretrained):
    """A one-line message when a weight this run needs is neither cached nor fetchable (the hub
    is unreachable or set offline), else None. Costs a cache lookup, and a connection attempt
    only when something is missing."""
    needs = [(f"--clip-pretrained {clip_pretrained}", f"the {clip_model} weights", f)
             for f in missing(clip_files(clip_model, clip_pretrained))]
    needs += [(f"--weak-model {weak_model}", "its files", f)
              for f in missing(weak_files(weak_model, weak_pretrained))]
    if not needs or hub_reachable():
        return None
    from huggingface_hub import constants
    flag, what, (source, names) = needs[0]
    why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    return (f"{flag}: {what} ({source}, {names[-1]}) are not in the local cache and cannot be "
            f"fetched ({why}); run `make weights` where there is network, with the same HF_HOME")


def fetch(kind, name, tag=None):
    """Fetch one model's weights through its own library (into its standard cache)."""
    if kind == "clip":
        import open_clip
        open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    elif name.startswith("hf:"):
        import transformers
        transformers.AutoConfig.from_pretrained(name[3:])
        transformers.AutoImageProcessor.from_pretrained(name[3:])
        transformers.AutoModelForImageClassification.from_pretrained(name[3:])
    else:
        import timm
        timm.create_model(name, pretrained=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clip-model", default=GRID_CLIP[0], help="open_clip model name")
    p.add_argument("--clip-tags", nargs="*", default=list(GRID_CLIP[1]),
                   help="its pretrained tags (Table 2-4: openai; the pretraining table: all four)")
    p.add_argument("--weak-models", nargs="*", default=list(GRID_WEAK),
                   help="timm names or hf:<Hugging Face id> (Table 2: resnet18; Table 3: the five hf:)")
    p.add_argument("--check", action="store_true", help="report only; download nothing")
    return p.parse_args(argv)


def unknown_name(args):
    """A one-line problem with the names asked for (an open_clip model or tag, a timm model it
    does not know; an hf: id is checked by its hub), else None: a typo is not a cached model."""
    import open_clip
    import timm
    if args.clip_model not in open_clip.list_models():
        return f"--clip-model {args.clip_model}: not an open_clip model (open_clip.list_models())"
    tags = open_clip.list_pretrained_tags_by_model(args.clip_model)
    for tag in args.clip_tags:
        if tag not in tags:
            return f"--clip-tags {tag}: {args.clip_model} has tags {', '.join(tags) or 'none'}"
    for name in args.weak_models:
        if not name.startswith("hf:") and not timm.list_pretrained(name):
            return (f"--weak-models {name}: not a timm model with pretrained weights "
                    f"(timm.list_pretrained()) nor hf:<Hugging Face id>")
    return None


def main(argv=None):
    args = parse_args(argv)
    problem = unknown_name(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    todo = [("clip", args.clip_model, t, clip_files(args.clip_model, t)) for t in args.clip_tags]
    todo += [("weak", w, None, weak_files(w)) for w in args.weak_models]
    failed, total = 0, 0
    online = not args.check and any(missing(f) for *_, f in todo) and hub_reachable()
    if not args.check and not online and any(missing(f) for *_, f in todo):
        print("the Hugging Face hub cannot be reached (no network, or HF_HUB_OFFLINE=1): "
              "reporting only", file=sys.stderr)
    for kind, name, tag, files in todo:
        label = f"{name} {tag}" if tag else name
        if online and missing(files):
            try:
                fetch(kind, name, tag)
            except Exception as e:  # any library's network or hub error: one line, go on
                print(f"{label}: not fetched ({str(e).splitlines()[0][:200]})", file=sys.stderr)
        paths = [cached_file(source, names) for source, names in files]
        if None in paths:
            failed += 1
            gone = [f"{s}/{n[-1]}" if "://" not in s else s
                    for (s, n), p in zip(files, paths) if p is None]
            print(f"{label}: missing ({', '.join(gone)})")
            continue
        size = sum(os.path.getsize(os.path.realpath(p)) for p in paths)
        total += size
        print(f"{label}: {size / 2**20:,.0f} MiB cached")
    print(f"{len(todo) - failed} of {len(todo)} models cached, {total / 2**30:.2f} GiB"
          + (f"; {failed} missing" if failed else ""))
    return 1 if failed else 0


def run(argv=None):
    """`main`, with Ctrl-C (or a job's time limit) as one line: each library keeps what it has
    fetched, whole files in its cache and a partial one as its own resumable download."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted; run the same command again: the weights fetched are kept and the rest "
              "is fetched then", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(run())
