"""LoRA on the student's backbone, ExPLoRA's recipe (Khanna et al., ICML 2025, arXiv 2406.10973), through peft.

ExPLoRA continues the DINOv2 objective on a new domain with the backbone frozen but for LoRA factors on the
attention of most blocks, the last block(s) trained fully, and every norm layer. Here:

- `add_lora_` (its `LoraSetup` kept as the backbone's `lora_setup`, `setup_of`) injects peft's LoRA layers
  (`peft.inject_adapter_in_model`, which keeps every module's name, so layer decay and the export find their
  blocks) into `backbone.model` on the query and value projections
  of the blocks that are not unfrozen, and leaves trainable only those factors, the last
  `--unfreeze_last_blocks` blocks and the norms (`requires_grad`); the DINO head trains fully.
- The frozen base weights are held once: the teacher (`teacher.build_teacher`) and the anchor to the start
  (`anchor.build_anchor`) are deep copies that take the student's frozen `Parameter` objects themselves
  (`shared_parameters` as the copy's memo), and the EMA skips those pairs (`teacher.ema_update_`).
- Checkpoints hold the tensors that are not the base (`own_state`), and `checkpoints.LORA_FILE` names the
  base and the hash of its weights (`LoraSetup.sha256`): a resume with another base is refused (`check_base`).
- Under bf16 or fp16 mixed precision the frozen weights of the Linear layers are held in that dtype
  (`hold_base_in_`): autocast computes those layers in it anyway, and would otherwise cast each frozen weight
  again at every forward and keep the cast for the backward. The k-NN and the export see the base in full
  precision, read again from the start and checked against its hash (`with_base_of`).
- `merged_backbone` is the export: adapters merged (W + alpha / r x B A) into the input's own class;
  `save_adapter` writes the same weights as a peft adapter folder (the unfrozen blocks and the norms as
  `modules_to_save`), which `PeftModel.from_pretrained(start, folder)` applies to the start.
"""

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from .configuration_dino import DinoConfig
from .fingerprint import tensors_sha256
from .layout import backbone_layout

# The query and value projections of each family (ExPLoRA's LoRA targets), by `config.model_type`;
# transformers v5 names them q_proj / v_proj in every ViT family, DinoModel as the ViT of transformers v4.
TARGETS = {
    "vit": ("q_proj", "v_proj"),
    "deit": ("q_proj", "v_proj"),
    "dinov2": ("q_proj", "v_proj"),
    "dinov2_with_registers": ("q_proj", "v_proj"),
    "dinov3_vit": ("q_proj", "v_proj"),
    DinoConfig.model_type: ("query", "value"),
}
# timm's ViT fuses q, k and v in one Linear: LoRA goes on all three.
TIMM_TARGETS = ("qkv",)
LORA_FAMILIES_TEXT = (
    "a ViT: a transformers vit, deit, dinov2, dinov2_with_registers or dinov3_vit checkpoint, a timm "
    "VisionTransformer (timm:vit_*) or a DinoModel"
)
# The adapter's name inside peft's layers (one adapter per run).
ADAPTER = "default"
# Where peft's saved adapters keep a model's tensors (`PeftModel.save_pretrained`).
_ADAPTER_PREFIX = "base_model.model."


