"""The student's projectors of feature distillation: its widths to the frozen model's.

A student distilled from a frozen foundation model (`dino_hf.objectives.distillation`) has other widths
than the model it learns from: a ResNet-18 pools 512 channels where a DINOv2 ViT-S gives 384. One
projector maps the pooled feature, another each patch token (a CNN's last feature map, flattened), to
the frozen model's width, as LightlyTrain's distillation does. Both train with the student and are
left out of its export.

With several frozen models (`dino_hf.objectives.multi_distillation`), the student has one pair per frozen model
(`DistillHeads`), as RADIO's per-teacher summary and feature heads: the summary head maps the pooled feature to
the frozen model's global feature, the feature head each patch token to its patch features; their widths may
differ (CLIP's global feature is its projection's width). The summary head of a frozen model whose global
feature is aligned with a text tower is a bias-free Linear, whatever the kind: it is the visual projection of
the zero-shot export (`dino_hf.convert.zero_shot`), which a dual encoder holds as a bias-free Linear.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _projection(in_dim: int, out_dim: int, kind: str, bias: bool = True) -> nn.Module:
    """`Linear(in_dim, out_dim)`, or AM-RADIO's adaptor: Linear, LayerNorm, GELU, Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projector kind {kind!r} is unknown; use 'linear' or 'mlp'")


class DistillProjector(nn.Module):
    """Projectors of the student's global feature and of its patch tokens to the frozen model's width.

    Args:
        feature_dim: width of the student's pooled feature (`backbone.num_features`).
        patch_dim: width of its patch tokens (a ViT's hidden size; a CNN's last feature map channels).
        target_dim: width of the frozen model's features.
        kind: `"linear"` (LightlyTrain, the default) or `"mlp"` (AM-RADIO's adaptor).
        summary_dim: width of the frozen model's global feature when it is not `target_dim` (a CLIP projection).
        text_aligned: the global feature is aligned with a text tower: the summary head is a bias-free Linear.
    """

    def __init__(
        self,
        feature_dim: int,
        patch_dim: int,
        target_dim: int,
        kind: str = "linear",
        summary_dim: int | None = None,
        text_aligned: bool = False,
    ):
        super().__init__()
        self.in_dims = (feature_dim, patch_dim)
        summary_dim = summary_dim or target_dim
        if text_aligned:
            self.global_projection = nn.Linear(feature_dim, summary_dim, bias=False)
        else:
            self.global_projection = _projection(feature_dim, summary_dim, kind)
        self.patch_projection = _projection(patch_dim, target_dim, kind)

    @property
    def out_dims(self) -> tuple[int, int]:
        """The widths of the frozen model's global feature and patch features that the heads map to."""
        return tuple(
            [module for module in projection.modules() if isinstance(module, nn.Linear)][-1].out_features
            for projection in (self.global_projection, self.patch_projection)
        )

    def forward(self, features: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features (B, D_s)`, `patch_tokens (B, P, C_s)` -> `(B, D_t)`, `(B, P, D_t)`."""
        return self.global_projection(features), self.patch_projection(patch_tokens)


class DistillHeads(nn.ModuleList):
    """One `DistillProjector` per frozen model, in the order of `--distill_from`."""

    def forward(self, features: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor]]:
        """`features (B, D_s)`, `patch_tokens (B, P, C_s)` -> per frozen model, `(B, D_t)` and `(B, P, C_t)`."""
        return tuple(heads(features, patch_tokens) for heads in self)


# Where a run distilled from several frozen models exports the student's heads, beside the student's export.
HEADS_DIR = "student_heads"


class TeacherHeads(nn.Module):
    """A distilled student's heads for one frozen model, as exported (`OUTPUT_DIR/student_heads/<teacher>/`): the
    summary head, the feature head, and the map of the feature head's output back to the frozen model's own space
    (the inverse of that model's feature balancing, an affine map `x = y W^T + b`). With the student's backbone
    they stand in for the frozen model (`dino_hf.evaluation.feature_models.load_feature_model(..., teacher=NAME)`).

    Args:
        projector: the `DistillProjector` trained for that frozen model.
        inverse_weight `(C_t, C_t)`, inverse_bias `(C_t,)`: the inverse of its balancing.
        config: what the folder records of the frozen model and the heads (its name, source, widths, kind).
    """

    CONFIG, WEIGHTS = "config.json", "heads.safetensors"

    def __init__(self, projector: DistillProjector, inverse_weight: torch.Tensor, inverse_bias: torch.Tensor, config):
        super().__init__()
        self.projector = projector
        self.register_buffer("inverse_weight", inverse_weight.float())
        self.register_buffer("inverse_bias", inverse_bias.float())
        self.config = dict(config)

    def forward(self, features: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's `features (B, D_s)` and `patch_tokens (B, P, C_s)` -> the frozen model's global feature
        `(B, D_t)` and patch features `(B, P, C_t)` as the student predicts them, in that model's own space."""
        summary, patches = self.projector(features, patch_tokens)
        return summary, patches @ self.inverse_weight.T.to(patches.dtype) + self.inverse_bias.to(patches.dtype)

    def save(self, folder) -> None:
        """Writes `config.json` and `heads.safetensors` (the heads' weights, the balancing's inverse) to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        save_file(tensors, folder / self.WEIGHTS)
        (folder / self.CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_folder(cls, folder) -> "TeacherHeads":
        """The heads saved in `folder` (`save`)."""
        folder = Path(folder)
        config = json.loads((folder / cls.CONFIG).read_text())
        tensors = load_file(folder / cls.WEIGHTS)
        projector = DistillProjector(
            config["student_feature_dim"],
            config["student_patch_dim"],
            config["patch_dim"],
            config["kind"],
            summary_dim=config["summary_dim"],
            text_aligned=config["text_aligned"],
        )
        heads = cls(projector, tensors["inverse_weight"], tensors["inverse_bias"], config)
        heads.load_state_dict(tensors)
        return heads.eval()


__all__ = ["HEADS_DIR", "DistillHeads", "DistillProjector", "TeacherHeads"]
