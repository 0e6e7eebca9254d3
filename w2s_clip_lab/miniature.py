"""A miniature DomainNet and a tiny CLIP pretrained on the spot, so w2s_clip runs on a CPU.

The miniature keeps what the paper's setting needs: DomainNet's shape (six named domains, a label
order that is not sorted(), written in the folder layout of `--dataset folder` or in DomainNet's
split-file or Office-Home's layout), domains that shift the style, classes that a small weak model
confuses image by image, and a strong model that has learnt image-text matching before it sees
any weak label: an open_clip CLIP from a JSON config, pretrained with open_clip's own contrastive
loss (`open_clip.loss.ClipLoss`, CLIP's L_CLIP) on an endless stream of synthetic captioned images
drawn apart from the demo's D_train / D_test files. Manual: docs/usage.md ("The demo in detail").

    # data, tiny CLIP config and a checkpoint pretrained for 1000 steps (cached), about a minute
    python -m w2s_clip_lab.miniature --out demo --pretrain-steps 1000
    python -m w2s_clip_lab.run --dataset folder --data-root demo/data --clip-model demo/tiny-clip.json \\
        --clip-pretrained demo/tiny-clip-1000steps.pt --weak-model test_resnet --no-weak-pretrained \\
        --weak-input-size 32 --batch-size 45 --domain sketch --method weak ceiling kd-lp cpl \\
        --device cpu --cache-dir demo/cache
    # the pretraining table from runs made with 0, a few and many pretraining steps
    python -m w2s_clip_lab.miniature --pretraining-table 0=demo/pretraining-runs/0 \\
        300=demo/pretraining-runs/300 --tables-dir demo/results
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import w2s_clip
from w2s_clip import DOMAINS, UserError
from w2s_clip_lab import checks, files, report

# DomainNet's 345 classes (its folder names), in the label order of its split files.
DOMAINNET_CLASSES = (
    "aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel", "animal_migration", "ant",
    "anvil", "apple", "arm", "asparagus", "axe", "backpack", "banana", "bandage", "barn",
    "baseball", "baseball_bat", "basket", "basketball", "bat", "bathtub", "beach", "bear", "beard",
    "bed", "bee", "belt", "bench", "bicycle", "binoculars", "bird", "birthday_cake", "blackberry",
    "blueberry", "book", "boomerang", "bottlecap", "bowtie", "bracelet", "brain", "bread", "bridge",
    "broccoli", "broom", "bucket", "bulldozer", "bus", "bush", "butterfly", "cactus", "cake",
    "calculator", "calendar", "camel", "camera", "camouflage", "campfire", "candle", "cannon",
    "canoe", "car", "carrot", "castle", "cat", "ceiling_fan", "cello", "cell_phone", "chair",
    "chandelier", "church", "circle", "clarinet", "clock", "cloud", "coffee_cup", "compass",
    "computer", "cookie", "cooler", "couch", "cow", "crab", "crayon", "crocodile", "crown",
    "cruise_ship", "cup", "diamond", "dishwasher", "diving_board", "dog", "dolphin", "donut",
    "door", "dragon", "dresser", "drill", "drums", "duck", "dumbbell", "ear", "elbow", "elephant",
    "envelope", "eraser", "eye", "eyeglasses", "face", "fan", "feather", "fence", "finger",
    "fire_hydrant", "fireplace", "firetruck", "fish", "flamingo", "flashlight", "flip_flops",
    "floor_lamp", "flower", "flying_saucer", "foot", "fork", "frog", "frying_pan", "garden",
    "garden_hose", "giraffe", "goatee", "golf_club", "grapes", "grass", "guitar", "hamburger",
    "hammer", "hand", "harp", "hat", "headphones", "hedgehog", "helicopter", "helmet", "hexagon",
    "hockey_puck", "hockey_stick", "horse", "hospital", "hot_air_balloon", "hot_dog", "hot_tub",
    "hourglass", "house", "house_plant", "hurricane", "ice_cream", "jacket", "jail", "kangaroo",
    "key", "keyboard", "knee", "knife", "ladder", "lantern", "laptop", "leaf", "leg", "light_bulb",
    "lighter", "lighthouse", "lightning", "line", "lion", "lipstick", "lobster", "lollipop",
    "mailbox", "map", "marker", "matches", "megaphone", "mermaid", "microphone", "microwave",
    "monkey", "moon", "mosquito", "motorbike", "mountain", "mouse", "moustache", "mouth", "mug",
    "mushroom", "nail", "necklace", "nose", "ocean", "octagon", "octopus", "onion", "oven", "owl",
    "paintbrush", "paint_can", "palm_tree", "panda", "pants", "paper_clip", "parachute", "parrot",
    "passport", "peanut", "pear", "peas", "pencil", "penguin", "piano", "pickup_truck",
    "picture_frame", "pig", "pillow", "pineapple", "pizza", "pliers", "police_car", "pond", "pool",
    "popsicle", "postcard", "potato", "power_outlet", "purse", "rabbit", "raccoon", "radio", "rain",
    "rainbow", "rake", "remote_control", "rhinoceros", "rifle", "river", "roller_coaster",
    "rollerskates", "sailboat", "sandwich", "saw", "saxophone", "school_bus", "scissors",
    "scorpion", "screwdriver", "sea_turtle", "see_saw", "shark", "sheep", "shoe", "shorts",
    "shovel", "sink", "skateboard", "skull", "skyscraper", "sleeping_bag", "smiley_face", "snail",
    "snake", "snorkel", "snowflake", "snowman", "soccer_ball", "sock", "speedboat", "spider",
    "spoon", "spreadsheet", "square", "squiggle", "squirrel", "stairs", "star", "steak", "stereo",
    "stethoscope", "stitches", "stop_sign", "stove", "strawberry", "streetlight", "string_bean",
    "submarine", "suitcase", "sun", "swan", "sweater", "swing_set", "sword", "syringe", "table",
    "teapot", "teddy-bear", "telephone", "television", "tennis_racquet", "tent", "The_Eiffel_Tower",
    "The_Great_Wall_of_China", "The_Mona_Lisa", "tiger", "toaster", "toe", "toilet", "tooth",
    "toothbrush", "toothpaste", "tornado", "tractor", "traffic_light", "train", "tree", "triangle",
    "trombone", "truck", "trumpet", "t-shirt", "umbrella", "underwear", "van", "vase", "violin",
    "washing_machine", "watermelon", "waterslide", "whale", "wheel", "windmill", "wine_bottle",
    "wine_glass", "wristwatch", "yoga", "zebra", "zigzag",
)
assert len(DOMAINNET_CLASSES) == 345


DEMO_CLASSES = ("aircraft_carrier", "zebra", "The_Eiffel_Tower", "t-shirt", "apple", "bicycle",
                "lighthouse", "umbrella", "cat", "house")  # the ten-class presets' (not sorted())


def spread_classes(k, names=DOMAINNET_CLASSES):
    """k of DomainNet's names spread evenly over its label order: names[floor(i * 345 / k)]."""
    return tuple(names[i * len(names) // k] for i in range(k))


TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                             "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                          "layers": 2}}
# How each domain draws the same classes: colour saturation, stripe contrast, background clutter,
# pixel noise, blur (box-filter passes) and a hue shift (in turns of the colour wheel).
DOMAIN_STYLES = {"clipart": dict(sat=0.9, contrast=0.6, clutter=0.0, noise=0.04, blur=0, hue=0.00),
                 "infograph": dict(sat=0.8, contrast=0.5, clutter=0.35, noise=0.06, blur=0, hue=0.02),
                 "painting": dict(sat=0.7, contrast=0.45, clutter=0.15, noise=0.05, blur=2, hue=-0.02),
                 "quickdraw": dict(sat=0.45, contrast=0.8, clutter=0.0, noise=0.03, blur=0, hue=0.0),
                 "real": dict(sat=0.75, contrast=0.4, clutter=0.25, noise=0.08, blur=1, hue=0.01),
                 "sketch": dict(sat=0.55, contrast=0.7, clutter=0.1, noise=0.06, blur=1, hue=-0.01)}
# D_test images per class of the paper preset, from Table 1: DomainNet's #test / 345 (14,604,
# 15,582, 21,850, 51,750, 52,041 and 20,916 images), so that hold-train (64% of D_test) holds the
# paper's 27, 29, 40.5, 96, 96.5 and 39 images per class.
PAPER_TEST_PER_CLASS = {"clipart": 42, "infograph": 45, "painting": 63, "quickdraw": 150,
                        "real": 151, "sketch": 61}
# The presets (`--regime`). Each: its classes (label order); the domains' styles, with `jitter` the
# per-image hue noise in units of the gap between classes; `label_noise`, the share of a domain's
# images that show another class than their label (drawn uniformly), which bounds every model's
# accuracy there, as label noise and ambiguous images bound it on DomainNet; D_train and D_test
# images per class; the domains of the pretraining stream and, optionally, how often each is drawn.
REGIMES = {
    "easy": dict(classes=DEMO_CLASSES,
                 styles={d: dict(st, jitter=0.5) for d, st in DOMAIN_STYLES.items()},
                 label_noise=dict.fromkeys(DOMAINS, 0.0), train_per_class=dict.fromkeys(DOMAINS, 30),
                 test_per_class=dict.fromkeys(DOMAINS, 300), pretrain_domains=DOMAINS),
}
# The ten-class paper preset of earlier versions: Table 2's weak and ceiling per domain, but not
# the paper's images per class, steps or zero-shot (docs/miniature.md).
REGIMES["paper-10class"] = dict(
    classes=DEMO_CLASSES,
    styles={"clipart": dict(DOMAIN_STYLES["clipart"], jitter=0.2),
            "infograph": dict(DOMAIN_STYLES["infograph"], jitter=0.35),
            "painting": dict(DOMAIN_STYLES["painting"], jitter=0.25),
            "quickdraw": dict(DOMAIN_STYLES["quickdraw"], sat=0.25, hue=0.5, jitter=0.4),
            "real": dict(DOMAIN_STYLES["real"], jitter=0.1),
            "sketch": dict(DOMAIN_STYLES["sketch"], jitter=0.4)},
    label_noise={"clipart": 0.22, "infograph": 0.40, "painting": 0.23, "quickdraw": 0.44,
                 "real": 0.13, "sketch": 0.26},
    train_per_class={"clipart": 30, "infograph": 24, "painting": 35, "quickdraw": 100, "real": 60,
                     "sketch": 50},
    test_per_class=dict.fromkeys(DOMAINS, 300),
    pretrain_domains=tuple(d for d in DOMAINS if d != "quickdraw"))
# The paper preset: 30 classes, the paper's images per class (PAPER_TEST_PER_CLASS), and per
# domain Table 2's weak and ceiling and CLIP's zero-shot against the weak model (docs/miniature.md,
# "How the paper preset was calibrated"; the Makefile gives it the paper's batch and epochs).
REGIMES["paper"] = dict(
    classes=spread_classes(30),
    styles={**REGIMES["paper-10class"]["styles"],  # QuickDraw unturned: its hue shift sets it
            "quickdraw": dict(DOMAIN_STYLES["quickdraw"], jitter=0.4)},
    label_noise={"clipart": 0.23, "infograph": 0.46, "painting": 0.26, "quickdraw": 0.45,
                 "real": 0.11, "sketch": 0.35},
    train_per_class={"clipart": 190, "infograph": 200, "painting": 420, "quickdraw": 210, "real": 350,
                     "sketch": 190},
    test_per_class=PAPER_TEST_PER_CLASS,
    pretrain_domains=DOMAINS,
    hue_shift={"clipart": 0.91, "infograph": 0.9, "painting": 1.65, "quickdraw": 2.13, "real": 0.77,
               "sketch": 1.23})
# Caption words for the domains: pretraining captions read "a {word} of a {class}".
DOMAIN_WORDS = {"clipart": "clipart", "infograph": "infographic", "painting": "painting",
                "quickdraw": "drawing", "real": "photo", "sketch": "sketch"}
GENERATOR_VERSION = 3  # part of every cache key: bump when render() changes
MANIFEST = "miniature.json"  # marks a folder this module wrote
EARLIER_MANIFESTS = ("minidomainnet.json",)  # its name in earlier versions: still ours, renamed


# ------------------------------------------------------------------------------------------------
# The generator: classes are a hue plus a stripe angle; per-image jitter makes them overlap
# ------------------------------------------------------------------------------------------------
def class_codes(num_classes):
    """Each class's hue (turns, [k]) and stripe angle (radians, [k]).

    Hues are evenly spaced, so no two classes share a colour; hue neighbours get stripe angles
    `stripe_step` steps of pi/k apart, so a model must read the stripes where the colours overlap.
    """
    hue = torch.arange(num_classes) / num_classes
    step = stripe_step(num_classes)
    angle = math.pi * ((torch.arange(num_classes) * step) % num_classes) / num_classes
    return hue, angle


def stripe_step(k):
    """The step s of the stripe angles (s * pi / k between hue neighbours, s coprime with k) that
    keeps classes one and two hues apart furthest apart in angle: the largest min(||s/k||,
    ||2s/k||), ||x|| the distance to the nearest integer (angles repeat every pi). Ties go to 3,
    the step of the first miniatures (ten classes: 3; thirty: 11, 66 and 48 degrees apart)."""
    apart = lambda s: round(min(abs(x - round(x)) for x in (s / k, 2 * s / k)), 9)  # noqa: E731
    steps = [s for s in range(1, k) if math.gcd(s, k) == 1] or [1]
    best = max(map(apart, steps))
    return 3 if 3 in steps and apart(3) == best else min(s for s in steps if apart(s) == best)


def hsv_to_rgb(h, s, v):
    """HSV (each [n], h in turns) to RGB [n, 3] in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6
    return v[:, None] * (1 - s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1)))


def render(labels, domains, g, num_classes, size=32, styles=None):
    """Images [n, 3, size, size] in [0, 1] of classes `labels` [n] in domain names `domains` (n).

    An image is a striped disc (class hue and angle, jittered) at a random place and size over a
    background whose clutter, and whose colour saturation, contrast, noise and blur, come from the
    domain's style in `styles` (default: the paper preset's); its `jitter` is the per-image hue
    noise in units of the gap between classes.
    """
    n = len(labels)
    styles = REGIMES["paper"]["styles"] if styles is None else styles
    st = {k: torch.tensor([styles[d][k] for d in domains], dtype=torch.float)
          for k in ("sat", "contrast", "clutter", "noise", "blur", "hue", "jitter")}
    hue, angle = class_codes(num_classes)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    h = hue[labels] + st["hue"] + st["jitter"] / num_classes * torch.randn(n, generator=g)
    colour = hsv_to_rgb(h % 1, st["sat"] * (0.8 + 0.2 * u(n)), 0.6 + 0.4 * u(n))  # (n, 3)
    a = angle[labels] + 0.15 * torch.randn(n, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    freq, phase = 6 + 4 * u(n, 1, 1), 2 * math.pi * u(n, 1, 1)
    stripes = torch.sin(freq * (xx * a.cos()[:, None, None] + yy * a.sin()[:, None, None]) + phase)
    cx, cy, r = 0.5 * (2 * u(3, n, 1, 1) - 1)
    r = 0.5 + 0.3 * (r + 0.5)
    disc = torch.sigmoid((r - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()) * 12)  # (n, S, S)
    body = colour[:, :, None, None] * (1 - st["contrast"][:, None, None, None]
                                       * (0.5 + 0.5 * stripes[:, None]))
    fx, fy, bg_phase = 1 + 3 * u(2, n, 1, 1, 1), 1 + 3 * u(2, n, 1, 1, 1), 2 * math.pi * u(n, 3, 1, 1)
    clutter = torch.sin(fx[0] * 3 * xx + fy[0] * 3 * yy + bg_phase) * torch.cos(fx[1] * 2 * xx - fy[1] * 2 * yy)
    background = 0.5 + st["clutter"][:, None, None, None] * clutter
    img = disc[:, None] * body + (1 - disc[:, None]) * background
    for passes in range(1, 3):  # domain blur: `blur` passes of a 3x3 box filter
        blurred = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
        img = torch.where((st["blur"] >= passes)[:, None, None, None], blurred, img)
    img = img + st["noise"][:, None, None, None] * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


LAYOUTS = ("domainnet", "folder", "officehome")


def data_styles(preset, num_classes):
    """The styles of a preset's data set (D_train, D_test): its `styles`, which the pretraining
    stream draws, each domain's hue turned by its `hue_shift` (in gaps between class hues; none
    where the preset gives none): how far a domain's images stand from what CLIP saw of that style,
    which sets its zero-shot accuracy and leaves the weak model and the ceiling alone."""
    shift = preset.get("hue_shift", {})
    return {d: dict(st, hue=st["hue"] + shift.get(d, 0.0) / num_classes)
            for d, st in preset["styles"].items()}


def make_synthetic_domainnet(root, domains=DOMAINS, classes=None, n_train=None, n_test=None,
                             size=32, seed=0, layout="domainnet", regime="paper"):
    """Write a synthetic dataset with labels in `classes` order (not sorted()), in one of three
    layouts (the same images, names and label order in each):
    - domainnet: `root/<domain>/<class>/<file>.jpg` and `root/<domain>_{train,test}.txt`;
    - folder: `root/<domain>/{train,test}/<class>/<file>.jpg` and `root/classnames.txt`;
    - officehome: `root/<domain>/<class>/<file>.jpg`, train and test images together.

    classes None: the regime's; n_train / n_test are images per class (None: the regime's
    `train_per_class` / `test_per_class`); the images come from `render` under `seed` in the styles
    of REGIMES[regime], a share `label_noise` of each domain's images showing another class than
    their label.
    """
    preset = REGIMES[regime]
    classes = preset["classes"] if classes is None else classes
    g = torch.Generator().manual_seed(seed)
    for domain in domains:
        per_class = {"train": preset["train_per_class"][domain] if n_train is None else n_train,
                     "test": preset["test_per_class"][domain] if n_test is None else n_test}
        for split, n in per_class.items():
            labels = torch.arange(len(classes)).repeat_interleave(n)
            shown = shown_classes(labels, preset["label_noise"][domain], len(classes), g)
            images = render(shown, [domain] * len(labels), g, len(classes), size,
                            data_styles(preset, len(classes)))
            arrays = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
            lines = []
            for j, (c, array) in enumerate(zip(labels.tolist(), arrays)):
                folder = f"{domain}/{split}/{classes[c]}" if layout == "folder" else f"{domain}/{classes[c]}"
                os.makedirs(Path(root) / folder, exist_ok=True)
                rel = f"{folder}/{domain}_{split}_{c:03d}_{j % n:04d}.jpg"
                Image.fromarray(array).save(Path(root) / rel, quality=95)
                lines.append(f"{rel} {c}\n")
            if layout == "domainnet":
                files.atomic_save("".join(lines), Path(root) / f"{domain}_{split}.txt")
    if layout == "folder":
        files.atomic_save("".join(f"{c}\n" for c in classes), Path(root) / "classnames.txt")


def shown_classes(labels, share, num_classes, g):
    """The class each image shows [n]: its label, or for a share `share` of the images (drawn
    from `g`, and nothing drawn when share is 0) a uniformly drawn other class."""
    if share == 0:
        return labels
    noisy = torch.rand(len(labels), generator=g) < share
    other = (labels + torch.randint(1, num_classes, (len(labels),), generator=g)) % num_classes
    return torch.where(noisy, other, labels)


def make_demo(folder, flag="--make-demo", **kwargs):
    """`--make-demo DIR`: DIR/data (synthetic; the `layout` of kwargs) and DIR/tiny-clip.json.

    DIR must be new, empty, or a folder this function wrote before (it holds MANIFEST); a rerun
    with the same settings keeps the data. Raises UserError for a folder with other files.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    for name in EARLIER_MANIFESTS:  # a folder an earlier version wrote: keep it, under the new name
        earlier = folder / name
        if earlier.is_file() and not earlier.is_symlink() and not manifest.exists():
            try:
                earlier.replace(manifest)
            except OSError:  # a folder it may not write: read the manifest where it is
                manifest = earlier
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; pick a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not manifest.is_file():
        raise UserError(f"{flag} {folder} holds files the demo did not write (no {MANIFEST}); "
                        f"pick a new or empty folder")
    key = files.cache_key(version=GENERATOR_VERSION,
                                   preset=REGIMES[kwargs.get("regime", "paper")], **kwargs)
    try:
        old = json.loads(manifest.read_text()) if manifest.is_file() else {}
    except ValueError:  # a damaged manifest: the folder is still ours, rewrite it
        old = {}
    if (folder / "data").is_symlink():  # never write or delete through a link
        raise UserError(f"{flag} {folder}: {folder / 'data'} is a symbolic link; the demo writes "
                        f"only into folders of its own: remove the link or pick another folder")
    if old.get("data_key") == key and old.get("complete"):
        print(f"{folder}/data is up to date")
    else:
        checks.check_writable(folder, flag)
        files.atomic_save({"written_by": "w2s_clip_lab.miniature", "data_key": key, "complete": False},
                             manifest)
        shutil.rmtree(folder / "data", ignore_errors=True)  # ours: the manifest says so
        make_synthetic_domainnet(folder / "data", **kwargs)
        files.atomic_save({"written_by": "w2s_clip_lab.miniature", "data_key": key, "complete": True},
                             manifest)
        print(f"wrote {folder}/data")
    files.atomic_save(TINY_CLIP, folder / "tiny-clip.json")
    print(f"wrote {folder}/tiny-clip.json")


