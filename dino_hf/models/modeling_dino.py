"""The Vision Transformer of DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"), in transformers format.

Weight names are those of transformers' ViT checkpoints on disk (`embeddings.*`, `encoder.layer.{i}.*`,
`layernorm`), so a facebook/dino-* checkpoint loads by a plain rename-free copy. The model differs from
`ViTModel` where DINO differs: LayerNorm eps 1e-6, stochastic depth, no pooler layer (the DINO feature
is the CLS token after the final LayerNorm), and the reference's bicubic interpolation of the position
grid, so that 224 px global crops and 96 px local crops go through the same weights. DINOv2's register
tokens, mask token and LayerScale are options (`DinoConfig`), off by default; LayerScale weights have
transformers' `Dinov2Layer` names (`encoder.layer.{i}.layer_scale{1,2}.lambda1`).

This file and the two it imports (`configuration_dino.py`, `image_processing_dino.py`) need only torch
and transformers: they are copied next to saved weights so that
`AutoModel.from_pretrained(folder, trust_remote_code=True)` works without dino_hf installed.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_dino import PRESETS, DinoConfig
from .image_processing_dino import dino_image_processor


class DinoPatchEmbeddings(nn.Module):
    """Non-overlapping patches of size `patch_size`, linearly embedded by a strided convolution."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> patch tokens (B, H/p * W/p, D)."""
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                f"expected {self.num_channels} input channels, got {channels} "
                f"(pixel_values {tuple(pixel_values.shape)})"
            )
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {p}; "
                f"resize or crop to a multiple such as {max(p, height - height % p)}x{max(p, width - width % p)}"
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)


class DinoEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned absolute position embeddings, interpolated to any size;
    then the register tokens, if any, between the CLS token and the patches.

    With `config.use_mask_token`, a learned `mask_token` (1, 1, D) replaces the patches that
    `bool_masked_pos` marks, after the patch projection and before the position embeddings are added
    (iBOT, DINOv2 Sec. 3; transformers' `ViTEmbeddings`). The register tokens come after the position
    embeddings and get none (Darcet et al. 2024; transformers' `Dinov2WithRegistersEmbeddings`).
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # Absent (None, no weight in the state dict) when off, so that DINO's checkpoints load as they are.
        mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_mask_token else None
        self.register_parameter("mask_token", mask_token)
        registers = torch.zeros(1, config.num_register_tokens, config.hidden_size)
        self.register_parameter("register_tokens", nn.Parameter(registers) if config.num_register_tokens else None)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, config.hidden_size))
        self.patch_embeddings = DinoPatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of `height` x `width` pixels: (1, 1 + h*w, D).

        As the reference: bicubic interpolation of the sqrt(N) x sqrt(N) grid with scale factors
        ((h + 0.1) / sqrt(N), (w + 0.1) / sqrt(N)), where h, w are the new grid sizes (the 0.1 avoids
        a floating point error in the output size), no antialiasing, the CLS position kept.
        """
        pos = self.position_embeddings
        num_positions = pos.shape[1] - 1
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if grid_h * grid_w == num_positions and grid_h == grid_w:
            return pos
        side = math.isqrt(num_positions)
        dim = pos.shape[-1]
        patch_pos = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, side, side)
        patch_pos = F.interpolate(
            patch_pos.float(),
            scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
            mode="bicubic",
            align_corners=False,
        ).to(pos.dtype)  # (1, D, grid_h, grid_w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)  # (1, h*w, D)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, C, H, W), bool_masked_pos None or (B, N) bool (True: masked) -> tokens
        (B, 1 + R + N, D): CLS, the R registers, the N patches."""
        batch_size, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)  # (B, N, D)
        if bool_masked_pos is not None:
            patches = self._mask_patches(patches, bool_masked_pos)  # (B, N, D)
        cls = self.cls_token.expand(batch_size, -1, -1)  # (B, 1, D)
        tokens = torch.cat((cls, patches), dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch_size, -1, -1)  # (B, R, D)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)  # (B, 1 + R + N, D)
        return self.dropout(tokens)

    def _mask_patches(self, patches: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """patches (B, N, D) with the positions where bool_masked_pos (B, N) is True set to the mask token."""
        if self.mask_token is None:
            raise ValueError(
                "bool_masked_pos was given, but this model has no mask token; build it with "
                "DinoConfig(use_mask_token=True) or call DinoModel.enable_mask_token() before training with masks"
            )
        if bool_masked_pos.shape != patches.shape[:2] or bool_masked_pos.dtype != torch.bool:
            raise ValueError(
                f"bool_masked_pos must be a bool tensor of shape (batch, patches) = {tuple(patches.shape[:2])}, "
                f"got {bool_masked_pos.dtype} {tuple(bool_masked_pos.shape)}"
            )
        mask_token = self.mask_token.to(patches.dtype)  # (1, 1, D)
        return torch.where(bool_masked_pos.unsqueeze(-1), mask_token, patches)  # (B, N, D)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit softmax, the "eager" implementation (transformers' ViT
    `eager_attention_forward`, the reference's `Attention.forward`).

    query, key, value (B, heads, N, head_dim); attention_mask None or added to the scores
    (B or 1, heads or 1, N, N) -> output (B, N, heads, head_dim), weights (B, heads, N, N): the
    softmaxed scores, before the attention dropout (what DINO's attention maps show).
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, heads, N, N)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)  # (B, heads, N, N)
    output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)  # (B, heads, N, head_dim)
    return output.transpose(1, 2).contiguous(), weights  # (B, N, heads, head_dim)


