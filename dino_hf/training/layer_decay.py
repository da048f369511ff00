"""Layer-wise learning-rate decay and block freezing, for continued pretraining from trained weights.

Where each backbone parameter sits is counted as DINOv2 counts it (`get_vit_lr_decay_rate` in its
`dinov2/train/param_groups.py`; DINOv3 the same): the patch embedding and the tokens beside it (CLS,
position, register, mask tokens) are layer 0, block b (0-based; for ConvNeXt and Swin counted on
over the stages, a stage's downsampling layer going with the stage it starts) is layer b + 1, and
what follows the last block (the final norm, the DINO head) is layer L + 1. With `layer_decay` d,
layer l trains at lr x d^(L + 1 - l): block b at d^(L - b), the embeddings at d^(L + 1), the final
norm and the head at x 1 (DINOv2 and DINOv3: d = 0.9). The patch embedding alone (a CNN's stem)
gets `patch_embed_lr_mult` on top (DINOv2 and DINOv3: 0.2).

`freeze_blocks_` freezes layer 0 and the first N freezing units: the blocks of a ViT, the stages of
a hierarchical model (ConvNeXt, Swin, ResNet).

Where each parameter sits is `dino_hf.models.layout`'s.
"""

from torch import nn

from ..models.layout import backbone_layout


def _backbone_model(student: nn.Module) -> nn.Module:
    model = getattr(getattr(student, "backbone", None), "model", None)
    if model is None:
        raise ValueError(
            f"layer decay and freezing take the student (MultiCropWrapper with .backbone.model), got "
            f"{type(student).__name__}"
        )
    return model


def lr_scales(student: nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> dict[int, float]:
    """`id(parameter)` -> lr multiplier, for the parameters of `student.backbone.model`; parameters not
    in it (the head) train at x 1. Empty when both settings are 1 (any backbone then)."""
    if layer_decay == 1.0 and patch_embed_lr_mult == 1.0:
        return {}
    model = _backbone_model(student)
    layout = backbone_layout(model)
    return {
        id(param): layout.lr_scale(name, layer_decay, patch_embed_lr_mult) for name, param in model.named_parameters()
    }


def freeze_blocks_(student: nn.Module, num_frozen: int) -> list[str]:
    """Freeze (`requires_grad=False`) the embeddings and the first `num_frozen` blocks (ViT) or stages
    (ConvNeXt, Swin, ResNet) of `student.backbone.model`, in place; returns the frozen parameters'
    names. 0 freezes nothing (any backbone then).

    The optimiser leaves frozen parameters out (`get_param_groups`), and DDP does not wait for their
    gradients. Call it before building the optimiser and before `accelerator.prepare`.

    Raises:
        ValueError: an unknown family (`backbone_layout`), or more units than the backbone has.
    """
    if num_frozen == 0:
        return []
    model = _backbone_model(student)
    layout = backbone_layout(model)
    if num_frozen > layout.num_units:
        raise ValueError(
            f"--freeze_blocks {num_frozen} is more than the {layout.num_units} {layout.unit_name} of this "
            f"{layout.family} backbone; use at most {layout.num_units}"
        )
    frozen = []
    for name, param in model.named_parameters():
        if layout.places[name].unit <= num_frozen:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


__all__ = ["freeze_blocks_", "lr_scales"]