# ------------------------------------------------------------------------------------------------
# Pretraining the tiny CLIP: L_CLIP on an endless stream of captioned images
# ------------------------------------------------------------------------------------------------
def captions(labels, domains, classes, g, wrong=0.2, none=0.2):
    """Noisy captions "a {domain word} of a {class}" for labels [n] and domain names (n).

    A share `wrong` names a random other class, a share `none` names no class ("a {word}").
    """
    n = len(labels)
    draw = torch.rand(n, generator=g)
    other = (labels + torch.randint(1, len(classes), (n,), generator=g)) % len(classes)
    said = torch.where(draw < wrong, other, labels).tolist()
    return [f"a {DOMAIN_WORDS[d]}" if p >= 1 - none else
            f"a {DOMAIN_WORDS[d]} of a {classes[c].replace('_', ' ')}"
            for d, c, p in zip(domains, said, draw.tolist())]


def caption_vocabulary(tokenizer, classes, domains=DOMAINS, templates=("a photo of a {}.",)):
    """Sorted token ids [u] that any caption, or any zero-shot prompt, can contain."""
    words = [DOMAIN_WORDS[d] for d in domains]
    texts = [f"a {w}" for w in words] + [f"a {w} of a {c.replace('_', ' ')}" for w in words
                                         for c in classes]
    texts += [t.format(c.replace("_", " ")) for t in templates for c in classes]
    return torch.unique(tokenizer(texts))


