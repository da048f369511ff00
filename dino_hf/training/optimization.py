"""Optimisers of DINO and what the reference does to gradients before a step.

- Parameter groups: weight decay only on the regularised groups (every trainable parameter except
  biases and 1-D tensors such as norm weights); frozen parameters are left out; each group has its
  lr multiplier (layer-wise decay, `layer_decay.py`) and says whether it is the backbone's.
- Gradient clipping per parameter: each parameter's gradient is scaled to norm <= clip (3.0), not
  one global norm.
- AdamW for ViTs (default), SGD and LARS for ResNet-50.
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import optimizer as torch_optimizer

from .layer_decay import lr_scales
from .sharding import local_tensors

OPTIMIZERS = ("adamw", "sgd", "lars")


def get_param_groups(model: nn.Module, *, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """The trainable parameters of `model` in groups of equal (`regularized`, `lr_scale`, `backbone`).

    Each group carries the three keys, which `train_step` reads every step:
    - `regularized`: whether the group follows the weight decay schedule. Biases (names ending in
      `.bias`) and 1-D tensors are not regularised; their groups keep `weight_decay=0.0`.
    - `lr_scale`: the group's multiple of the scheduled lr: layer-wise decay and the patch
      embedding's multiplier (`dino_hf.training.layer_decay.lr_scales`), 1.0 when both are 1.0 (the
      paper's recipe) and for the head.
    - `backbone`: whether the parameters are `model.backbone`'s (the backbone's own lr warm-up after a
      head warm-up).

    Parameters with `requires_grad=False` (the frozen `last_layer.weight_g`, frozen blocks) are left
    out.

    Args:
        model (`nn.Module`): the student (`MultiCropWrapper`); any module when both options are 1.0.
        layer_decay (`float`, defaults to 1.0): block i (0-based) of L trains at lr x
            layer_decay^(L - i) (DINOv2: 0.9); 1.0 turns it off.
        patch_embed_lr_mult (`float`, defaults to 1.0): extra multiplier of the patch embedding (a CNN's
            stem; DINOv2: 0.2).

    Raises:
        ValueError: layer decay or a patch-embedding multiplier on a backbone whose layout is unknown.
    """
    scales = lr_scales(model, layer_decay, patch_embed_lr_mult)
    backbone = getattr(model, "backbone", None)
    in_backbone = {id(param) for param in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        regularized = not (name.endswith(".bias") or param.ndim == 1)
        key = (regularized, scales.get(id(param), 1.0), id(param) in in_backbone)
        if key not in groups:
            groups[key] = {"params": [], "regularized": regularized, "lr_scale": key[1], "backbone": key[2]}
            if not regularized:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(param)
    # The backbone's groups first, from the lowest lr (the embeddings) up, regularised before not; the head last.
    return [groups[key] for key in sorted(groups, key=lambda key: (not key[2], key[1], not key[0]))]


@torch.no_grad()
def clip_gradients_(model: nn.Module, clip: float) -> torch.Tensor | None:
    """Scale each parameter's gradient to L2 norm <= `clip`, in place (reference `clip_gradients`).

    The coefficient is `clip / (norm + 1e-6)`, applied where it is below 1. `clip=0` turns clipping
    off. Returns the norms before clipping, one per parameter with a gradient, as a tensor `(P,)`
    (or `None` when off or when no parameter has a gradient).
    """
    if clip < 0:
        raise ValueError(f"clip must be >= 0 (0 turns clipping off), got {clip}")
    if clip == 0:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([norm.float() for norm in torch._foreach_norm(grads)])  # (P,)
    if isinstance(norms, DTensor):  # FSDP: each process holds a part of every norm
        norms = norms.full_tensor()
    coefficients = (clip / (norms + 1e-6)).clamp(max=1.0)  # 1.0 leaves a gradient as it is
    torch._foreach_mul_(local_tensors(grads), list(coefficients.to(grads[0].dtype).unbind()))
    return norms


def step_unless_(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, turned into a no-op on the device where the 0-dim bool tensor `skip` is true:
    no parameter, moment, momentum buffer or step count changes, and `skip` is not read back.

    PyTorch's fused AdamW and SGD kernels take the decision themselves (the `found_inf` that AMP's
    gradient scaler passes them), as does `LARS`. An optimiser without such a kernel (the
    multi-tensor fallback on devices without fused kernels) reads `skip` back: one host
    synchronisation, on those devices only. Under fp16 Accelerate's gradient scaler already skips a
    step whose gradients are not finite, and a non-finite loss gives such gradients.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimiser
    if getattr(optimizer, "scaler", None) is not None:
        optimizer.step()
        return
    if isinstance(inner, LARS) or inner.defaults.get("fused"):
        if isinstance(inner, torch.optim.SGD) and inner.defaults["momentum"]:
            _start_momentum_buffers(inner)
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()


def _start_momentum_buffers(sgd: torch.optim.SGD) -> None:
    """Zero momentum buffers for the parameters about to get their first one. The first step then
    makes the buffer the first gradient, as a missing buffer does, and the buffer stays defined when
    that step is skipped (the fused kernel leaves a new buffer uninitialised when it skips)."""
    for group in sgd.param_groups:
        for param in group["params"]:
            if param.grad is not None and sgd.state[param].get("momentum_buffer") is None:
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as the reference's.

    For parameters that are not 1-D: weight decay is added to the gradient, which is then scaled by
    the trust ratio `eta * ||p|| / ||update||` (1 where either norm is 0). 1-D parameters (biases,
    norm weights) get neither. Then `mu = momentum * mu + update; p -= lr * mu`.

    Args:
        params: parameters or parameter groups.
        lr (`float`, defaults to 0): set each step by the schedule.
        weight_decay (`float`, defaults to 0): set each step by the schedule.
        momentum (`float`, defaults to 0.9).
        eta (`float`, defaults to 0.001): trust coefficient.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by `step_unless_`: skip where it is 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                if found_inf is None:
                    mu.mul_(group["momentum"]).add_(update)
                    p.add_(mu, alpha=-group["lr"])
                else:
                    keep = found_inf > 0
                    mu.copy_(torch.where(keep, mu, mu * group["momentum"] + update))
                    p.copy_(torch.where(keep, p, p - group["lr"] * mu))
        return loss


def optimizer_kernel_options(name: str, device: torch.device | str | None) -> dict:
    """Keyword arguments that pick PyTorch's fastest kernel of AdamW / SGD on `device`:
    `{"fused": True}` where the device has fused kernels (CUDA, and the CPU in recent PyTorch),
    else `{"foreach": True}` (the multi-tensor form); `{}` for LARS or when `device` is None (PyTorch's
    default). Same update, rounding aside."""
    if name not in ("adamw", "sgd") or device is None:
        return {}
    # A private helper of torch.optim that lists the devices with fused kernels; CUDA always has them.
    supported = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    return {"fused": True} if torch.device(device).type in supported else {"foreach": True}


def build_optimizer(
    name: str,
    param_groups: list[dict],
    lr: float = 0.0,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    device: torch.device | str | None = None,
) -> torch.optim.Optimizer:
    """The optimiser of the reference by name: `"adamw"` (ViTs; betas 0.9/0.999, eps 1e-8), `"sgd"`
    or `"lars"` (ResNet-50; momentum 0.9).

    `lr` (times each group's `lr_scale`) and the regularised groups' `weight_decay` are overwritten
    each step by the schedules (`train_step`); the groups from `get_param_groups` that are not
    regularised keep their own `weight_decay=0.0`. With a
    `device`, AdamW and SGD use its fused (or multi-tensor) kernels (`optimizer_kernel_options`):
    build them on parameters that already live there.
    """
    options = optimizer_kernel_options(name, device)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, **options)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum, **options)
    if name == "lars":
        return LARS(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


__all__ = [
    "LARS",
    "OPTIMIZERS",
    "build_optimizer",
    "optimizer_kernel_options",
    "clip_gradients_",
    "get_param_groups",
    "step_unless_",
]
