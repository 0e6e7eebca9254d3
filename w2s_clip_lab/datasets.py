"""Data for w2s_clip.py: DomainNet's split files, image loading, and other layouts read into
DomainNet's split-file format.

    python w2s_clip.py --dataset officehome --data-root data/OfficeHome --domain Art --method all
    python w2s_clip.py --dataset folder --data-root my_images --domain photos --method all

DomainNet (`load_domain`): `<root>/<domain>_{train,test}.txt`, one `<domain>/<class>/<file> <label>`
per line; class names and label order come from these files, never from sorted folders.
Images are decoded by `decode_image` and served by `ImageList`, whose augmentation is seeded per
(seed, epoch, image), so that no result depends on the number of data-loader workers.

Other layouts (images are never moved or written; the split files go to `<out-dir>/splits/<dataset>/`):
- officehome: `<root>/<Domain>/<Class_Name>/<image>`, domains Art, Clipart, Product and Real World
  (or Real_World). No official split: a seeded split stratified by class (`stratified_split`).
  Labels follow the sorted class folder names.
- folder: `<root>/<domain>/{train,test}/<class>/<image>`. Label order: the lines of
  `<root>/classnames.txt` (class folder names) when present, else the sorted folder names.
Class names are the folder names with `_` -> space, as for DomainNet. A layout of another shape is
one function returning (train, test) lists of (relative path, label) and the class folders in label
order, added to LAYOUTS.
"""
import hashlib
import os
import posixpath
import random
import unicodedata
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from w2s_clip import UserError
from w2s_clip_lab.files import atomic_save

def file_digest(*paths):
    """SHA-1 of the files' bytes, in order (16 hex digits)."""
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # a checkpoint can be gigabytes
                h.update(block)
    return h.hexdigest()[:16]


def decode_image(path):
    """The image file at `path` decoded to RGB (PIL), or a UserError naming it."""
    try:
        return Image.open(path).convert("RGB")
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is refused by PIL as a decompression bomb ({e}); "
                        f"shrink it or remove it from the split files")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({e}); replace or remove it (DomainNet: "
                        f"re-download with `make data`)")


class ImageList(Dataset):
    """Images `root/paths[i]` with labels, through `transform`; a bad file raises UserError.

    With a `seed`, the transform's random draws (torch and Python's `random`, what torchvision and
    timm use) come from a generator seeded by (seed, epoch, i) for each sample, so augmentation does
    not depend on which data-loader worker loads it. Index epoch * n + i is image i in that epoch
    (`EpochSampler`). With `pixels` (a `PixelCache` of the same images), image i is read from it
    instead of decoded.
    """

    def __init__(self, root, paths, labels, transform, seed=None, pixels=None):
        self.root, self.paths, self.labels, self.transform = root, paths, labels, transform
        self.seed, self.pixels = seed, pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        i, epoch = index % len(self.paths), index // len(self.paths)
        image = (self.pixels[i] if self.pixels is not None
                 else decode_image(os.path.join(self.root, self.paths[i])))
        if self.seed is None:
            return self.transform(image), self.labels[i]
        sample_seed = int(hashlib.sha1(f"{self.seed} {epoch} {i}".encode()).hexdigest()[:15], 16)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            x = self.transform(image)
        random.setstate(state)
        return x, self.labels[i]


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle per pass, as indices epoch * n + i, so that each sample knows its epoch."""

    def __init__(self, n, seed):
        self.n, self.g, self.epoch = n, torch.Generator().manual_seed(seed), 0

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.g) + self.epoch * self.n
        self.epoch += 1
        return iter(order.tolist())


def make_loader(dataset, batch_size, device, workers, shuffle=False, seed=0):
    """A DataLoader that keeps an accelerator busy: workers, pinned memory, and for training a
    seeded shuffle (`EpochSampler`) that does not depend on the number of workers; the dataset
    must then take indices epoch * n + i, as ImageList does. Its own generator seeds the workers,
    so the global RNG is not drawn from (a model with dropout sees the same stream however many
    workers load its data)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=EpochSampler(len(dataset), seed) if shuffle else None,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0 and shuffle, drop_last=False)