class CaptionEmbedding(nn.Module):
    """The token-embedding rows `ids` [u] of a CLIP, trained in place of the full [V, w] table.

    Exact: rows no caption uses get zero gradient, so AdamW (without weight decay on this table)
    leaves them unchanged; only the u used rows need optimiser state.
    """

    def __init__(self, token_embedding, ids):
        super().__init__()
        self.rows = nn.Parameter(token_embedding.weight.detach()[ids].clone())  # (u, w)
        index = torch.zeros(token_embedding.num_embeddings, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        self.register_buffer("index", index)
        self.register_buffer("ids", ids)

    def forward(self, tokens):
        return self.rows[self.index[tokens]]  # (n, L, w)

    @torch.no_grad()
    def write_back(self, token_embedding):
        token_embedding.weight[self.ids] = self.rows


def encode_captions(clip_model, embed, tokenizer, texts):
    """Text features [n, d] of `texts`, running the text tower only up to the last end-of-text
    token (w2s_clip.TextTower); equal to `clip_model.encode_text(tokenizer(texts))`."""
    tokens, eot = w2s_clip.tokenize_prompts(clip_model, tokenizer, texts)
    return w2s_clip.TextTower(clip_model)(embed(tokens), eot)


def clip_step_loss(clip_model, embed, tokenizer, images, texts, loss_fn):
    """L_CLIP of one batch: images [n, 3, S, S] (normalised), texts (n) -> scalar."""
    image_features = F.normalize(clip_model.encode_image(images), dim=-1)
    text_features = F.normalize(encode_captions(clip_model, embed, tokenizer, texts), dim=-1)
    return loss_fn(image_features, text_features, clip_model.logit_scale.exp())


def clip_optimizer(clip_model, embed, lr, weight_decay=0.1):
    """AdamW as open_clip trains CLIP: weight decay on matrices, none on gains, biases, the
    temperature and the token-embedding table (so that training its used rows alone is exact).

    `embed` is a CaptionEmbedding (its rows join the no-decay group) or the model's own
    token_embedding (the plain computation)."""
    decay, no_decay = [], []
    for name, p in clip_model.named_parameters():
        if p.requires_grad:
            matrix = p.ndim >= 2 and "ln" not in name and not name.startswith("token_embedding")
            (decay if matrix else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay + [p for p in embed.parameters()  # its rows
                                                     if all(p is not q for q in no_decay)],
                               "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def normalise(images):
    """Images in [0, 1] -> CLIP's input (OpenAI mean and std, which open_clip's tiny config uses)."""
    import open_clip
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    return (images - mean) / std


@torch.no_grad()
def zero_shot_accuracy(clip_model, tokenizer, classes, domains=DOMAINS, n=600, seed=10**6, size=32,
                       regime="paper"):
    """Zero-shot accuracy with "a photo of a {class}." on n fresh images of `domains` (their own
    seed, the styles of REGIMES[regime], every image showing its label)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(classes), (n,), generator=g)
    doms = [domains[i] for i in torch.randint(len(domains), (n,), generator=g).tolist()]
    images = normalise(render(labels, doms, g, len(classes), size,
                              data_styles(REGIMES[regime], len(classes))))
    protos = w2s_clip.text_prototypes(clip_model.eval(), tokenizer,
                                      [c.replace("_", " ") for c in classes], ["a photo of a {}."],
                                      normalize=True)
    logits = F.normalize(clip_model.encode_image(images), dim=-1) @ protos.T
    return w2s_clip.accuracy(logits, labels)


def pretrain_clip(config, steps, classes=None, domains=None, batch_size=128, lr=2e-3,
                  warmup_ratio=0.1, caption_noise=(0.2, 0.2), seed=0, log_every=50, regime="paper"):
    """Pretrain an open_clip CLIP built from `config` (a model-config dict) with ClipLoss.

    Every step draws `batch_size` new images (classes uniform over `classes`, default the
    regime's; domains uniform over `domains`, default the regime's `pretrain_domains`; from
    `render` in the regime's `styles`, seeded by `seed`) with noisy captions (`captions`, shares `caption_noise` = (wrong, none)); the learning
    rate warms up linearly, then decays along a cosine. Steps 0 returns the seeded random init.
    Returns:
        (state_dict of the model, list of per-step losses)
    """
    import open_clip
    preset = REGIMES[regime]
    classes = preset["classes"] if classes is None else classes
    domains = preset["pretrain_domains"] if domains is None else domains
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    embed = CaptionEmbedding(model.token_embedding, caption_vocabulary(tokenizer, classes, domains))
    model.token_embedding.requires_grad_(False)
    opt = clip_optimizer(model, embed, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: w2s_clip.warmup_cosine(s, steps, warmup_ratio))
    loss_fn, g, losses = open_clip.loss.ClipLoss(), torch.Generator().manual_seed(seed), []
    size = config["vision_cfg"]["image_size"]
    model.train()
    for step in range(steps):
        labels = torch.randint(len(classes), (batch_size,), generator=g)
        doms = [domains[i] for i in torch.randint(len(domains), (batch_size,), generator=g).tolist()]
        texts = captions(labels, doms, classes, g, *caption_noise)
        images = normalise(render(labels, doms, g, len(classes), size, preset["styles"]))
        loss = clip_step_loss(model, embed, tokenizer, images, texts, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"pretraining step {step + 1}/{steps}: L_CLIP {loss.item():.3f}", flush=True)
    embed.write_back(model.token_embedding)
    return model.eval().state_dict(), losses


def pretrained_checkpoint(folder, steps, config=TINY_CLIP, force=False, **kwargs):
    """`folder/tiny-clip-{steps}steps.pt`, pretrained by `pretrain_clip` unless the file's
    sidecar `.json` holds the same key (config, steps, every pretraining argument, versions).
    Written atomically. Returns (path, info dict with key, zero_shot_accuracy, seconds, losses)."""
    import open_clip
    kwargs = {"regime": "paper", **kwargs}  # one key whether the regime is given or defaulted
    path, info_path = Path(folder) / f"tiny-clip-{steps}steps.pt", Path(folder) / f"tiny-clip-{steps}steps.json"
    key = files.cache_key(config=config, steps=steps, version=GENERATOR_VERSION,
                             torch=torch.__version__, open_clip=open_clip.__version__,
                             preset=REGIMES[kwargs["regime"]],
                             **{k: v for k, v in kwargs.items() if k != "log_every"})
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):  # missing or damaged: derived data, recompute
        info = {}
    if info.get("key") == key and path.is_file() and not force:
        return path, {**info, "cached": True}
    start = time.time()
    state, losses = pretrain_clip(config, steps, **kwargs)
    seconds = time.time() - start
    model = open_clip.CLIP(**config)
    model.load_state_dict(state)
    names = kwargs.get("classes") or REGIMES[kwargs["regime"]]["classes"]
    zs = zero_shot_accuracy(model, open_clip.get_tokenizer("ViT-B-32"), names,
                            regime=kwargs["regime"])
    files.atomic_save(state, path)
    info = {"key": key, "steps": steps, "seconds": seconds, "zero_shot_accuracy": zs,
            "chance": 1 / len(names), "losses": losses}
    files.atomic_save(info, info_path)
    return path, info


# ------------------------------------------------------------------------------------------------
# The pretraining table: CPL against the best baseline as the strong model's pretraining grows
# ------------------------------------------------------------------------------------------------
def seed_means(rows):
    """{method: {seed: test accuracy in %}} from report.load_results rows (one domain)."""
    out = {}
    for r in rows:
        out.setdefault(r["method"], {})[r["seed"]] = 100 * r["test_accuracy"]
    return out


def pretraining_row(label, acc):
    """One table row from {method: {seed: accuracy %}}: weak, zero-shot, ceiling, the best
    baseline (highest mean among the other weak-to-strong methods), CPL, CPL − best, and the PGR
    of the best baseline and of CPL (on the means over seeds, `n/a` where ceiling <= weak, as
    report.pgr_text prints it in the tables)."""
    mean = lambda m: sum(acc[m].values()) / len(acc[m]) if acc.get(m) else float("nan")  # noqa: E731
    others = [m for m in acc if report.is_baseline(m) and " (" not in m]  # not a sweep's variant
    best = max(others, key=mean) if others else None
    names = ["weak", "zero-shot", "ceiling", best, "cpl"]
    cells = [mean(m) if m else float("nan") for m in names]
    most = max((len(acc[m]) for m in names if acc.get(m)), default=0)
    seeds = [f" (n={len(acc[m])})" if acc.get(m) and len(acc[m]) < most else "" for m in names]
    fmt = lambda i: "—" if math.isnan(cells[i]) else f"{cells[i]:.2f}{seeds[i]}"  # noqa: E731
    gain = lambda v: "—" if math.isnan(v) or math.isnan(cells[0]) or math.isnan(cells[2]) \
        else report.pgr_text(cells[0], v, cells[2])  # noqa: E731
    delta = cells[4] - cells[3]
    return (f"| {label} | " + " | ".join(map(fmt, range(3))) + f" | {best or '—'} {fmt(3)} | "
            f"{fmt(4)} | {'—' if math.isnan(delta) else f'{delta:.2f}'} | {gain(cells[3])} | "
            f"{gain(cells[4])} |")


def pretraining_table(levels, tables_dir):
    """Write `tables_dir/pretraining.md` (and `pretraining.png`, with matplotlib) from runs made
    with differently pretrained strong models.

    Args:
        levels: list of (label, out_dir) of w2s_clip results; one row per label and domain, from
            the runs with the settings most of that folder's runs share (the rest are named).
    Returns:
        the markdown text
    """
    lines = ["## CPL − best baseline against the strong model's pretraining",
             "", "Accuracy (%) on D'_test, mean over seeds; PGR on those means (n/a: ceiling <= weak).", "",
             "| pretraining | weak | zero-shot | ceiling | best baseline | CPL | CPL − best | "
             "PGR best | PGR CPL |", "|" + " --- |" * 9]
    points = []  # (label, domain, rows) for the figure
    labels = [label for label, _ in levels]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise UserError(f"--pretraining-table: the label {twice!r} is given twice; give each "
                        f"folder its own label")
    folders = [Path(out_dir).resolve() for _, out_dir in levels]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            print(f"note: --pretraining-table {labels[i]} and {labels[folders.index(folder)]} "
                  f"read the same folder {levels[i][1]}")
    for label, out_dir in levels:
        rows = report.load_results(out_dir)
        if not rows:
            raise UserError(f"--pretraining-table {label}={out_dir}: no results.json there; "
                            f"run w2s_clip.py with --out-dir {out_dir} first")
        rows, notes = report.comparable_runs(rows)  # one setting per row, named if not
        for note in notes:
            print(f"note: {label}: {note}")
        for domain in sorted({r["domain"] for r in rows}):  # one row per domain, never averaged
            subset = [r for r in rows if r["domain"] == domain]
            lines.append(pretraining_row(f"{label} ({domain})", seed_means(subset)))
            points.append((label, domain, subset))
    text = "\n".join(lines) + "\n"
    outputs = {"pretraining.md": text}
    png = pretraining_figure(points)
    if png is not None:
        outputs["pretraining.png"] = png
    checks.check_writable(tables_dir, "--tables-dir")
    for name, content in outputs.items():
        files.atomic_save(content, Path(tables_dir) / name)
    return text


def pretraining_figure(points):
    """pretraining.png: against the zero-shot accuracy of each level (x, mean over seeds), every
    method's D'_test accuracy (mean ± std over seeds, a band), and CPL − best baseline with its
    95% paired bootstrap interval (report.differences). One domain: the first in `points`.
    Returns the PNG bytes, or None without matplotlib or without zero-shot runs."""
    plt = report.pyplot()
    domain = points[0][1] if points else None
    levels = [(label, rows) for label, d, rows in points if d == domain
              and any(r["method"] == "zero-shot" for r in rows)]
    if plt is None or not levels:
        return None
    acc = [(label, seed_means(rows), rows) for label, rows in levels]
    x = [sum(a["zero-shot"].values()) / len(a["zero-shot"]) for _, a, _ in acc]
    order = sorted(range(len(x)), key=x.__getitem__)
    methods = [m for m in dict.fromkeys(m for _, a, _ in acc for m in a) if " (" not in m]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        pts = [(x[i], report.mean_std(list(acc[i][1][m].values()))) for i in order
               if acc[i][1].get(m)]
        xs, ys, sd = [p[0] for p in pts], [p[1][0] for p in pts], [p[1][1] for p in pts]
        style = dict(lw=2.5, color="black") if m == "cpl" else dict(lw=1)
        line, = left.plot(xs, ys, marker="o", label=m, **style)
        left.fill_between(xs, [a - b for a, b in zip(ys, sd)], [a + b for a, b in zip(ys, sd)],
                          color=line.get_color(), alpha=0.12, linewidth=0)
    left.set(xlabel="zero-shot accuracy on D'_test (%), one point per pretraining level",
             ylabel="accuracy on D'_test (%), mean ± std", title=f"{domain}: every method")
    left.legend(fontsize=7, ncol=2)
    diffs = []
    for i in order:
        rows = acc[i][2]
        baselines = [m for m in acc[i][1] if report.is_baseline(m) and " (" not in m]
        d = report.differences(rows, "domain", [domain], baselines).get(
            ("best baseline", domain)) if baselines and "cpl" in acc[i][1] else None
        if d is not None:
            diffs.append((x[i], acc[i][0], *d[1]))
    if diffs:
        xs = [p[0] for p in diffs]
        right.errorbar(xs, [p[2] for p in diffs], yerr=[[p[2] - p[3] for p in diffs],
                                                        [p[4] - p[2] for p in diffs]],
                       marker="o", capsize=3, color="black")
        for xv, label, d, *_ in diffs:
            right.annotate(label, (xv, d), textcoords="offset points", xytext=(4, 4), fontsize=7)
    right.axhline(0, color="gray", lw=1, ls="--")
    right.set(xlabel="zero-shot accuracy on D'_test (%)", ylabel="points, 95% paired bootstrap",
              title="CPL − best baseline")
    for ax in (left, right):
        ax.title.set_fontsize(9)
    return report.png_bytes(fig, plt)


# ------------------------------------------------------------------------------------------------
# The regime map: CPL against the best baseline by images per class and by zero-shot − weak
# ------------------------------------------------------------------------------------------------
MAP_AXES = {"images": "hold-train images per class (mean over classes and seeds)",
            "pretraining": "zero-shot − weak (points, mean over seeds)"}


def map_level(label, rows, axis):
    """One level of a regime-map axis from one domain's rows: its x (MAP_AXES), every method's
    accuracy per seed, the best baseline and CPL − best with its 95% paired bootstrap interval
    (report.differences). Returns a dict."""
    acc = seed_means(rows)
    mean = lambda m: sum(acc[m].values()) / len(acc[m]) if acc.get(m) else float("nan")  # noqa: E731
    if axis == "images":  # what the heads trained on, read from the results themselves
        sizes = [json.loads(Path(r["path"]).read_text()) for r in rows if r["method"] == "cpl"]
        x = sum(s["n_hold_train"] / len(s["per_class_accuracy"]) for s in sizes) / max(1, len(sizes))
    else:
        x = mean("zero-shot") - mean("weak")
    baselines = [m for m in acc if report.is_baseline(m) and " (" not in m]
    domain = rows[0]["domain"]
    found = report.differences(rows, "domain", [domain], baselines).get(("best baseline", domain)) \
        if baselines and "cpl" in acc else None
    best, diff = found if found else (max(baselines, key=mean, default=None), None)
    return {"label": label, "x": x, "acc": acc, "mean": mean, "best": best, "diff": diff}


def regime_map(levels, tables_dir):
    """Write `tables_dir/regimes.md` (and `regimes.png`, with matplotlib): per axis of MAP_AXES and
    level, every method's accuracy on D'_test and CPL − best baseline with its interval.

    Args:
        levels: list of (axis, label, out_dir); each folder's runs of one domain (the first
            domain found in the first folder), with the settings most of its runs share, and of
            the methods every level ran (so that each level picks its best baseline from the same).
    Returns:
        the markdown text
    """
    found, domain = [], None
    for axis, label, out_dir in levels:
        if axis not in MAP_AXES:
            raise UserError(f"--regime-map {axis}:{label}: the axis is one of {', '.join(MAP_AXES)}")
        rows, notes = report.comparable_runs(report.load_results(out_dir))
        domain = domain or (rows[0]["domain"] if rows else None)
        rows = [r for r in rows if r["domain"] == domain]
        if not rows:
            raise UserError(f"--regime-map {axis}:{label}={out_dir}: no results.json of "
                            f"{domain or 'any domain'} there; run make demo-regimes")
        for note in notes:
            print(f"note: {axis} {label}: {note}")
        found.append((axis, label, rows))
    methods = set.intersection(*({r["method"] for r in rows} for _, _, rows in found))
    points = {}
    for axis, label, rows in found:
        points.setdefault(axis, []).append(
            map_level(label, [r for r in rows if r["method"] in methods], axis))
    lines = [f"## The regime map on {domain}: CPL against the best baseline", "",
             "Accuracy (%) on D'_test, mean over seeds; CPL − best baseline (the baseline with the "
             "highest mean at that level) with its 95% paired bootstrap interval over the D'_test "
             "images of every seed; PGR on the means (n/a: ceiling <= weak). Methods: "
             + ", ".join(sorted(methods)) + ".", ""]
    for axis, pts in points.items():
        pts.sort(key=lambda p: p["x"])
        lines += [f"### Against {MAP_AXES[axis]}", "",
                  "| level | x | weak | zero-shot | ceiling | best baseline | CPL | CPL − best [95%] "
                  "| PGR best | PGR CPL |", "|" + " --- |" * 10]
        for p in pts:
            mean = p["mean"]
            cell = lambda m: "—" if math.isnan(mean(m)) else f"{mean(m):.2f}"  # noqa: E731
            gain = lambda m: "—" if any(math.isnan(mean(n)) for n in ("weak", "ceiling", m)) \
                else report.pgr_text(mean("weak"), mean(m), mean("ceiling"))  # noqa: E731
            diff = (f"{p['diff'][0]:+.2f} [{p['diff'][1]:+.2f}, {p['diff'][2]:+.2f}]"
                    if p["diff"] else "—")
            best = p["best"]
            lines.append(f"| {p['label']} | {p['x']:.1f} | {cell('weak')} | {cell('zero-shot')} | "
                         f"{cell('ceiling')} | {best or '—'} {cell(best) if best else ''} | "
                         f"{cell('cpl')} | {diff} | {gain(best) if best else '—'} | {gain('cpl')} |")
        lines.append("")
    text = "\n".join(lines)
    outputs = {"regimes.md": text}
    png = regime_figure(points, domain)
    if png is not None:
        outputs["regimes.png"] = png
    checks.check_writable(tables_dir, "--tables-dir")
    for name, content in outputs.items():
        files.atomic_save(content, Path(tables_dir) / name)
    return text


def tick_labels(xs, log=False):
    """[(x, label)] for sorted x values: a value within 4% of the axis span (on a log axis, of
    its log span) of the last labelled one joins that label ("-34.3/-32.5") instead of overlapping."""
    scale = (lambda v: math.log2(max(v, 1e-9))) if log else (lambda v: v)  # noqa: E731
    span = max(1e-9, scale(max(xs)) - scale(min(xs)))
    out = []
    for x in xs:
        text = f"{x:.0f}" if log else f"{x:+.1f}"
        if out and (scale(x) - scale(out[-1][0])) / span < 0.04:
            out[-1] = (out[-1][0], out[-1][1] + "/" + text)
        else:
            out.append((x, text))
    return out


def regime_figure(points, domain):
    """regimes.png: one row per axis; left every method's accuracy (mean ± std over seeds, a band)
    against the level's x, right CPL − best baseline with its interval. Points are joined in the
    order of x; each level is labelled once, under its point. None without matplotlib."""
    plt = report.pyplot()
    if plt is None or not points:
        return None
    fig, axes = plt.subplots(len(points), 2, figsize=(12, 4.3 * len(points)), squeeze=False)
    for (axis, pts), (left, right) in zip(points.items(), axes):
        xs = [p["x"] for p in pts]
        methods = [m for m in dict.fromkeys(m for p in pts for m in p["acc"]) if " (" not in m]
        colours = plt.get_cmap("tab20").colors
        for i, m in enumerate(methods):
            got = [(p["x"], report.mean_std(list(p["acc"][m].values()))) for p in pts if p["acc"].get(m)]
            x, y, sd = [g[0] for g in got], [g[1][0] for g in got], [g[1][1] for g in got]
            style = dict(lw=2.5, color="black") if m == "cpl" else dict(
                lw=1, color=colours[2 * (i % 10) + i // 10], ls="--" if m.endswith("-lp") else "-")
            line, = left.plot(x, y, marker="o", label=m, **style)
            left.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                              color=line.get_color(), alpha=0.12, linewidth=0)
        with_diff = [p for p in pts if p["diff"]]
        right.errorbar([p["x"] for p in with_diff], [p["diff"][0] for p in with_diff],
                       yerr=[[p["diff"][0] - p["diff"][1] for p in with_diff],
                             [p["diff"][2] - p["diff"][0] for p in with_diff]],
                       marker="o", capsize=3, color="black", lw=1)
        right.axhline(0, color="gray", lw=1, ls="--")
        ticks = tick_labels(xs, log=axis == "images")
        for ax in (left, right):
            if axis == "images":
                ax.set_xscale("log", base=2)
            ax.set_xticks([x for x, _ in ticks])
            ax.set_xticklabels([label for _, label in ticks], fontsize=7)
            ax.set_xlabel(MAP_AXES[axis] + ("; levels: " + ", ".join(p["label"] for p in pts)
                                            if axis == "pretraining" else ""), fontsize=8)
        left.set(ylabel="accuracy on D'_test (%), mean ± std",
                 title=f"{domain}: every method against {axis}")
        right.set(ylabel="points, 95% paired bootstrap", title="CPL − best baseline")
        left.legend(fontsize=7, ncol=2)
        for ax in (left, right):
            ax.title.set_fontsize(9)
    return report.png_bytes(fig, plt)


# ------------------------------------------------------------------------------------------------
# The calibration table: the paper preset against what the paper's setting publishes
# ------------------------------------------------------------------------------------------------
# OpenAI CLIP ViT-B/32's zero-shot accuracy (%) on the whole of each DomainNet domain, prompt "a
# picture of a" + class (jindongwang/transferlearning, code/clip/README.md, its DomainNet table).
CLIP_ZERO_SHOT = {"clipart": 67.03, "infograph": 39.92, "painting": 62.39, "quickdraw": 13.18,
                  "real": 80.54, "sketch": 58.53}
TOLERANCE = {"weak": 5.0, "ceiling": 5.0, "zero-shot − weak": 4.0}  # points, issue of the preset


def calibration_rows(rows, domains=DOMAINS):
    """Per domain, from report.load_results rows of `--method weak zero-shot ceiling`: each target
    (Table 2's weak and ceiling, CLIP's zero-shot minus Table 2's weak), what came out (means over
    seeds, %), the difference and whether it is within TOLERANCE. Returns {domain: dict}."""
    out = {}
    for d in domains:
        acc = seed_means([r for r in rows if r["domain"] == d])
        mean = lambda m: sum(acc[m].values()) / len(acc[m]) if acc.get(m) else float("nan")  # noqa: E731
        weak, ceiling = report.PAPER[("table2", "weak", d)], report.PAPER[("table2", "ceiling", d)]
        got = {"weak": mean("weak"), "ceiling": mean("ceiling"),
               "zero-shot − weak": mean("zero-shot") - mean("weak")}
        want = {"weak": weak, "ceiling": ceiling, "zero-shot − weak": CLIP_ZERO_SHOT[d] - weak}
        out[d] = {"zero-shot": mean("zero-shot"), "seeds": len(acc.get("weak", {})),
                  **{k: (want[k], got[k], got[k] - want[k], abs(got[k] - want[k]) <= TOLERANCE[k])
                     for k in TOLERANCE}}
    return out


def calibration_table(out_dirs, tables_dir, regime="paper"):
    """Write `tables_dir/calibration.md` from the runs in `out_dirs` (one weak model's): per domain
    the targets, what came out and the preset's knobs (REGIMES[regime]); returns the markdown."""
    rows, notes = report.comparable_runs([r for d in out_dirs for r in report.load_results(d)])
    if not rows:
        raise UserError(f"--calibration-table {' '.join(map(str, out_dirs))}: no results.json "
                        f"there; run make demo-calibrate first")
    weak_models = sorted({r["weak_model"] for r in rows if r["method"] == "weak"})
    if len(weak_models) > 1:
        raise UserError(f"--calibration-table: runs of {len(weak_models)} weak models "
                        f"({', '.join(weak_models)}); give the folders of one (the domains' own)")
    for note in notes:
        print(f"note: {note}")
    preset, cal = REGIMES[regime], calibration_rows(rows)
    mark = lambda ok: "" if ok else " **out**"  # noqa: E731
    lines = [f"## The {regime} preset against the paper's setting", "",
             "Accuracy (%) on D'_test, mean over seeds; target in brackets (Table 2's weak and "
             "ceiling, CLIP ViT-B/32's published zero-shot minus Table 2's weak); **out**: beyond "
             f"±{TOLERANCE['weak']:g} points (weak, ceiling) or ±{TOLERANCE['zero-shot − weak']:g} "
             "(zero-shot − weak).", "",
             "| domain | seeds | weak | ceiling | zero-shot | zero-shot − weak | label noise | hue "
             "jitter | D_train / class | D_test / class | hue shift |",
             "|" + " --- |" * 11]
    for d, c in cal.items():
        cell = lambda k: f"{c[k][1]:.2f} ({c[k][0]:.2f}){mark(c[k][3])}"  # noqa: E731
        lines.append(f"| {d} | {c['seeds']} | {cell('weak')} | {cell('ceiling')} | "
                     f"{c['zero-shot']:.2f} ({CLIP_ZERO_SHOT[d]:.2f}) | {cell('zero-shot − weak')} | "
                     f"{preset['label_noise'][d]:.2f} | {preset['styles'][d]['jitter']:.2f} | "
                     f"{preset['train_per_class'][d]} | {preset['test_per_class'][d]} | "
                     f"{preset.get('hue_shift', {}).get(d, 0.0):.2f} |")
    inside = sum(c[k][3] for c in cal.values() for k in TOLERANCE)
    lines += ["", f"{inside} of {len(cal) * len(TOLERANCE)} targets within their tolerance."]
    text = "\n".join(lines) + "\n"
    checks.check_writable(tables_dir, "--tables-dir")
    files.atomic_save(text, Path(tables_dir) / "calibration.md")
    return text


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def map_level_arg(text):
    """argparse type: `AXIS:LABEL=DIR` -> (axis, label, dir)."""
    axis, sep, rest = text.partition(":")
    if not sep or axis not in MAP_AXES:
        raise argparse.ArgumentTypeError(f"expected AXIS:LABEL=DIR with AXIS one of "
                                         f"{', '.join(MAP_AXES)}, got {text!r}")
    return (axis, *checks.label_dir(rest))


def parse_args(argv=None):
    """The miniature's command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", metavar="DIR", help="write DIR/data, DIR/tiny-clip.json and the "
                   "pretrained checkpoints DIR/tiny-clip-<N>steps.pt")
    p.add_argument("--pretrain-steps", type=int, nargs="*", default=[], metavar="N",
                   help="pretraining steps of each checkpoint (0 = the seeded random init)")
    p.add_argument("--pretrain-batch", type=w2s_clip.positive(int), default=128,
                   help="images per pretraining step (not from the paper: small CPU budget)")
    p.add_argument("--pretrain-lr", type=w2s_clip.positive(float), default=2e-3,
                   help="peak AdamW learning rate of the pretraining (not from the paper)")
    p.add_argument("--caption-noise", type=w2s_clip.in_range(0, 0.5), nargs=2, default=[0.2, 0.2],
                   metavar=("WRONG", "NONE"),
                   help="shares of captions that name a wrong class and that name no class")
    p.add_argument("--layout", choices=LAYOUTS, default="folder",
                   help="how DIR/data is laid out: folder (w2s_clip --dataset folder, the demo: "
                        "its own data set), domainnet (split files) or officehome")
    p.add_argument("--regime", choices=tuple(REGIMES), default="paper",
                   help="paper: 30 classes in the paper's images per class, per domain Table 2's "
                        "weak and ceiling and CLIP's zero-shot against the weak model; "
                        "paper-10class: the ten-class preset of earlier versions; easy: the first "
                        "miniature, a strong model far above its weak supervisor (docs/miniature.md)")
    p.add_argument("--test-per-class", type=w2s_clip.positive(int), default=None,
                   help="D_test images per class and domain (D'_test is a fifth of D_test); "
                        "default: the preset's (paper: Table 1's per domain; the others: 300)")
    p.add_argument("--force", action="store_true", help="pretrain again even if cached")
    p.add_argument("--pretraining-table", nargs="+", metavar="LABEL=DIR", default=None,
                   type=checks.label_dir,
                   help="only write TABLES_DIR/pretraining.md from w2s_clip result folders")
    p.add_argument("--regime-map", nargs="+", metavar="AXIS:LABEL=DIR", default=None,
                   type=map_level_arg,
                   help="only write TABLES_DIR/regimes.{md,png} from w2s_clip result folders, "
                        "AXIS images or pretraining (make demo-regimes)")
    p.add_argument("--calibration-table", nargs="+", metavar="DIR",
                   help="only write TABLES_DIR/calibration.md from the weak, zero-shot and ceiling "
                        "runs in these folders, of one weak model (make demo-calibrate)")
    p.add_argument("--tables-dir", default="results",
                   help="where --pretraining-table, --regime-map and --calibration-table write")
    return p.parse_args(argv)


def main(argv=None):
    """Write the miniature and its checkpoints, or the pretraining table; UserError -> one line."""
    args = parse_args(argv)
    try:
        if args.pretraining_table:
            print(pretraining_table(args.pretraining_table, args.tables_dir), end="")
        elif args.regime_map:
            print(regime_map(args.regime_map, args.tables_dir), end="")
        elif args.calibration_table:
            print(calibration_table(args.calibration_table, args.tables_dir, args.regime), end="")
        elif args.out:
            if any(steps < 0 for steps in args.pretrain_steps):
                raise UserError(f"--pretrain-steps {min(args.pretrain_steps)}: must be >= 0")
            make_demo(args.out, flag="--out", layout=args.layout, n_test=args.test_per_class,
                      regime=args.regime)
            for steps in args.pretrain_steps:
                path, info = pretrained_checkpoint(
                    args.out, steps, force=args.force, regime=args.regime, batch_size=args.pretrain_batch,
                    lr=args.pretrain_lr, caption_noise=tuple(args.caption_noise))
                print(f"{path}: {steps} pretraining steps in {info['seconds']:.0f} s"
                      f"{' (cached)' if info.get('cached') else ''}, zero-shot "
                      f"{100 * info['zero_shot_accuracy']:.1f}% on fresh images (chance "
                      f"{100 * info['chance']:.1f}%)", flush=True)
        else:
            raise UserError("pass --out DIR (the miniature) or --pretraining-table LABEL=DIR ...")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