class DinoSelfAttention(nn.Module):
    """Multi-head self-attention (transformers' `ViTAttention` without its output projection).

    The attention function is `config._attn_implementation` looked up in transformers'
    `ALL_ATTENTION_FUNCTIONS` ("sdpa" by default, "eager", "flex_attention", "flash_attention_*" or
    one registered with `AttentionInterface.register`), read at every call so that
    `set_attn_implementation` takes effect. When the weights are requested (`output_attentions`), the
    call goes through `eager_attention_forward`, the one implementation that computes them.
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout_prob = config.attention_probs_dropout_prob
        self.is_causal = False  # read by the SDPA and flash implementations
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        """hidden_states (B, N, D) -> context (B, N, D), attention weights (B, heads, N, N) or None."""
        batch_size, seq_len, dim = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        q = self.query(hidden_states).view(shape).transpose(1, 2)  # (B, heads, N, head_dim)
        k = self.key(hidden_states).view(shape).transpose(1, 2)  # (B, heads, N, head_dim)
        v = self.value(hidden_states).view(shape).transpose(1, 2)  # (B, heads, N, head_dim)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, weights = attention_interface(
            self,
            q,
            k,
            v,
            None,
            dropout=self.dropout_prob if self.training else 0.0,
            scaling=self.scale,
        )  # (B, N, heads, head_dim), (B, heads, N, N) or None
        context = context.reshape(batch_size, seq_len, dim)  # (B, N, D)
        return context, weights


class DinoSelfOutput(nn.Module):
    """Output projection of the attention block."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class DinoAttention(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.attention = DinoSelfAttention(config)
        self.output = DinoSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        context, weights = self.attention(hidden_states, output_attentions)
        return self.output(context), weights


class DinoIntermediate(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))


class DinoOutput(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class DinoDropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples with probability `drop_prob`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DinoLayerScale(nn.Module):
    """LayerScale (Touvron et al. 2021, "Going deeper with Image Transformers", CaiT): the branch
    output (B, N, D) times a learned vector `lambda1` (D,), initialised to `config.layerscale_value`.
    Corresponds to transformers' `Dinov2LayerScale` and timm's `LayerScale` (`gamma`)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), config.layerscale_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class DinoLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + drop_path(ls1(attn(norm(x)))), then x + drop_path(ls2(mlp(norm(x)))),
    where ls1 and ls2 are LayerScales with `config.layerscale_value` and identities without (DINO).
    Corresponds to the reference's and timm's `Block` and transformers' `Dinov2Layer`."""

    def __init__(self, config: DinoConfig, drop_path: float = 0.0):
        super().__init__()
        layer_scale = config.layerscale_value is not None
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DinoAttention(config)
        self.layer_scale1 = DinoLayerScale(config) if layer_scale else nn.Identity()
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = DinoIntermediate(config)
        self.output = DinoOutput(config)
        self.layer_scale2 = DinoLayerScale(config) if layer_scale else nn.Identity()
        self.drop_path = DinoDropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        """hidden_states (B, N, D) -> (B, N, D), attention weights (B, heads, N, N) or None."""
        attended, weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(attended))
        mlp = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        hidden_states = hidden_states + self.drop_path(self.layer_scale2(mlp))
        return hidden_states, weights


