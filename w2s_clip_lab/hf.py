"""Hugging Face weak models for w2s_clip.py (`--weak-model hf:<id>`, the paper's Table 3): a
transformers image classifier called like a timm one, with transforms from its own processor.
Needs the optional `transformers` package.
"""
import torch
import torch.nn as nn
from PIL import Image

from w2s_clip import UserError, create_weak_model, one_line


def import_transformers(flag_value):
    """The optional `transformers` package, or a UserError naming it and the flag that needs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"--weak-model {flag_value} needs the transformers package; "
                        f"`pip install transformers` or pick a timm model")
    return transformers


class HFLogits(nn.Module):
    """A transformers image classifier called like a timm one: images [n, 3, H, W] -> logits [n, k]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


class HFEvalTransform:
    """A transformers image processor as a per-image transform: PIL image -> FloatTensor [3, H, W]."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


def create_hf_weak_model(hub_id, num_classes, pretrained=True):
    """A Hugging Face image classifier with a fresh k-way head (`ignore_mismatched_sizes`), wrapped to
    return logits [n, k], and transforms from its own image processor.

    Eval: the processor itself (resize, crop, rescale, normalise as the checkpoint was trained).
    Train: RandomResizedCrop to the processor's output size, horizontal flip, the processor's mean
    and std (transformers' `run_image_classification` example). pretrained=False: random init from
    the checkpoint's config.
    """
    from torchvision import transforms as T
    transformers = import_transformers(f"hf:{hub_id}")
    try:
        if pretrained:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                hub_id, num_labels=num_classes, ignore_mismatched_sizes=True)
        else:
            config = transformers.AutoConfig.from_pretrained(hub_id, num_labels=num_classes)
            model = transformers.AutoModelForImageClassification.from_config(config)
        processor = transformers.AutoImageProcessor.from_pretrained(hub_id)
    except (OSError, ValueError, KeyError) as e:  # no network, unknown id, not an image classifier
        raise UserError(f"cannot load Hugging Face model {hub_id} (pretrained={pretrained}): "
                        f"{one_line(e)}; check the id and the network")
    eval_tf = HFEvalTransform(processor)
    size = tuple(eval_tf(Image.new("RGB", (64, 48))).shape[-2:])  # (H, W) the model is fed
    steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]
    if getattr(processor, "do_normalize", True) and getattr(processor, "image_mean", None) is not None:
        steps.append(T.Normalize(processor.image_mean, processor.image_std))
    return HFLogits(model), T.Compose(steps), eval_tf


def check_hf_weak_model(name):
    """Stop early unless `hf:<id>` names a transformers image classifier whose config loads."""
    transformers = import_transformers(name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    try:
        config = transformers.AutoConfig.from_pretrained(name[3:])
    except (OSError, ValueError) as e:  # unknown id, no network and not cached, a bad folder
        raise UserError(f"--weak-model {name}: no Hugging Face model config found "
                        f"({one_line(e)}); check the id and the network")
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(f"--weak-model {name}: a {config.model_type} model, not an image classifier")


def load_weak_model(name, num_classes, pretrained=True, input_size=None):
    """--weak-model's classifier and transforms: `hf:<id>` a transformers one
    (`create_hf_weak_model`), any other name timm's (`w2s_clip.create_weak_model`), whose
    transforms `input_size` (pixels, --weak-input-size) sets instead of the model's own."""
    if name.startswith("hf:"):
        if input_size:
            raise UserError(f"--weak-input-size {input_size}: timm weak models only; drop it for "
                            f"{name}")
        return create_hf_weak_model(name[3:], num_classes, pretrained)
    model, train_tf, eval_tf = create_weak_model(name, num_classes, pretrained)
    if input_size:
        import timm
        try:  # some models fix their input size (e.g. relative position tables)
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, input_size, input_size))
        except (RuntimeError, AssertionError, ValueError) as e:  # timm asserts some sizes
            raise UserError(f"--weak-model {name} cannot run at --weak-input-size {input_size} "
                            f"({one_line(e)}); drop the flag or pick another model") from None
        cfg = {**timm.data.resolve_model_data_config(model), "input_size": (3, input_size, input_size)}
        train_tf, eval_tf = timm.data.create_transform(**cfg, is_training=True), timm.data.create_transform(**cfg)
    return model, train_tf, eval_tf
