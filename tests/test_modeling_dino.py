import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import accelerate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tiny import TINY_VIT
from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline
from transformers.modeling_utils import AttentionInterface

from dino_hf import PRESETS, DinoConfig, DinoModel
from dino_hf.models import modeling_dino


def tiny_config(**overrides) -> DinoConfig:
    fields = dict(
        **TINY_VIT,
        drop_path_rate=0.0,
    )
    fields.update(overrides)
    return DinoConfig(**fields)


@pytest.fixture
def model() -> DinoModel:
    torch.manual_seed(0)
    return DinoModel(tiny_config()).eval()


def reference_pos_embed(pos_embed: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """The reference DINO `interpolate_pos_encoding`, written as in vision_transformer.py (whose
    `prepare_tokens` unpacks `B, nc, w, h = x.shape`, so its `w` is the height)."""
    w, h = height, width
    npatch = (w // patch_size) * (h // patch_size)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size + 0.1
    h0 = h // patch_size + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def reference_vit_forward(
    state: dict, config: DinoConfig, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """An independent ViT forward from the raw weights: the reference's pre-norm blocks with a fused
    softmax attention, returning the normalised tokens (B, 1+R+N, D). The patches marked in
    `bool_masked_pos` (B, N) are set to `embeddings.mask_token` before the position embeddings are added;
    `embeddings.register_tokens`, when in `state`, go after the CLS token once they are added (DINOv2);
    `encoder.layer.{i}.layer_scale{1,2}.lambda1`, when in `state`, scale the attention and MLP outputs
    (DINOv2's LayerScale)."""
    eps, heads, p = config.layer_norm_eps, config.num_attention_heads, config.patch_size
    tokens = F.conv2d(
        x,
        state["embeddings.patch_embeddings.projection.weight"],
        state["embeddings.patch_embeddings.projection.bias"],
        stride=p,
    )
    tokens = tokens.flatten(2).transpose(1, 2)
    if bool_masked_pos is not None:
        tokens = tokens.clone()
        tokens[bool_masked_pos] = state["embeddings.mask_token"].reshape(-1)
    cls = state["embeddings.cls_token"].expand(x.shape[0], -1, -1)
    tokens = torch.cat((cls, tokens), dim=1)
    tokens = tokens + reference_pos_embed(state["embeddings.position_embeddings"], p, x.shape[2], x.shape[3])
    if "embeddings.register_tokens" in state:
        registers = state["embeddings.register_tokens"].expand(x.shape[0], -1, -1)
        tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
    B, N, D = tokens.shape
    for i in range(config.num_hidden_layers):
        s = lambda name: state[f"encoder.layer.{i}.{name}"]  # noqa: E731
        ls1, ls2 = (state.get(f"encoder.layer.{i}.layer_scale{n}.lambda1") for n in (1, 2))  # (D,) or None
        h = F.layer_norm(tokens, (D,), s("layernorm_before.weight"), s("layernorm_before.bias"), eps)
        qkv = [
            F.linear(h, s(f"attention.attention.{n}.weight"), s(f"attention.attention.{n}.bias"))
            .reshape(B, N, heads, D // heads)
            .permute(0, 2, 1, 3)
            for n in ("query", "key", "value")
        ]
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
        out = (attn @ qkv[2]).transpose(1, 2).reshape(B, N, D)
        out = F.linear(out, s("attention.output.dense.weight"), s("attention.output.dense.bias"))
        tokens = tokens + (out if ls1 is None else out * ls1)
        h = F.layer_norm(tokens, (D,), s("layernorm_after.weight"), s("layernorm_after.bias"), eps)
        h = F.gelu(F.linear(h, s("intermediate.dense.weight"), s("intermediate.dense.bias")))
        h = F.linear(h, s("output.dense.weight"), s("output.dense.bias"))
        tokens = tokens + (h if ls2 is None else h * ls2)
    return F.layer_norm(tokens, (D,), state["layernorm.weight"], state["layernorm.bias"], eps)


def test_presets_have_the_published_sizes():
    expected = {
        "vit_tiny": (192, 12, 3),
        "vit_small": (384, 12, 6),
        "vit_base": (768, 12, 12),
        "vit_large": (1024, 24, 16),
    }
    for size, (hidden, layers, heads) in expected.items():
        for patch in (16, 8):
            config = DinoConfig.from_preset(f"{size}_patch{patch}")
            assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
                hidden,
                layers,
                heads,
            )
            assert config.intermediate_size == 4 * hidden
            assert config.patch_size == patch
            assert config.layer_norm_eps == 1e-6 and config.qkv_bias and config.drop_path_rate == 0.1
    assert len(PRESETS) == 8
    assert DinoConfig.model_type not in ("vit", "dinov2", "dinov3_vit")


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="vit_small_patch16"):
        DinoConfig.from_preset("vit_smal_patch16")
    with pytest.raises(ValueError, match="not a multiple of patch_size 16"):
        DinoConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        DinoConfig(hidden_size=100, num_attention_heads=6)


def test_forward_outputs(model):
    x = torch.randn(2, 3, 32, 32)
    out = model(x, output_attentions=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 17, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0], rtol=0, atol=0)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(out.attentions[-1].sum(-1), torch.ones(2, 2, 17))
    # The explicit attention path (taken when weights are requested) equals the SDPA path.
    plain = model(x)
    assert plain.attentions is None and plain.hidden_states is None
    assert (plain.last_hidden_state - out.last_hidden_state).abs().max() <= 1e-5
    as_tuple = model(x, return_dict=False)
    torch.testing.assert_close(as_tuple[1], plain.pooler_output)


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (24, 40), (40, 16)])
def test_forward_matches_independent_reference_at_any_size(model, size):
    x = torch.randn(2, 3, *size)
    expected = reference_vit_forward(model.state_dict(), model.config, x)
    got = model(x).last_hidden_state
    assert got.shape == expected.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 32)
    assert (got - expected).abs().max() <= 1e-5