@dataclass
class LoraSetup:
    """What a LoRA run adapts: peft's config of the adapter as it is saved (`modules_to_save`: the unfrozen
    blocks' and the norms' modules), the base's name and weight hash (of its weights as loaded), the names of
    the backbone's trained parameters that are not LoRA factors (`trained`), and the dtype the frozen weights
    of its Linear layers are held in (`base_dtype`, None: as loaded; `hold_base_in_`)."""

    config: LoraConfig
    base: str
    sha256: str
    trained: tuple[str, ...]
    base_dtype: torch.dtype | None = None

    def describe(self, model: nn.Module) -> str:
        """Which parameters train, for the log and the model card."""
        factors = sum(p.numel() for name, p in model.named_parameters() if _is_factor(name))
        rest = dict(model.named_parameters())
        full = sum(rest[name].numel() for name in self.trained)
        base = sum(p.numel() for name, p in model.named_parameters() if not _is_factor(name))
        scale = self.config.lora_alpha / self.config.r
        return (
            f"LoRA rank {self.config.r} (alpha {self.config.lora_alpha:g}, scale {scale:g}) on "
            f"{len(self.config.target_modules)} projections ({factors:,} parameters), and "
            f"{len(self.config.modules_to_save)} modules trained fully (the last blocks and every norm, "
            f"{full:,} parameters): {(factors + full) / base:.1%} of the backbone's {base:,}"
        )

    def metadata(self) -> dict:
        return {"base": self.base, "sha256": self.sha256}


