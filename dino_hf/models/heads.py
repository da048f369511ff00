"""The DINO projection head (Caron et al. 2021, Sec. 3 "Network architecture", Appendix).

MLP (d -> 2048 -> 2048 -> 256, GELU, optional BatchNorm) -> L2-normalise the 256-d bottleneck ->
weight-normalised Linear(256, 65536, bias=False). The parameter names are the reference's
(`mlp.{i}.weight`, `last_layer.weight_g`, `last_layer.weight_v`), so a reference checkpoint's head
loads after stripping its `module.head.` / `head.` prefix.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is `weight_g * weight_v / ||weight_v||` (row-wise).

    The same reparametrisation as `torch.nn.utils.weight_norm(nn.Linear(...), dim=0)` of the
    reference, written with explicit parameters so that the module deep-copies, pickles and saves
    like any other (the deprecated hook-based `weight_norm` does not).

    Args:
        in_features (`int`): input width (the bottleneck, 256).
        out_features (`int`): output width (the number of prototypes, 65536).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # PyTorch's default Linear init for the direction (the reference keeps it), norm 1.
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight `(out_features, in_features)`."""
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (B, in_features)` -> `(B, out_features)`."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DinoHead(nn.Module):
    """Projection head h of DINO: MLP, L2-normalised bottleneck, weight-normalised prototypes.

    Args:
        in_dim (`int`): feature size of the backbone (384 for ViT-S).
        out_dim (`int`, defaults to 65536): number of prototypes K.
        use_bn (`bool`, defaults to `False`): BatchNorm1d after each hidden Linear (the reference
            turns it on for ResNet-50 only).
        norm_last_layer (`bool`, defaults to `True`): freeze the norm `last_layer.weight_g` at 1,
            which the paper finds stabilises training; the boosted ViT-S/16 recipe sets it `False`.
        nlayers (`int`, defaults to 3): Linear layers in the MLP; 1 is a single Linear(in_dim,
            bottleneck_dim).
        hidden_dim (`int`, defaults to 2048): width of the hidden layers.
        bottleneck_dim (`int`, defaults to 256): width of the L2-normalised bottleneck.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be at least 1 (a single Linear), got {nlayers}")
        self.norm_last_layer = norm_last_layer
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += _hidden_activation(hidden_dim, use_bn)
                layers.append(nn.Linear(hidden_dim, hidden_dim))
            layers += _hidden_activation(hidden_dim, use_bn)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (B, in_dim)` backbone features -> `(B, out_dim)` prototype scores (logits)."""
        x = self.mlp(x)  # (B, bottleneck_dim)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (B, out_dim)

    def cancel_last_layer_gradients_(self) -> None:
        """Drop the gradients of the prototypes (`last_layer`), as the reference's
        `cancel_gradients_last_layer` does during the first `freeze_last_layer` epochs (paper Appendix:
        freezing the last layer in the first epoch stabilises training). The optimiser then skips them
        entirely: no update, no weight decay, no moment update."""
        for param in self.last_layer.parameters():
            param.grad = None


def _hidden_activation(hidden_dim: int, use_bn: bool) -> list[nn.Module]:
    """What follows each hidden Linear: [BatchNorm1d,] GELU."""
    return ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]


def _init_linear(module: nn.Module) -> None:
    """Truncated normal std 0.02 and zero bias for the MLP's Linears (reference `_init_weights`)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = ["DinoHead", "WeightNormLinear"]
