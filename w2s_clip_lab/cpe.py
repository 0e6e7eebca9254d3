"""The worst-categories paper's tools for w2s_clip.py: the class-wise matching margin (CMM) that
results.json reports for every prompt or prototype head, and CPE prototypes (`--prototype-init
cpe`): open_clip's 80 ImageNet templates weighted by their worst-k CMM on unlabeled features (Shao
et al. 2023), with optional class descriptions. Not part of the CPL paper's method.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from w2s_clip import UserError, text_prototypes
from w2s_clip_lab.checks import one_line


def prompt_embeddings(clip_model, tokenizer, classnames, templates, batch_size=256):
    """The raw text embedding of every (class, template) prompt: [k, T, d] (`text_prototypes` of
    each template alone)."""
    return torch.stack([text_prototypes(clip_model, tokenizer, classnames, [t], batch_size)
                        for t in templates], dim=1)


@torch.no_grad()
def class_matching_margin(features, prototypes, labels, num_classes):
    """Class-wise matching margin (Shao et al. 2023, "the worst-performing categories" of CLIP).

    For image i of class y: cos(x_i, c_y) - max_{j != y} cos(x_i, c_j), averaged per class.
    Returns:
        (margins [k], nan for a class with no image; confused_with [k], the class that most often
        holds that max for the class's images).
    """
    cos = F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T  # (n, k)
    own = cos.gather(1, labels[:, None]).squeeze(1)
    rival = cos.scatter(1, labels[:, None], float("-inf")).max(dim=1)
    counts = torch.bincount(labels, minlength=num_classes).float()
    margins = torch.zeros(num_classes).index_add_(0, labels, (own - rival.values).float()) / counts
    pairs = torch.bincount(labels * num_classes + rival.indices, minlength=num_classes ** 2)
    return margins, pairs.view(num_classes, num_classes).argmax(dim=1)


def cmm_report(protos, feats, labels, weak_pred, classnames, k_worst=10):
    """CMM of class embeddings [k, d] on D'_test, with true and with weak labels, worst first."""
    report = {}
    for name, y in (("true_labels", labels), ("weak_labels", weak_pred)):
        margins, rival = class_matching_margin(feats.cpu(), protos.detach().cpu(), y, len(classnames))
        order = [int(i) for i in margins.argsort() if not margins[i].isnan()][:k_worst]
        report[name] = [{"class": classnames[i], "margin": margins[i].item(),
                         "confused_with": classnames[int(rival[i])]} for i in order]
    return report


def cpe_weights(embeddings, features, k_worst=10):
    """CPE's template weights (Shao et al. 2023, the weighted prompt ensemble), without labels.

    Pseudo-labels are the uniform ensemble's zero-shot predictions on unlabeled `features` [n, d];
    each template t gets its worst-k CMM m_t (`class_matching_margin` of its own prototypes with
    those pseudo-labels, mean of the k lowest classes) and the weight
    w_t = (m_t - min m) / sum(m - min m): the weakest template drops out, the others count by how
    far they beat it (uniform when all tie). The paper's exact rule is not available here; this is
    the simplest one consistent with "weighted by worst-k CMM" (docs/deviations.md, 23).
    Args:
        embeddings: prompt embeddings [k, T, d] (`prompt_embeddings`).
    Returns:
        (weights [T], worst-k CMM per template [T]).
    """
    k, T = embeddings.shape[:2]
    unit = F.normalize(embeddings.float(), dim=-1)
    feats = F.normalize(features.float(), dim=-1)
    pseudo = (feats @ F.normalize(unit.mean(dim=1), dim=-1).T).argmax(dim=1)
    worst = torch.empty(T)
    for t in range(T):
        margins, _ = class_matching_margin(feats, unit[:, t], pseudo, k)
        margins = margins[~margins.isnan()].sort().values
        worst[t] = margins[:k_worst].mean()
    gap = worst - worst.min()
    weights = gap / gap.sum() if gap.sum() > 0 else torch.full((T,), 1.0 / T)
    return weights, worst


def weighted_prototypes(embeddings, weights, normalize=False, descriptions=None):
    """Class prototypes [k, d] as the `weights`-weighted mean of the templates' embeddings [k, T, d]
    (each L2-normalised first, and the mean too, when `normalize`). `descriptions` ({class index:
    embeddings [m, d]}) adds each sentence as one more prompt of its class at the mean template
    weight 1/T (docs/deviations.md, 23)."""
    unit = lambda x: F.normalize(x, dim=-1) if normalize else x  # noqa: E731
    protos = torch.einsum("ktd,t->kd", unit(embeddings), weights.to(embeddings))
    for i, extra in (descriptions or {}).items():
        T = embeddings.shape[1]
        protos[i] = (protos[i] + unit(extra).sum(dim=0) / T) / (1 + len(extra) / T)
    return unit(protos)


class KeyPairs(list):
    """A JSON object as the (key, value) pairs it was written with, a repeated key kept."""


def read_class_descriptions(path, classnames):
    """{class index: sentences} from a JSON file {class name: [sentences]} (names as the run
    prints them, or with `_` for spaces); one line naming the problem otherwise, also for a class
    named by two keys (`a_b` and `a b`, or a key written twice), whose sentences JSON would drop."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8-sig"), object_pairs_hook=KeyPairs)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--class-descriptions {path}: cannot read it as JSON ({one_line(e)})")
    if not isinstance(obj, KeyPairs):
        raise UserError(f"--class-descriptions {path}: expected an object {{class name: [sentences]}}")
    index = {n: i for i, n in enumerate(classnames)}
    out, keys = {}, {}
    for name, sentences in obj:
        i = index.get(name, index.get(str(name).replace("_", " ")))
        if i is None:
            raise UserError(f"--class-descriptions {path}: {name!r} is not a class of this domain "
                            f"(e.g. {', '.join(repr(n) for n in classnames[:3])})")
        if i in keys:  # `a_b` and `a b`, or one key twice: JSON keeps only the last
            raise UserError(f"--class-descriptions {path}: {keys[i]!r} and {name!r} both name the "
                            f"class {classnames[i]!r}; merge their sentences into one list")
        keys[i] = name
        if not (isinstance(sentences, list) and sentences
                and all(isinstance(t, str) and t.strip() for t in sentences)):
            raise UserError(f"--class-descriptions {path}: {name!r} needs a non-empty list of "
                            f"sentences")
        out[i] = sentences
    return out


def cpe_prototypes(clip_model, tokenizer, classnames, features, k_worst=10, descriptions=None,
                   normalize=False, cache=None):
    """CPL's starting prototypes [k, d] by CPE: open_clip's 80 ImageNet templates weighted by
    `cpe_weights` on unlabeled `features` [n, d], plus each class's `descriptions` ({class index:
    sentences}, each sentence a prompt as written). `cache`, a dict kept for one CLIP model and
    class list, holds the prompts' text embeddings, so that each seed's weighting encodes no text.
    Returns (prototypes, a report of the weights for results.json)."""
    import open_clip
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES
    cache = {} if cache is None else cache
    if "cpe_embeddings" not in cache:  # the same for every seed: only the weights depend on it
        cache["cpe_embeddings"] = prompt_embeddings(clip_model, tokenizer, classnames, templates)
        cache["cpe_descriptions"] = {i: text_prototypes(clip_model, tokenizer, sentences, ["{}"])
                                     for i, sentences in (descriptions or {}).items()}  # [m, d]
    emb, extra = cache["cpe_embeddings"], cache["cpe_descriptions"]
    weights, worst = cpe_weights(emb, features, k_worst)
    report = {"k_worst": k_worst, "templates": [t("{}") for t in templates],
              "weights": weights.tolist(), "worst_k_cmm": worst.tolist(),
              "described_classes": sorted(classnames[i] for i in extra)}
    return weighted_prototypes(emb, weights.to(emb.device), normalize, extra), report


def cmm_reports(head, feats, labels, weak_pred, classnames, zero_shot=None):
    """results.json's CMM of a trained TP, CPL or cpl-text head's class embeddings on D'_test
    (features [n, d], true and weak labels [n]) and, given `zero_shot` [k, d], of those."""
    with torch.no_grad():
        protos = head.prototypes if hasattr(head, "prototypes") else head.text_features()
    out = {"cmm": cmm_report(protos, feats, labels, weak_pred, classnames)}
    if zero_shot is not None:
        out["cmm_zero_shot"] = cmm_report(zero_shot, feats, labels, weak_pred, classnames)
    return out