def read_split_file(path):
    """Parse an official DomainNet split file, one `<domain>/<class>/<file>.jpg <label>` per line.

    The file must be UTF-8 (a leading byte-order mark is accepted) and list each image once. Each
    path is normalised as written (`posixpath.normpath`: `./`, `..` and doubled slashes go), so that
    `./clipart/x.jpg` and `clipart/x.jpg` are one image and the class folder is the one named.
    Returns:
        (paths, labels): relative image paths (list of n str) and labels (LongTensor [n]).
    """
    if not os.path.isfile(path):
        raise UserError(f"split file {path} not found; get it with `make data DOMAIN=<domain>`")
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save it as UTF-8 or "
                        f"re-download it")
    paths, labels, lines = [], [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            image = posixpath.normpath(parts[0]) if len(parts) == 2 else ""
            try:
                label = int(parts[1]) if image.lstrip("/").count("/") >= 2 else None
            except ValueError:
                label = None
            if label is not None and not -2 ** 63 <= label < 2 ** 63:  # beyond torch's int64
                raise UserError(f"{path}:{lineno}: label {parts[1]} is far too large for a class "
                                f"index; re-download the split file")
            if label is None:
                raise UserError(f"{path}:{lineno}: expected '<domain>/<class>/<file> <label>', "
                                f"got {line.strip()!r}; re-download the split file")
            paths.append(image)
            labels.append(label)
            lines.append(lineno)
    if not paths:
        raise UserError(f"{path} is empty; re-download it with `make data`")
    first = repeated(paths)
    if first is not None:
        repeats = len(paths) - len(set(paths))
        raise UserError(f"{path}:{lines[first[1]]} lists {paths[first[1]]} again (first at line "
                        f"{lines[first[0]]}; {repeats} repeated lines in all); each image must "
                        f"appear once: re-download the split file")
    return paths, torch.tensor(labels)


def repeated(keys):
    """(index of the first occurrence, index of the second) of the earliest key in `keys` that
    occurs more than once, or None."""
    where = {}
    for i, key in enumerate(keys):
        where.setdefault(key, []).append(i)
    twice = [at for at in where.values() if len(at) > 1]
    return tuple(min(twice)[:2]) if twice else None


def image_identities(root, paths):
    """What identifies each image file `root/paths[i]`: its real path (symbolic links resolved,
    `..` and `.` gone; case kept, so two spellings are one image only where they are one file
    name). Each folder is resolved once (a domain has few), then the file itself if it is a link.
    Returns a list of n str."""
    folders, out = {}, []
    for rel in paths:
        folder, name = os.path.split(os.path.join(root, rel))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        full = os.path.join(folders[folder], name)
        out.append(os.path.realpath(full) if os.path.islink(full) else full)
    return out


def class_name(folder):
    """The class name of a class folder: `_` -> space, as DomainNet's names are written."""
    return folder.replace("_", " ")


def same_name_folders(folders, where):
    """A UserError when two of the class folders `folders` name one class, naming both (the first
    such pair in sorted order): their `class_name`s are equal up to case, and CLIP's tokenizer
    lowercases, so their prompts are one (`t_shirt` and `t shirt`, `T-shirt` and `t-shirt`)."""
    by_name = {}
    for folder in sorted(folders):
        by_name.setdefault(class_name(folder).casefold(), []).append(folder)
    twins = sorted(names for names in by_name.values() if len(names) > 1)
    if twins:
        a, b = twins[0][:2]
        raise UserError(f"{where}: class folders {a!r} and {b!r} both name the class "
                        f"{class_name(a)!r} (`_` is a space, case is ignored as CLIP's tokenizer "
                        f"ignores it); rename or merge one of them")


def classnames_from_splits(paths, labels, source="split files"):
    """Class names in label order, from the class folder of each file (`_` -> space).

    DomainNet's label order is not `sorted(folders)`, so names must come from the split files.
    Returns a list of k names; raises UserError (the same one whatever the file order) on two
    class folders that name one class, a label used for two classes, or a label outside 0..k-1.
    """
    folders = {}  # label -> its class folders
    for p, y in zip(paths, labels.tolist()):
        folders.setdefault(y, set()).add(p.split("/")[-2])
    same_name_folders({f for fs in folders.values() for f in fs}, source)
    for y in sorted(folders):
        if len(folders[y]) > 1:
            a, b = sorted(folders[y])[:2]
            raise UserError(f"{source}: label {y} is used for both '{class_name(a)}' and "
                            f"'{class_name(b)}'")
    k = len({f for fs in folders.values() for f in fs})  # class folders: a folder of 2 labels
    bad = sorted(y for y in folders if not 0 <= y < k)  # has one beyond k - 1
    if bad:
        raise UserError(f"{source}: label {bad[0]} is outside 0..{k - 1} ({k} class folders)")
    return [class_name(next(iter(folders[y]))) for y in range(k)]


def load_domain(data_root, domain, split_root=None):
    """Read `<domain>_train.txt` and `<domain>_test.txt` (in `split_root`, default `data_root`;
    image paths relative to `data_root`); return a dict with paths, labels, names."""
    get, image_root = f"`make data DOMAIN={domain} DATA={data_root}`", data_root
    if split_root is not None:
        data_root = split_root  # written by datasets from the images under data_root
    if os.path.exists(data_root) and not os.path.isdir(data_root):
        raise UserError(f"--data-root {data_root} is a file, not a folder; pass the folder that "
                        f"holds <domain>_train.txt and <domain>_test.txt")
    if not os.path.isdir(data_root):
        raise UserError(f"data root {data_root} not found; run {get} or pass --data-root")
    for split in ("train", "test"):
        if not os.path.isfile(os.path.join(data_root, f"{domain}_{split}.txt")):
            raise UserError(f"split file {os.path.join(data_root, f'{domain}_{split}.txt')} "
                            f"not found; get it with {get}")
    splits = {s: read_split_file(os.path.join(data_root, f"{domain}_{s}.txt"))
              for s in ("train", "test")}
    (tr_paths, tr_labels), (te_paths, te_labels) = splits["train"], splits["test"]
    ids = {s: image_identities(image_root, paths) for s, (paths, _) in splits.items()}
    for s, (paths, _) in splits.items():  # one file under two spellings (a link, `..`)
        first = repeated(ids[s])
        if first is not None:
            raise UserError(f"{domain}_{s}.txt under {data_root} lists one image as both "
                            f"{paths[first[0]]} and {paths[first[1]]}; each image must appear "
                            f"once: remove one of the lines")
    train_ids = dict(zip(ids["train"], tr_paths))
    both = [(train_ids[i], p) for i, p in zip(ids["test"], te_paths) if i in train_ids]
    if both:  # the weak model would be trained on images it then labels
        spelled = "" if both[0][0] == both[0][1] else f" (as {both[0][0]} in {domain}_train.txt)"
        raise UserError(f"{len(both)} images are listed in both {domain}_train.txt and "
                        f"{domain}_test.txt under {data_root}, first {both[0][1]}{spelled}; the "
                        f"splits must be disjoint: re-download them")
    names = classnames_from_splits(tr_paths + te_paths, torch.cat([tr_labels, te_labels]),
                                   source=f"{domain}_train.txt + {domain}_test.txt")
    return {"train_paths": tr_paths, "train_labels": tr_labels, "test_paths": te_paths,
            "test_labels": te_labels, "classnames": names,
            "digest": file_digest(os.path.join(data_root, f"{domain}_train.txt"),
                                  os.path.join(data_root, f"{domain}_test.txt"))}


OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")


def image_suffixes():
    """File extensions PIL can open (lower case, with the dot)."""
    return {ext.lower() for ext in Image.registered_extensions()}


def class_images(folder, skipped):
    """{class folder name: sorted image file names} of `folder`'s sub-folders; files that are not
    images by their extension go to `skipped` (hidden files are ignored)."""
    if not folder.is_dir():
        return {}
    suffixes, classes = image_suffixes(), {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f.name for f in sub.iterdir() if f.is_file() and not f.name.startswith("."))
        classes[sub.name] = [f for f in files if Path(f).suffix.lower() in suffixes]
        skipped += [str(sub / f) for f in files if Path(f).suffix.lower() not in suffixes]
    return classes


def check_classes(classes, where):
    """A UserError for no class folder, a class folder without an image, or two class folders
    that name one class (`same_name_folders`)."""
    if not classes:
        raise UserError(f"{where} holds no class folders; expected {where}/<class>/<image>")
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise UserError(f"{where}/{empty[0]} holds no images ({len(empty)} empty class folders); "
                        f"remove it or add images")
    same_name_folders(classes, where)


def stratified_split(classes, share, seed):
    """Per class (in the given order), a seeded permutation of its files: the first
    round(share * n) go to train, the rest to test, at least one to each.
    Returns: (train, test) lists of (file name, class index)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, (name, files) in enumerate(classes.items()):
        if len(files) < 2:
            raise UserError(f"class {name} has {len(files)} image; a split needs at least 2 per "
                            f"class")
        order = torch.randperm(len(files), generator=g).tolist()
        n_train = min(max(round(share * len(files)), 1), len(files) - 1)
        train += [(files[i], label) for i in sorted(order[:n_train])]
        test += [(files[i], label) for i in sorted(order[n_train:])]
    return train, test


def domain_folder(root, domain, dataset, found):
    """The folder of `domain` under `root` (Office-Home's Real World / Real_World either way), or
    a UserError listing the domains `found`."""
    for name in (domain, domain.replace("_", " "), domain.replace(" ", "_")):
        if (root / name).is_dir():
            return root / name
    raise UserError(f"--domain {domain}: no such {dataset} domain folder under {root}; found: "
                    f"{', '.join(found) or 'none'}")


def officehome_lists(root, domain, share=0.8, seed=0):
    """Office-Home: every image of `<root>/<domain>/<class>/`, split per class by `share`; every
    domain folder under `root` must hold the same class folders (one label order for all)."""
    found = sorted(p.name.replace(" ", "_") for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith("."))
    folder = domain_folder(root, domain, "officehome", found)
    skipped = []
    classes = class_images(folder, skipped)
    check_classes(classes, folder)
    for other in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and p != folder):  # the domains share one class list, one label order
        theirs = {c.name for c in other.iterdir() if c.is_dir() and not c.name.startswith(".")}
        differ = sorted(theirs ^ set(classes))
        if differ:
            has, lacks = (other, folder) if differ[0] in theirs else (folder, other)
            raise UserError(f"class folder {differ[0]} is in {has} but not in {lacks} "
                            f"({len(differ)} classes differ): Office-Home's domains share one "
                            f"class list and label order; restore it, or keep only the classes "
                            f"every domain has")
    train, test = stratified_split(classes, share, seed)
    names = list(classes)
    rel = lambda f, y: (f"{folder.name}/{names[y]}/{f}", y)
    return [rel(*t) for t in train], [rel(*t) for t in test], names, skipped


def folder_lists(root, domain, share=None, seed=None):
    """A folder of one's own: `<root>/<domain>/{train,test}/<class>/<image>`."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and (p / "train").is_dir())
    folder = domain_folder(root, domain, "folder", found)
    skipped, splits = [], {}
    for split in ("train", "test"):
        if not (folder / split).is_dir():
            raise UserError(f"{folder} has no {split}/ folder; the folder layout is "
                            f"<root>/<domain>/{{train,test}}/<class>/<image>")
        splits[split] = class_images(folder / split, skipped)
        check_classes(splits[split], folder / split)
    only = sorted(set(splits["train"]) ^ set(splits["test"]))
    if only:
        side = "train" if only[0] in splits["train"] else "test"
        raise UserError(f"class {only[0]} is in {folder}/{side} only ({len(only)} classes in one "
                        f"split only); every class needs images in both train/ and test/")
    names = class_order(root, sorted(splits["train"]))
    lists = {s: [(f"{folder.name}/{s}/{c}/{f}", y) for y, c in enumerate(names)
                 for f in splits[s][c]] for s in splits}
    return lists["train"], lists["test"], names, skipped


def class_order(root, folders):
    """Class folders in label order: the lines of `<root>/classnames.txt`, which must name each
    folder once, else `folders` sorted."""
    path = root / "classnames.txt"
    if not path.is_file():
        return sorted(folders)
    try:
        lines = [l.strip() for l in path.read_text(encoding="utf-8-sig").splitlines() if l.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8, one class folder per line")
    twice = sorted({l for l in lines if lines.count(l) > 1})
    extra, missing = sorted(set(lines) - set(folders)), sorted(set(folders) - set(lines))
    if twice or extra or missing:
        what = (f"lists {twice[0]} twice" if twice else f"lists {extra[0]}, which has no folder"
                if extra else f"lacks the class folder {missing[0]}")
        nfc = lambda names: {unicodedata.normalize("NFC", n) for n in names}  # noqa: E731
        if not twice and nfc(extra) & nfc(missing):  # a copy from macOS writes names as NFD
            what += (" (a folder of that name differs only in its Unicode normalisation, NFC "
                     "or NFD: write both the same way)")
        raise UserError(f"{path} {what}; it must name each class folder once, in label order")
    return lines


LAYOUTS = {"officehome": officehome_lists, "folder": folder_lists}


def write_splits(dataset, root, domain, split_dir, share=0.8, seed=0, check=None):
    """Read `dataset`'s layout under `root` and write `<split_dir>/<domain>_{train,test}.txt` in
    DomainNet's format (`<path> <label>`, paths relative to `root`), after `check(root, paths)`
    has passed on every image; nothing is written before. Returns the number of skipped files
    and the first of them."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder; pass the folder that holds the "
                        f"{dataset} domains")
    train, test, _, skipped = LAYOUTS[dataset](root, domain, share, seed)
    if check is not None:
        check(str(root), [p for p, _ in train + test])
    for split, rows in (("train", train), ("test", test)):
        atomic_save("".join(f"{p} {y}\n" for p, y in rows), Path(split_dir) / f"{domain}_{split}.txt")
    return len(skipped), (skipped[0] if skipped else None)