def test_position_interpolation_matches_reference_at_96px_and_non_square():
    torch.manual_seed(0)
    model = DinoModel(tiny_config(image_size=224, patch_size=16, hidden_size=24, num_attention_heads=2)).eval()
    pos = model.embeddings.position_embeddings.detach()
    for height, width in [(96, 96), (224, 224), (96, 160), (160, 96), (480, 224)]:
        ours = model.embeddings.interpolate_pos_encoding(height, width)
        theirs = reference_pos_embed(pos, 16, height, width)
        assert ours.shape == theirs.shape == (1, 1 + (height // 16) * (width // 16), 24)
        assert (ours - theirs).abs().max() <= 1e-6
    assert torch.equal(model.embeddings.interpolate_pos_encoding(224, 224), pos)


def test_patch_size_must_divide_the_input(model):
    with pytest.raises(ValueError, match=r"30x32 is not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


def test_intermediate_layers_and_last_attention(model):
    x = torch.randn(2, 3, 32, 32)
    out = model(x, output_hidden_states=True, output_attentions=True)
    layers = model.get_intermediate_layers(x, n=2)
    assert len(layers) == 2
    for got, hidden in zip(layers, out.hidden_states[-2:]):
        torch.testing.assert_close(got, model.layernorm(hidden))
    torch.testing.assert_close(layers[-1], out.last_hidden_state)
    torch.testing.assert_close(model.get_last_selfattention(x), out.attentions[-1])
    with pytest.raises(ValueError, match="between 1 and num_hidden_layers=2"):
        model.get_intermediate_layers(x, n=3)


def test_stochastic_depth_grows_linearly_and_acts_only_in_training():
    model = DinoModel(tiny_config(num_hidden_layers=5, drop_path_rate=0.4))
    rates = [layer.drop_path.drop_prob for layer in model.encoder.layer]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    x = torch.randn(64, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x).pooler_output, model(x).pooler_output, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    a = model(x).pooler_output
    torch.manual_seed(2)
    b = model(x).pooler_output
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "empty_weights",
    [lambda: torch.device("meta"), lambda: accelerate.init_empty_weights(include_buffers=True)],
    ids=["torch.device", "init_empty_weights"],
)
def test_builds_on_the_meta_device_and_materialises(empty_weights):
    config = tiny_config(num_hidden_layers=5, drop_path_rate=0.4)
    with empty_weights():
        empty = DinoModel(config)
    assert {t.device.type for t in [*empty.parameters(), *empty.buffers()]} == {"meta"}
    rates = [layer.drop_path.drop_prob for layer in empty.encoder.layer]
    assert rates == torch.linspace(0, 0.4, 5).tolist()
    assert rates == pytest.approx([0.4 * i / 4 for i in range(5)])

    torch.manual_seed(0)
    model = DinoModel(config).eval()
    empty.to_empty(device="cpu").load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(empty.eval()(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


@pytest.fixture
def attention_calls(monkeypatch) -> Counter:
    """Counts the calls of each attention implementation that runs on a CPU, each still doing its work."""
    calls = Counter()

    def spy(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(modeling_dino, "eager_attention_forward", spy("eager", modeling_dino.eager_attention_forward))
    functions = AttentionInterface._global_mapping  # the registry behind ALL_ATTENTION_FUNCTIONS
    for name in ("sdpa", "flex_attention"):
        monkeypatch.setitem(functions, name, spy(name, functions[name]))
    return calls


def outputs_with(model: DinoModel, implementation: str, x: torch.Tensor, calls: Counter):
    """The outputs of `model` under `implementation`, checking that it ran in every block and no other."""
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    calls.clear()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert calls == {implementation: model.config.num_hidden_layers}
    return out


def assert_same_outputs(got, expected) -> None:
    for name in ("last_hidden_state", "pooler_output"):
        assert (getattr(got, name) - getattr(expected, name)).abs().max() <= 1e-5, name
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_default_attention_is_sdpa_and_eager_agrees(model, attention_calls):
    assert model.config._attn_implementation == "sdpa"
    assert DinoModel._supports_sdpa and DinoModel._supports_flash_attn and DinoModel._supports_flex_attn
    x = torch.randn(2, 3, 24, 40)
    sdpa = outputs_with(model, "sdpa", x, attention_calls)
    eager = outputs_with(model, "eager", x, attention_calls)
    assert_same_outputs(sdpa, eager)
    assert (eager.last_hidden_state - reference_vit_forward(model.state_dict(), model.config, x)).abs().max() <= 1e-5

    # The weights are only computed by the eager attention: requesting them takes it for that call.
    model.set_attn_implementation("sdpa")
    attention_calls.clear()
    with torch.no_grad():
        out = model(x, output_attentions=True)
    assert attention_calls == {"eager": 2}
    assert [a.shape for a in out.attentions] == [(2, 2, 16, 16)] * 2
    torch.testing.assert_close(out.attentions[-1].sum(-1), torch.ones(2, 2, 16))
    assert (out.last_hidden_state - sdpa.last_hidden_state).abs().max() <= 1e-5


@pytest.mark.slow  # flex attention is compiled by inductor on its first call: about a minute on a CPU
def test_flex_attention_runs_and_agrees(model, attention_calls):
    x = torch.randn(2, 3, 32, 32)
    flex = outputs_with(model, "flex_attention", x, attention_calls)
    assert_same_outputs(flex, outputs_with(model, "eager", x, attention_calls))


def test_from_pretrained_takes_the_attention_implementation(model, tmp_path, attention_calls):
    model.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).pooler_output
    assert DinoModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    for implementation in ("eager", "sdpa"):
        loaded = DinoModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        attention_calls.clear()
        with torch.no_grad():
            assert (loaded(x).pooler_output - expected).abs().max() <= 1e-5
        assert attention_calls == {implementation: 2}


def test_a_registered_attention_function_is_used(model, monkeypatch):
    """The attention backend interface: a function registered with `AttentionInterface.register`."""
    seen = []

    def doubled_scale(module, query, key, value, attention_mask, scaling, dropout=0.0):
        seen.append(query.shape)
        return modeling_dino.eager_attention_forward(module, query, key, value, attention_mask, 2 * scaling, dropout)

    monkeypatch.setitem(AttentionInterface._global_mapping, "doubled_scale", doubled_scale)
    # Registered functions are looked up by name; backends that pass kwargs through forward are refused.
    assert not DinoModel.is_backend_compatible()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x).last_hidden_state
        model.set_attn_implementation("doubled_scale")
        doubled = model(x).last_hidden_state
    assert seen == [(2, 2, 17, 16)] * 2
    assert (doubled - plain).abs().max() > 1e-4


def test_forward_rejects_unknown_arguments_and_ignores_interpolate_pos_encoding(model):
    x = torch.randn(2, 3, 24, 40)
    with pytest.raises(TypeError, match="head_mask"):
        model(x, head_mask=None)
    with pytest.raises(ValueError, match=r"no mask token; build it with DinoConfig\(use_mask_token=True\)"):
        model(x, bool_masked_pos=torch.zeros(2, 15, dtype=torch.bool))
    with torch.no_grad():
        expected = model(x).last_hidden_state
        for value in (True, False, None):
            assert torch.equal(model(x, interpolate_pos_encoding=value).last_hidden_state, expected)


def test_init_follows_the_reference():
    torch.manual_seed(0)
    model = DinoModel(tiny_config(hidden_size=256, num_attention_heads=4, intermediate_size=1024))
    weight = model.encoder.layer[0].intermediate.dense.weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert weight.abs().max().item() <= 2.0
    assert torch.count_nonzero(model.encoder.layer[0].intermediate.dense.bias) == 0
    assert torch.equal(model.layernorm.weight, torch.ones(256))
    assert torch.count_nonzero(model.layernorm.bias) == 0
    assert model.embeddings.position_embeddings.std().item() == pytest.approx(0.02, rel=0.2)


def test_every_parameter_gets_a_gradient(model):
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    (out.last_hidden_state.square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_save_load_round_trip_and_auto_classes(model, tmp_path):
    model.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (tmp_path / name).is_file()
    saved = load_file(tmp_path / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    assert "encoder.layer.0.attention.attention.query.weight" in saved
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dino_vit"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dino.DinoConfig",
        "AutoModel": "modeling_dino.DinoModel",
    }

    assert isinstance(AutoConfig.from_pretrained(tmp_path), DinoConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is DinoModel
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": 37} and processor.crop_size == {"height": 32, "width": 32}
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])


def test_default_image_processor_is_the_dino_eval_transform(tmp_path):
    DinoModel(tiny_config(image_size=224, patch_size=16)).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": 256}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert int(processor.resample) == int(Image.Resampling.BICUBIC)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


def test_feature_extraction_pipeline(model, tmp_path):
    model.save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    features = torch.tensor(extractor(image))
    assert features.shape == (1, 17, 32)
    pixels = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
    assert (features - expected).abs().max() <= 1e-5
    pooled = torch.tensor(extractor(image, pool=True))
    assert (pooled - expected[:, 0]).abs().max() <= 1e-5


def test_saved_folder_loads_without_dino_hf(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x).pooler_output, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dino_hf"] = None  # dino_hf cannot be imported in this process
        try:
            import dino_hf
        except ImportError:
            pass
        else:
            raise SystemExit("dino_hf was importable")
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            diff = (model(x).pooler_output - expected).abs().max().item()
        assert diff <= 1e-6, diff
        print("OK", diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


EXPORT_V010 = Path(__file__).resolve().parent / "fixtures" / "dino_vit_export_v0.1.0"


def test_a_folder_exported_by_version_0_1_0_loads_with_the_same_features(tmp_path):
    """`fixtures/dino_vit_export_v0.1.0` was written by `export_backbone` of dino_hf 0.1.0 (flat package
    layout); it loads with dino_hf and, with its own copied code, without it."""
    expected = load_file(str(EXPORT_V010) + ".expected.safetensors")
    model = AutoModel.from_pretrained(EXPORT_V010).eval()
    assert isinstance(model, DinoModel)
    with torch.no_grad():
        assert (model(expected["pixel_values"]).pooler_output - expected["pooler_output"]).abs().max() <= 1e-5
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dino_hf"] = None  # dino_hf cannot be imported in this process
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(EXPORT_V010)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = load_file({str(EXPORT_V010) + ".expected.safetensors"!r})
        with torch.no_grad():
            diff = (model(expected["pixel_values"]).pooler_output - expected["pooler_output"]).abs().max().item()
        assert diff <= 1e-5, diff
        print("OK", diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


# ---------------------------------------------------------------------------------------------------
# The mask token (iBOT, DINOv2 Sec. 3)


def masked_model(**overrides) -> DinoModel:
    """A tiny model with a mask token set to random values, so that a masked patch can be told apart."""
    torch.manual_seed(0)
    model = DinoModel(tiny_config(use_mask_token=True, **overrides)).eval()
    with torch.no_grad():
        model.embeddings.mask_token.normal_()
    return model


def random_mask(batch: int, patches: int, seed: int = 0) -> torch.Tensor:
    mask = torch.rand(batch, patches, generator=torch.Generator().manual_seed(seed)) < 0.4  # (B, N)
    mask[0, 0], mask[0, 1] = True, False  # both kinds of patches in every draw
    return mask


def test_the_mask_token_is_off_by_default_and_starts_at_zero(model):
    assert model.config.use_mask_token is False and model.embeddings.mask_token is None
    assert not any("mask_token" in key for key in model.state_dict())
    model = DinoModel(tiny_config(use_mask_token=True))
    assert model.embeddings.mask_token.shape == (1, 1, 32)
    assert torch.count_nonzero(model.embeddings.mask_token) == 0


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_masked_patches_get_the_mask_token_before_the_position_embeddings(size):
    model = masked_model()
    x = torch.randn(2, 3, *size)
    mask = random_mask(2, (size[0] // 8) * (size[1] // 8))
    with torch.no_grad():
        got = model(x, bool_masked_pos=mask).last_hidden_state
        embedded = model.embeddings(x, mask)  # (B, 1 + N, D)
    assert (got - reference_vit_forward(model.state_dict(), model.config, x, mask)).abs().max() <= 1e-5
    # At a masked position the embedding is exactly mask token + position; elsewhere the patch's own.
    position = model.embeddings.interpolate_pos_encoding(*size)[0, 1:]  # (N, D)
    token = model.embeddings.mask_token[0, 0]
    with torch.no_grad():
        plain = model.embeddings(x)
    for b in range(2):
        torch.testing.assert_close(embedded[b, 1:][mask[b]], (token + position)[mask[b]], rtol=0, atol=0)
        torch.testing.assert_close(embedded[b, 1:][~mask[b]], plain[b, 1:][~mask[b]], rtol=0, atol=0)
    assert (got - model(x).last_hidden_state).abs().max() > 1e-3


def test_a_model_without_masks_computes_what_it_did():
    """The mask token takes no random draw at init: the same seed gives the same other weights, and a
    forward without `bool_masked_pos` (or with nothing masked) is bit for bit the model without one."""
    torch.manual_seed(0)
    plain = DinoModel(tiny_config()).eval()
    torch.manual_seed(0)
    with_token = DinoModel(tiny_config(use_mask_token=True)).eval()
    state = with_token.state_dict()
    assert set(state) - set(plain.state_dict()) == {"embeddings.mask_token"}
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        with_token.embeddings.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x).last_hidden_state
        assert torch.equal(with_token(x).last_hidden_state, expected)
        nothing = torch.zeros(2, 16, dtype=torch.bool)
        assert torch.equal(with_token(x, bool_masked_pos=nothing).last_hidden_state, expected)


def test_gradients_reach_the_mask_token_when_patches_are_masked():
    model = masked_model().train()
    x = torch.randn(2, 3, 32, 32)
    model(x, bool_masked_pos=random_mask(2, 16)).last_hidden_state.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.embeddings.mask_token.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x).last_hidden_state.square().mean().backward()
    assert model.embeddings.mask_token.grad is None  # unmasked forwards do not use it


def test_bool_masked_pos_must_be_a_bool_per_patch():
    model = masked_model()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"shape \(batch, patches\) = \(2, 16\), got torch.bool \(2, 15\)"):
        model(x, bool_masked_pos=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="got torch.int64"):
        model(x, bool_masked_pos=torch.zeros(2, 16, dtype=torch.long))


def test_enable_mask_token_adds_one_that_saves_and_loads(model, tmp_path):
    from dino_hf.models.weight_check import load_checked

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).last_hidden_state
    token = model.enable_mask_token()
    assert token is model.embeddings.mask_token and model.enable_mask_token() is token
    assert torch.count_nonzero(token) == 0 and model.config.use_mask_token
    assert "embeddings.mask_token" in dict(model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, expected)
        token.normal_()
        masked = model(x, bool_masked_pos=random_mask(2, 16)).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = load_checked(DinoModel, str(tmp_path)).eval()  # every tensor, the mask token included
    assert torch.equal(loaded.embeddings.mask_token, token)
    with torch.no_grad():
        assert (loaded(x, bool_masked_pos=random_mask(2, 16)).last_hidden_state - masked).abs().max() <= 1e-6


def test_save_load_round_trip_with_registers_and_mask_token(tmp_path):
    from dino_hf.models.weight_check import load_checked

    model = masked_model(num_register_tokens=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_register_tokens"], config["use_mask_token"]) == (2, True)
    x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 16)
    with torch.no_grad():
        expected = model(x, bool_masked_pos=mask)
    for loaded in (AutoModel.from_pretrained(tmp_path), load_checked(DinoModel, str(tmp_path))):
        loaded.eval()
        assert set(loaded.state_dict()) == set(model.state_dict())
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with torch.no_grad():
            got = loaded(x, bool_masked_pos=mask)
        assert got.last_hidden_state.shape == (2, 1 + 2 + 16, 32)
        assert (got.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-6


def test_the_0_1_0_folder_has_neither_registers_nor_a_mask_token():
    from dino_hf.models.weight_check import load_checked

    model = load_checked(DinoModel, str(EXPORT_V010))  # refuses a missing or an extra tensor
    assert (model.config.num_register_tokens, model.config.use_mask_token) == (0, False)
    assert (model.num_register_tokens, model.num_prefix_tokens) == (0, 1)
    assert model.embeddings.mask_token is None and model.embeddings.register_tokens is None
    expected = load_file(str(EXPORT_V010) + ".expected.safetensors")
    with torch.no_grad():
        assert (model.eval()(expected["pixel_values"]).pooler_output - expected["pooler_output"]).abs().max() <= 1e-5


def test_builds_on_the_meta_device_with_registers_and_mask_token():
    config = tiny_config(num_register_tokens=3, use_mask_token=True)
    with torch.device("meta"):
        empty = DinoModel(config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert empty.embeddings.register_tokens.shape == (1, 3, 32) and empty.embeddings.mask_token.shape == (1, 1, 32)
    model = masked_model(num_register_tokens=3)
    empty.to_empty(device="cpu").load_state_dict(model.state_dict())
    x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            empty.eval()(x, bool_masked_pos=mask).last_hidden_state,
            model(x, bool_masked_pos=mask).last_hidden_state,
            rtol=0,
            atol=0,
        )