def _is_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm), which ExPLoRA unfreezes."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The names of the query and value projections of `model` (a backbone's `.model`).

    Raises:
        ValueError: a family LoRA is not offered for (CNNs, Swin, ConvNeXt), with the families that work.
    """
    if type(model).__module__.startswith("timm."):
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):
            return TIMM_TARGETS
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in TARGETS:
            return TARGETS[model_type]
    raise ValueError(
        f"--lora_rank adapts the attention of a ViT, and this backbone is a {type(model).__name__}; use "
        f"{LORA_FAMILIES_TEXT}, or --lora_rank 0 to train the whole backbone"
    )


def add_lora_(
    backbone: nn.Module,
    *,
    rank: int,
    base: str,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    unfreeze_last_blocks: int = 0,
) -> LoraSetup:
    """Inject LoRA into `backbone.model` in place and freeze all of it but the factors, the last
    `unfreeze_last_blocks` blocks and the norm layers (of those, what was trainable before: a ViT's pooler
    stays frozen, the mask token trains when iBOT trains it).

    Args:
        rank: r of the factors. alpha: the update is alpha / r x B A (None: alpha = r, a scale of 1).
        base: the name of the start (`--model_name_or_path`), recorded with the hash of its frozen weights.
        target_modules: the last part of the names of the Linear layers to adapt (None: `default_targets`).
        unfreeze_last_blocks: blocks at the end that train fully, without LoRA (ExPLoRA: 1).

    Raises:
        ValueError: a family without LoRA targets, more blocks than the backbone has, or target names that
            match no Linear layer of the adapted blocks.
    """
    model = backbone.model
    names = tuple(target_modules or default_targets(model))
    layout = backbone_layout(model)
    if unfreeze_last_blocks > layout.num_units:
        raise ValueError(
            f"--unfreeze_last_blocks {unfreeze_last_blocks} is more than the {layout.num_units} blocks of this "
            f"{layout.family} backbone; use at most {layout.num_units}"
        )
    first_unfrozen = layout.num_units - unfreeze_last_blocks + 1

    def unit(name: str) -> int:
        return layout.places[name].unit

    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    adapted = [
        name
        for name in sorted(linears)
        if name.rsplit(".", 1)[-1] in names and 1 <= unit(f"{name}.weight") < first_unfrozen
    ]
    if not adapted and first_unfrozen > 1:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(
            f"--lora_target_modules {' '.join(names)} names no Linear layer of this {layout.family} backbone's "
            f"blocks; its Linear layers are named {', '.join(leaves)}"
        )
    was_trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    norms = {name for name, module in model.named_modules() if _is_norm(module)}

    def trains(name: str) -> bool:
        in_unfrozen_block = first_unfrozen <= unit(name) <= layout.num_units
        return in_unfrozen_block or name.rsplit(".", 1)[0] in norms or "mask_token" in name

    trained = tuple(name for name, _ in model.named_parameters() if name in was_trainable and trains(name))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=dropout,
        target_modules=adapted,
        base_model_name_or_path=base,
        inference_mode=True,
    )
    # The wrappers of `modules_to_save` would rename the trained modules: they are only the saved adapter's.
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    for name in (*trained, *(name for name in parameters if _is_factor(name))):
        parameters[name].requires_grad_(True)
    frozen = {name: param for name, param in parameters.items() if not param.requires_grad}
    owners = sorted({name.rsplit(".", 1)[0] for name in trained if "." in name})
    saved = dataclasses.replace(config, modules_to_save=owners)
    backbone.lora_setup = LoraSetup(saved, base, tensors_sha256(frozen), trained)
    return backbone.lora_setup


def setup_of(network: nn.Module) -> LoraSetup | None:
    """The `LoraSetup` of a student or teacher (`MultiCropWrapper`) or of a backbone; None without LoRA."""
    backbone = getattr(network, "backbone", network)
    return getattr(backbone, "lora_setup", None)


def shared_parameters(module: nn.Module) -> dict[int, nn.Parameter]:
    """The frozen parameters of `module` by id, as the memo of `copy.deepcopy`: the copy then holds these very
    `Parameter` objects, not copies of them (the frozen base weights held once)."""
    return {id(param): param for param in module.parameters() if not param.requires_grad}


def base_pointers(module: nn.Module) -> set[int]:
    """The storage of the frozen parameters of `module` (`data_ptr`): what checkpoints leave out."""
    return {param.data_ptr() for param in module.parameters() if not param.requires_grad}


def own_state(module: nn.Module, base: set[int]) -> dict[str, torch.Tensor]:
    """`module`'s state dict without the tensors whose storage is the base's (`base_pointers`), on the CPU."""
    return {key: value.detach().cpu() for key, value in module.state_dict().items() if value.data_ptr() not in base}


def load_own_state(module: nn.Module, state: dict[str, torch.Tensor], base: set[int], what: str) -> None:
    """Load `own_state` into `module`; every tensor it lacks must be the base's.

    Raises:
        ValueError: the checkpoint lacks a tensor that is not the base's, or holds one the module does not.
    """
    result = module.load_state_dict(state, strict=False)
    own = set(own_state(module, base))
    missing = [key for key in result.missing_keys if key in own]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint's {what} does not fit this run's LoRA setup (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); resume with the LoRA options of the run that wrote it "
            "(its training_args.json)"
        )


def remove_adapters_(model: nn.Module, merge: bool) -> nn.Module:
    """Put each LoRA layer's base layer back in its place in `model`, in place: with `merge`, its weight
    becomes a new tensor W + alpha / r x B A (the base layer's own weight is left untouched); without, the
    adapters are simply gone (the start, for the anchor). Returns `model`."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        base = layer.get_base_layer()
        if merge:
            with torch.no_grad():
                merged = base.weight + layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
            base.weight = nn.Parameter(merged, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    model.__dict__.pop("peft_config", None)
    return model


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` (the teacher's) with its adapters merged, in the input's own class: it shares every
    tensor with `backbone` but the merged weights, new ones.

    Raises:
        ValueError: the base is held in low precision (`hold_base_in_`): merge into `with_base_of`'s copy.
    """
    held = setup_of(backbone).base_dtype
    if held is not None:
        raise ValueError(
            f"the frozen base of this backbone is held in {held}; merge the adapters into its copy with the base in "
            "full precision (with_base_of)"
        )
    copied = copy.deepcopy(backbone, memo={id(param): param for param in backbone.parameters()})
    remove_adapters_(copied.model, merge=True)
    return copied


def hold_base_in_(backbone: nn.Module, dtype: torch.dtype) -> None:
    """Hold the frozen weights and biases of the Linear layers of `backbone.model` (a LoRA backbone,
    `add_lora_`) in `dtype`, in place: the `Parameter` objects stay (a teacher or anchor sharing them shares
    the cast ones), their storage becomes `dtype`'s. Under autocast in `dtype` those layers compute with
    exactly these values. The other frozen tensors stay as they are: the position embeddings and layer
    scales, which autocast does not cast, and the patch embedding, whose dtype some families give their
    input (DINOv3 computes its RoPE in it)."""
    for module in backbone.model.modules():
        if isinstance(module, nn.Linear):
            for param in module.parameters(recurse=False):
                if not param.requires_grad:
                    param.data = param.data.to(dtype)
    setup_of(backbone).base_dtype = dtype


def with_base_of(network: nn.Module, start: nn.Module) -> nn.Module:
    """A copy of `network` (a teacher `MultiCropWrapper`, or a backbone) whose base weights held in low precision
    (`hold_base_in_`) are those of `start` (the run's start built again as loaded, `add_lora_` applied alike:
    the same names), on `network`'s device; its other tensors are `network`'s own, shared. For the k-NN and the
    export of a run that holds its base in low precision.

    Raises:
        ValueError: `start`'s weights are not those the run started from (another sha256).
    """
    backbone = getattr(network, "backbone", network)
    setup, reloaded = setup_of(backbone), setup_of(start)
    if reloaded.sha256 != setup.sha256:
        raise ValueError(
            f"{setup.base!r} no longer holds the weights this run started from (sha256 {setup.sha256[:12]}..., now "
            f"{reloaded.sha256[:12]}...): the k-NN and the export read its frozen weights again in full precision. "
            "Put the start back as it was, then continue with --resume_from_checkpoint latest"
        )
    frozen = {name: param for name, param in start.model.named_parameters() if not param.requires_grad}
    memo = {id(param): param for param in network.parameters()}
    for name, param in backbone.model.named_parameters():
        if name in frozen and param.dtype != frozen[name].dtype:
            memo[id(param)] = nn.Parameter(frozen[name].detach().to(param.device), requires_grad=False)
    copied = copy.deepcopy(network, memo=memo)
    copied_backbone = getattr(copied, "backbone", copied)
    copied_backbone.lora_setup = dataclasses.replace(setup, base_dtype=None)
    return copied


def save_adapter(backbone: nn.Module, setup: LoraSetup, folder: Path) -> None:
    """The adapter of `backbone` (the teacher's) as a peft folder: `adapter_config.json` and
    `adapter_model.safetensors` with the factors and the trained modules' weights under peft's names."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(setup.trained)
    tensors = {}
    for name, param in backbone.model.named_parameters():
        if _is_factor(name):
            name = name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")
        elif name not in wanted:
            continue
        tensors[_ADAPTER_PREFIX + name] = param.detach().cpu().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    setup.config.save_pretrained(str(folder))


def check_base(saved: dict | None, setup: LoraSetup | None, folder: Path) -> None:
    """Refuse a resume from `folder` whose run adapted another base (`saved`: its `checkpoints.LORA_FILE`), or
    whose run and this one differ in using LoRA.

    Raises:
        ValueError: with what the checkpoint was trained on and what to do.
    """
    if saved is None and setup is None:
        return
    if saved is None:
        raise ValueError(
            f"{folder} has no LoRA base: its run trained the whole backbone, and this one trains LoRA factors "
            "(--lora_rank); resume without --lora_rank, or start a new run from its teacher_backbone folder"
        )
    if setup is None:
        raise ValueError(
            f"{folder} holds the LoRA factors of a run on {saved.get('base')!r}, and this run has no --lora_rank; "
            "resume with the LoRA options of that run (its training_args.json)"
        )
    if saved.get("sha256") != setup.sha256:
        raise ValueError(
            f"{folder} adapted {saved.get('base')!r} (frozen weights sha256 {str(saved.get('sha256'))[:12]}...), and "
            f"this run's base {setup.base!r} has other weights (sha256 {setup.sha256[:12]}...); resume with the "
            "model the run started with, or start a new run"
        )


__all__ = [
    "LORA_FAMILIES_TEXT",
    "LoraSetup",
    "add_lora_",
    "base_pointers",
    "check_base",
    "default_targets",
    "hold_base_in_",
    "load_own_state",
    "merged_backbone",
    "own_state",
    "remove_adapters_",
    "save_adapter",
    "setup_of",
    "shared_parameters",
    "with_base_of",
]
