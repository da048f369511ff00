import pytest
import torch
from tiny import TINY_VIT

from dino_hf import DinoConfig, DinoModel
from dino_hf.models.backbones import DinoModelBackbone, TimmBackbone, build_backbone

TINY_TIMM_VIT = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_config(**overrides) -> DinoConfig:
    fields = dict(**TINY_VIT)
    return DinoConfig(**{**fields, **overrides})


def test_timm_vit_takes_local_crops_and_returns_cls_after_norm():
    backbone = build_backbone("timm:test_vit", **TINY_TIMM_VIT).eval()
    assert isinstance(backbone, TimmBackbone)
    assert backbone.num_features == 32
    assert backbone.model.dynamic_img_size
    for size in (32, 16):  # global and local crops
        x = torch.randn(2, 3, size, size)
        features = backbone(x)
        assert features.shape == (2, 32)
        torch.testing.assert_close(features, backbone.model.forward_features(x)[:, 0])  # normed CLS


def test_timm_vit_drop_path_rate_reaches_the_blocks():
    backbone = build_backbone("timm:test_vit", drop_path_rate=0.2, **TINY_TIMM_VIT)
    drop_probs = [m.drop_prob for m in backbone.modules() if hasattr(m, "drop_prob")]
    assert max(drop_probs) == pytest.approx(0.2)


def test_timm_cnn_returns_pooled_features_without_classifier():
    backbone = build_backbone("timm:test_resnet").eval()
    assert backbone.num_features == backbone.model.num_features == 96
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone(x), backbone.model.forward_features(x).mean(dim=(2, 3)))
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 96)


def test_timm_feature_size_is_the_forward_width_with_pre_logits():
    # mobilenetv3's forward ends in a 1024-wide pre-logits layer after 288 pooled channels.
    backbone = build_backbone("timm:mobilenetv3_small_050")
    assert backbone.model.num_features == 288
    assert backbone.num_features == 1024 == backbone.eval()(torch.randn(1, 3, 32, 32)).shape[-1]


def test_dino_model_from_preset_config_and_instance():
    preset = build_backbone("vit_tiny_patch16", drop_path_rate=0.0, image_size=32)
    assert isinstance(preset, DinoModelBackbone) and isinstance(preset.model, DinoModel)
    assert preset.num_features == 192 and preset.model.config.image_size == 32
    assert preset.model.config.drop_path_rate == 0.0

    config = tiny_config(drop_path_rate=0.3)
    from_config = build_backbone(config, drop_path_rate=0.05)
    assert from_config.model.config.drop_path_rate == 0.05 and config.drop_path_rate == 0.3

    model = DinoModel(tiny_config()).eval()
    wrapped = build_backbone(model)
    assert wrapped.model is model and wrapped.num_features == 32
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(wrapped(x), model(x).pooler_output)


def test_dino_model_from_saved_folder(tmp_path):
    model = DinoModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = build_backbone(str(tmp_path), drop_path_rate=0.0).eval()
    assert loaded.model.config.drop_path_rate == 0.0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x).pooler_output)


@pytest.mark.parametrize(
    "spec, suggestion",
    [
        ("timm:vit_smal_patch16_224", "'timm:vit_small_patch16_224'"),
        ("resnet50", "'timm:resnet50'"),
        ("vit_small_patch61", "'vit_small_patch16'"),
    ],
)
def test_unknown_name_suggests_close_matches(spec, suggestion):
    with pytest.raises(ValueError, match="did you mean") as error:
        build_backbone(spec)
    assert suggestion in str(error.value)


def test_fixed_size_timm_model_and_pretrained_preset_are_refused():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        build_backbone("timm:cait_xxs24_224")
    with pytest.raises(ValueError, match="no weights"):
        build_backbone("vit_small_patch16", pretrained=True)
    with pytest.raises(TypeError, match="DinoConfig"):
        build_backbone(3)
