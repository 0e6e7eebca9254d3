"""Other data layouts read into DomainNet's split-file format, and the thorough checks of split
files; DomainNet's own files and the image loading are w2s_clip.py's (`load_domain`, `ImageList`).

    python -m w2s_clip_lab.run --dataset officehome --data-root data/OfficeHome --domain Art --method all
    python -m w2s_clip_lab.run --dataset folder --data-root my_images --domain photos --method all

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
import os
import unicodedata
from pathlib import Path

import torch
from PIL import Image

import w2s_clip
from w2s_clip import (EpochSampler, ImageList, UserError, atomic_save,  # noqa: F401 (re-exported)
                      decode_image, file_digest, make_loader, read_split_file)

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
    """`w2s_clip.classnames_from_splits` after `same_name_folders`: two class folders that name one
    class are refused first, in one line naming both, whatever the order of the lines."""
    same_name_folders({p.split("/")[-2] for p in paths}, source)
    return w2s_clip.classnames_from_splits(paths, labels, source)


def load_domain(data_root, domain, split_root=None):
    """`w2s_clip.load_domain`, then the thorough checks of `check_identities`: the same dict."""
    data = w2s_clip.load_domain(data_root, domain, split_root)
    check_identities(data_root, domain, data, split_root)
    return data


def check_identities(data_root, domain, data, split_root=None):
    """The package's thorough check of a domain's split files, beyond `w2s_clip.load_domain`'s:
    one image listed under two spellings (a link, `..`), or in both splits under two spellings,
    and two class folders that name one class (`same_name_folders`); a UserError names them."""
    where = split_root or data_root
    ids = {s: image_identities(data_root, data[f"{s}_paths"]) for s in ("train", "test")}
    for s in ids:
        first = repeated(ids[s])
        if first is not None:
            paths = data[f"{s}_paths"]
            raise UserError(f"{domain}_{s}.txt under {where} lists one image as both "
                            f"{paths[first[0]]} and {paths[first[1]]}; each image must appear "
                            f"once: remove one of the lines")
    train_ids = dict(zip(ids["train"], data["train_paths"]))
    both = [(train_ids[i], p) for i, p in zip(ids["test"], data["test_paths"]) if i in train_ids]
    if both:  # the weak model would be trained on images it then labels
        spelled = "" if both[0][0] == both[0][1] else f" (as {both[0][0]} in {domain}_train.txt)"
        raise UserError(f"{len(both)} images are listed in both {domain}_train.txt and "
                        f"{domain}_test.txt under {where}, first {both[0][1]}{spelled}; the "
                        f"splits must be disjoint: re-download them")
    same_name_folders({p.split("/")[-2] for p in data["train_paths"] + data["test_paths"]},
                      f"{domain}_train.txt + {domain}_test.txt")


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