class DinoEncoder(nn.Module):
    """The stack of `DinoLayer`s (transformers' `ViTEncoder`, the reference's `blocks`)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last (DINO),
        # or is drop_path_rate at every block (DINOv2's drop_path_uniform). The rates are computed on the
        # CPU, whatever the default device, so that the model can be built on the meta device
        # (`with torch.device("meta")`, accelerate's `init_empty_weights`).
        if config.drop_path_uniform:
            rates = [config.drop_path_rate] * config.num_hidden_layers
        else:
            rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layer = nn.ModuleList([DinoLayer(config, rate) for rate in rates])

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> BaseModelOutput:
        """hidden_states (B, 1 + N, D) -> `BaseModelOutput`: `last_hidden_state` (B, 1 + N, D), before the
        final LayerNorm; `hidden_states`: the input and each block's output; `attentions`: each block's
        weights (B, heads, 1 + N, 1 + N)."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, weights = layer(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class DinoPreTrainedModel(PreTrainedModel):
    config_class = DinoConfig
    config: DinoConfig
    base_model_prefix = "dino"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DinoEmbeddings", "DinoLayer"]
    # The attention goes through transformers' attention interface (`DinoSelfAttention`), as ViT's does.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Attention backends that pass extra keyword arguments through `forward` do not apply: it refuses them.
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference's init: trunc_normal(0.02) for Linear weights and the CLS / position
        embeddings, zero biases, LayerNorm 1 / 0; the patch convolution keeps PyTorch's default. The
        register tokens are initialised like the CLS token (Darcet et al. 2024), the mask token at zero
        (DINOv2's `mask_token`), each LayerScale at `config.layerscale_value` (DINOv2's `init_values`)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, DinoEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.trunc_normal_(module.cls_token, std=std)
            if module.register_tokens is not None:
                init.trunc_normal_(module.register_tokens, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(module, DinoLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)


class DinoModel(DinoPreTrainedModel):
    """DINO's ViT backbone. The feature used downstream (`pooler_output`) is the CLS token after the
    final LayerNorm.

    The token sequence is the CLS token, the `config.num_register_tokens` registers, then the patches:
    `num_prefix_tokens` (1 + registers) tokens come before the patches in `last_hidden_state`, as in
    transformers' `Dinov2WithRegistersModel` and timm's ViTs, so `last_hidden_state[:,
    model.num_prefix_tokens:]` are the patch tokens. `get_intermediate_layers` and
    `get_last_selfattention` leave the registers out.

    Example:

    ```python
    >>> import torch
    >>> from dino_hf import DinoConfig, DinoModel
    >>> model = DinoModel(DinoConfig.from_preset("vit_small_patch16")).eval()
    >>> out = model(torch.randn(1, 3, 224, 224))
    >>> out.pooler_output.shape
    torch.Size([1, 384])
    ```
    """

    def __init__(self, config: DinoConfig):
        super().__init__(config)
        self.embeddings = DinoEmbeddings(config)
        self.encoder = DinoEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @property
    def num_register_tokens(self) -> int:
        """Register tokens between the CLS token and the patches (`config.num_register_tokens`)."""
        return self.config.num_register_tokens

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in `last_hidden_state` and the attention weights: CLS and registers."""
        return 1 + self.config.num_register_tokens

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def enable_mask_token(self) -> nn.Parameter:
        """Give a model built without one a mask token (zeros, as at init) and set
        `config.use_mask_token`, so that `bool_masked_pos` can be passed and the model saves and loads
        with it: for iBOT training from a DINO checkpoint. Call it before building the optimiser. A
        model that has one keeps it. Returns the mask token (1, 1, D)."""
        embeddings = self.embeddings
        if embeddings.mask_token is None:
            like = embeddings.cls_token
            mask_token = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            embeddings.mask_token = nn.Parameter(mask_token)  # (1, 1, D)
            self.config.use_mask_token = True
        return embeddings.mask_token

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        Args:
            pixel_values (B, 3, H, W): images normalised with the ImageNet mean and std; H and W any
                multiples of the patch size.
            bool_masked_pos (B, N) bool, optional: patches to replace by the mask token (True), N =
                (H / p) * (W / p) in row-major order, as transformers' ViTModel / Dinov2Model take it
                (iBOT). Needs a model with a mask token (`DinoConfig(use_mask_token=True)`); None leaves
                every patch as it is.
            output_attentions: also return each block's attention weights, (B, heads, T, T) each with
                T = 1 + R + N tokens (CLS, R registers, N patches); they are computed by the eager
                attention whatever `attn_implementation` is.
            output_hidden_states: also return the embeddings and each block's output, (B, T, D) each.
            return_dict: a `BaseModelOutputWithPooling` (default) or a plain tuple.
            interpolate_pos_encoding: accepted because transformers' ViT code passes it, and ignored:
                the position embeddings are always interpolated to the input size (DINO's bicubic
                interpolation, `DinoEmbeddings.interpolate_pos_encoding`), so True, False and None give
                the same output. Any other keyword argument is a TypeError.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` (B, T, D) after the final LayerNorm,
            registers included (the patch tokens are `[:, num_prefix_tokens:]`), and `pooler_output`
            (B, D), its CLS token: the DINO feature.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        embedded = self.embeddings(pixel_values, bool_masked_pos)  # (B, T, D)
        encoded = self.encoder(embedded, output_attentions, output_hidden_states)
        sequence_output = self.layernorm(encoded.last_hidden_state)  # (B, T, D)
        pooled_output = sequence_output[:, 0]  # (B, D)

        if not return_dict:
            extras = tuple(x for x in (encoded.hidden_states, encoded.attentions) if x is not None)
            return (sequence_output, pooled_output) + extras
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    def _without_registers(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """`tokens` with the register positions removed along `dim`: T = 1 + R + N -> 1 + N."""
        if not self.num_register_tokens:
            return tokens
        cls = tokens.narrow(dim, 0, 1)
        patches = tokens.narrow(dim, self.num_prefix_tokens, tokens.shape[dim] - self.num_prefix_tokens)
        return torch.cat((cls, patches), dim=dim)

    def get_intermediate_layers(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        """Outputs of the last `n` blocks, each passed through the final LayerNorm, as the reference's
        linear evaluation uses them: a tuple of n tensors (B, 1 + N, D), oldest first, the CLS token
        then the patches (register tokens left out)."""
        if not 1 <= n <= self.config.num_hidden_layers:
            raise ValueError(f"n must be between 1 and num_hidden_layers={self.config.num_hidden_layers}, got {n}")
        hidden_states = self.embeddings(pixel_values.to(self.layernorm.weight.dtype))
        blocks = self.encoder(hidden_states, output_hidden_states=True).hidden_states[-n:]
        return tuple(self._without_registers(self.layernorm(block), dim=1) for block in blocks)

    def get_last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block between the CLS token and the patches, (B, heads, 1 + N,
        1 + N); row 0 is the CLS query, the one DINO's attention maps show (paper Fig. 1 and 3). With
        registers, their rows and columns are left out, so a row sums to 1 minus the attention its query
        gives the registers."""
        hidden_states = self.embeddings(pixel_values.to(self.layernorm.weight.dtype))
        attention = self.encoder(hidden_states, output_attentions=True).attentions[-1]  # (B, heads, T, T)
        return self._without_registers(self._without_registers(attention, dim=2), dim=3)  # (B, heads, 1+N, 1+N)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Write `config.json`, `model.safetensors` and `preprocessor_config.json` (DINO's evaluation
        transform), so `AutoImageProcessor` and `pipeline("image-feature-extraction")` load the folder."""
        if kwargs.get("is_main_process", True):
            dino_image_processor(self.config.image_size).save_pretrained(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["DinoModel", "DinoPreTrainedModel", "PRESETS"]
