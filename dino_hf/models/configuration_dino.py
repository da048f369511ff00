"""Configuration of the DINO Vision Transformer (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers").

The fields and their names follow transformers' `ViTConfig` wherever the architecture is the same, so
that converting between the two is a rename. The defaults are DINO's ViT-S/16: LayerNorm eps 1e-6
(the value the released weights were trained with) and stochastic depth 0.1. Four additions from
DINOv2, all off by default so that the model is DINO's bit for bit: register tokens
(`num_register_tokens`, `Dinov2WithRegistersConfig`'s name), iBOT's mask token (`use_mask_token`,
`ViTConfig`'s name), LayerScale (`layerscale_value`, `Dinov2WithRegistersConfig`'s name) and one
stochastic-depth rate for every block (`drop_path_uniform`, DINOv2's `drop_path_uniform`).
"""

import math

from transformers import PretrainedConfig

# name -> (hidden_size, num_hidden_layers, num_attention_heads); docs/recipe.md#backbones, paper Table 1.
_VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
PRESETS = tuple(f"{size}_patch{patch}" for size in _VIT_SIZES for patch in (16, 8))


class DinoConfig(PretrainedConfig):
    r"""
    Configuration of a [`DinoModel`]: a pre-norm Vision Transformer with a CLS token and learned
    absolute position embeddings, as trained by DINO.

    Args:
        hidden_size (`int`, defaults to 384): width of the token embeddings.
        num_hidden_layers (`int`, defaults to 12): number of transformer blocks.
        num_attention_heads (`int`, defaults to 6): attention heads per block.
        intermediate_size (`int`, defaults to 1536): hidden width of the MLP (mlp_ratio 4).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact GELU, as the reference).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after attention and MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention weights.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal weight init.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon of the reference ViT.
        image_size (`int`, defaults to 224): size the position embeddings are learned for; other
            sizes are served by bicubic interpolation of the position grid.
        patch_size (`int`, defaults to 16): patch size (DINO uses 16 or 8).
        num_channels (`int`, defaults to 3): input channels.
        qkv_bias (`bool`, defaults to `True`): bias on the query, key and value projections.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth at the last block, growing
            linearly from 0 at the first block (paper Sec. 3, reference `drop_path_rate`); the rate of
            every block with `drop_path_uniform`.
        drop_path_uniform (`bool`, defaults to `False`): give every block the rate `drop_path_rate`,
            as DINOv2 does (`drop_path_uniform: true` in its `ssl_default_config.yaml`), instead of
            DINO's linear rule.
        num_register_tokens (`int`, defaults to 0): learned register tokens placed after the CLS token,
            without position embedding (Darcet et al. 2024, "Vision Transformers Need Registers": 4 in
            DINOv2-with-registers and DINOv3). They take part in attention; the patch tokens,
            features and attention maps leave them out (`DinoModel.num_prefix_tokens`).
        use_mask_token (`bool`, defaults to `False`): give the embeddings a learned mask token, which
            replaces the patches that `bool_masked_pos` marks (iBOT, DINOv2 Sec. 3). Off, the model
            has no such weight, as the DINO checkpoints.
        layerscale_value (`float`, *optional*): LayerScale (Touvron et al. 2021, "Going deeper with
            Image Transformers"): each block multiplies the output of its attention and of its MLP by
            a learned per-channel vector initialised to this value, before stochastic depth (DINOv2's
            `layerscale: 1.0e-05`). None (the default): no LayerScale and no such weights, as DINO's
            ViT.

    Example:

    ```python
    >>> from dino_hf import DinoConfig, DinoModel
    >>> config = DinoConfig.from_preset("vit_small_patch16")
    >>> model = DinoModel(config)
    ```
    """

    model_type = "dino_vit"

    def __init__(
        self,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        intermediate_size: int = 1536,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-6,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        num_register_tokens: int = 0,
        use_mask_token: bool = False,
        layerscale_value: float | None = None,
        drop_path_uniform: bool = False,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}; "
                f"use a head count that divides it, such as {hidden_size // 64 or 1}"
            )
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}; "
                f"use a multiple such as {image_size - image_size % patch_size or patch_size}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if type(num_register_tokens) is not int or num_register_tokens < 0:
            raise ValueError(
                f"num_register_tokens must be a whole number >= 0 (0: no registers; DINOv2 uses 4), "
                f"got {num_register_tokens!r}"
            )
        if layerscale_value is not None and not (
            type(layerscale_value) in (int, float) and math.isfinite(layerscale_value) and layerscale_value > 0
        ):
            raise ValueError(
                f"layerscale_value must be None (no LayerScale) or a positive finite number (DINOv2 uses 1e-5), "
                f"got {layerscale_value!r}"
            )
        if type(drop_path_uniform) is not bool:
            raise ValueError(
                f"drop_path_uniform must be True (every block at drop_path_rate) or False (growing linearly "
                f"to drop_path_rate), got {drop_path_uniform!r}"
            )
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.num_register_tokens = num_register_tokens
        self.use_mask_token = bool(use_mask_token)
        self.layerscale_value = None if layerscale_value is None else float(layerscale_value)
        self.drop_path_uniform = drop_path_uniform
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DinoConfig":
        """Config of one of DINO's ViTs by name, e.g. `"vit_small_patch16"`; see `PRESETS`.

        Keyword arguments override fields of the preset (e.g. `drop_path_rate=0.0`,
        `num_register_tokens=4`, `layerscale_value=1e-5`).
        """
        size, _, patch = name.rpartition("_patch")
        if size not in _VIT_SIZES or patch not in ("8", "16"):
            raise ValueError(f"unknown DINO preset {name!r}; choose one of {', '.join(PRESETS)}")
        hidden, layers, heads = _VIT_SIZES[size]
        fields = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            patch_size=int(patch),
        )
        fields.update(overrides)
        return cls(**fields)


__all__ = ["DinoConfig", "PRESETS"]
