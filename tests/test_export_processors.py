"""Every export's image preprocessing works in stock transformers and timm: it loads with
`AutoImageProcessor`, runs in `pipeline("image-feature-extraction")`, turns any image into the training
size and normalises with the mean and std the backbone was trained with (the start's own, ImageNet's
from scratch). One subprocess checks the exports of every family without dino_hf, a short run's
`teacher_backbone_best` too."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers as tf
from PIL import Image
from runs import train_in_process
from tiny import TINY_VIT

from dino_hf.convert import export
from dino_hf.convert.export import export_backbone, save_as_timm, save_as_vit, source_image_processor
from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.modeling_dino import DinoModel
from dino_hf.models.normalization import IMAGENET, Normalization, normalization_of, set_normalization_

SIZE = 32  # the training size every export is written at
OWN = Normalization((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # no library's default: it can only come from the start
CLIP = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
VIT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
STAGES = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
OWN_PROCESSOR = dict(image_mean=list(OWN.mean), image_std=list(OWN.std))
# Each family with the image processor class its released checkpoints come with (at their released sizes).
TRANSFORMERS_STARTS = {
    "vit": (lambda: tf.ViTConfig(**VIT_SIZES, intermediate_size=64), lambda: tf.ViTImageProcessor(**OWN_PROCESSOR)),
    "deit": (lambda: tf.DeiTConfig(**VIT_SIZES, intermediate_size=64), lambda: tf.DeiTImageProcessor(**OWN_PROCESSOR)),
    "dinov2": (
        lambda: tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2),
        lambda: tf.BitImageProcessor(size={"shortest_edge": 256}, crop_size=224, **OWN_PROCESSOR),
    ),
    "dinov2_with_registers": (
        lambda: tf.Dinov2WithRegistersConfig(**VIT_SIZES, mlp_ratio=2, num_register_tokens=2),
        lambda: tf.BitImageProcessor(size={"shortest_edge": 256}, crop_size=224, **OWN_PROCESSOR),
    ),
    "dinov3_vit": (
        lambda: tf.DINOv3ViTConfig(**VIT_SIZES, intermediate_size=64, num_register_tokens=2),
        lambda: tf.DINOv3ViTImageProcessor(**OWN_PROCESSOR),
    ),
    "dinov3_convnext": (
        lambda: tf.DINOv3ConvNextConfig(**STAGES),
        lambda: tf.DINOv3ViTImageProcessor(**OWN_PROCESSOR),
    ),
    "convnext": (
        lambda: tf.ConvNextConfig(**STAGES),
        lambda: tf.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, **OWN_PROCESSOR),
    ),
    "convnextv2": (
        lambda: tf.ConvNextV2Config(**STAGES),
        lambda: tf.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, **OWN_PROCESSOR),
    ),
    "swin": (
        lambda: tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
        ),
        lambda: tf.ViTImageProcessor(**OWN_PROCESSOR),
    ),
    "dinov2_without_processor": (lambda: tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2), None),
}


def _tiny_timm_vit():
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )


def _starts(root: Path) -> dict[str, tuple[object, Normalization]]:
    """`{name: (build_backbone spec, the normalisation its export must carry)}`, starts written under `root`."""
    starts = {}
    for name, (config, processor) in TRANSFORMERS_STARTS.items():
        tf.AutoModel.from_config(config()).save_pretrained(root / name)
        if processor is not None:
            processor().save_pretrained(root / name)
        starts[name] = str(root / name), IMAGENET if processor is None else OWN
    timm.models.save_for_hf(
        _tiny_timm_vit(), root / "timm_vit", safe_serialization=True, data_config=dict(mean=CLIP.mean, std=CLIP.std)
    )
    starts["timm_vit"] = str(root / "timm_vit"), CLIP
    wrapper_config = tf.TimmWrapperConfig(architecture="resnet10t", num_classes=0, pretrained_cfg=dict(OWN._asdict()))
    tf.TimmWrapperModel(wrapper_config).save_pretrained(root / "timm_wrapper")
    starts["timm_wrapper"] = str(root / "timm_wrapper"), OWN
    starts["timm_from_scratch"] = "timm:resnet10t", IMAGENET
    DinoModel(DinoConfig(**TINY_VIT)).save_pretrained(root / "dino_model")
    tf.BitImageProcessor(size={"shortest_edge": 37}, crop_size=SIZE, **OWN_PROCESSOR).save_pretrained(
        root / "dino_model"
    )
    starts["dino_model"] = str(root / "dino_model"), OWN
    starts["dino_model_from_scratch"] = DinoConfig(**TINY_VIT), IMAGENET
    return starts


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Normalization]]:
    """`{name: (export folder at SIZE px, the normalisation it must carry)}` for every family and kind of start."""
    root = tmp_path_factory.mktemp("starts")
    torch.manual_seed(0)
    written = {}
    for name, (spec, normalization) in _starts(root).items():
        backbone = build_backbone(spec, drop_path_rate=0.0)
        assert normalization_of(backbone) == normalization, name  # recorded by build_backbone
        written[name] = export_backbone(backbone, root / "exports" / name, image_size=SIZE), normalization
    return written


def _is_timm_folder(folder: Path) -> bool:
    return "architecture" in json.loads((folder / "config.json").read_text())


def test_every_exports_processor_loads_gives_the_training_size_and_its_mean_and_std(exports):
    image = Image.new("RGB", (50, 40), (10, 20, 30))
    for name, (folder, normalization) in exports.items():
        processor = tf.AutoImageProcessor.from_pretrained(folder)
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        assert tuple(pixel_values.shape) == (1, 3, SIZE, SIZE), name
        if _is_timm_folder(folder):  # transformers' TimmWrapperImageProcessor reads timm's pretrained_cfg
            cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
            mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
            assert tuple(cfg["input_size"]) == (3, SIZE, SIZE), name
        else:
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        assert Normalization(mean, std) == normalization, name
        mean, std = torch.tensor(normalization.mean), torch.tensor(normalization.std)
        expected = (torch.tensor([10, 20, 30]) / 255 - mean) / std  # the image is uniform
        torch.testing.assert_close(pixel_values[0, :, 0, 0], expected, msg=name)


def test_a_recorded_normalisation_goes_into_each_kind_of_export(tmp_path):
    """The export carries what is recorded on the backbone (`normalization_of`), whatever the start said."""
    torch.manual_seed(0)
    for name, spec in (("dino", DinoConfig(**TINY_VIT)), ("timm", "timm:resnet10t")):
        backbone = set_normalization_(build_backbone(spec, drop_path_rate=0.0), CLIP)
        folder = export_backbone(backbone, tmp_path / name, image_size=SIZE)
        if name == "timm":
            cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
            assert Normalization(tuple(cfg["mean"]), tuple(cfg["std"])) == CLIP
        else:
            processor = tf.AutoImageProcessor.from_pretrained(folder)
            assert Normalization(tuple(processor.image_mean), tuple(processor.image_std)) == CLIP
    # The conversions of a DinoModel (its mask token dropped on the way) carry it too.
    model = set_normalization_(DinoModel(DinoConfig(**TINY_VIT, use_mask_token=True)), CLIP)
    save_as_vit(model, tmp_path / "vit")
    processor = tf.AutoImageProcessor.from_pretrained(tmp_path / "vit")
    assert Normalization(tuple(processor.image_mean), tuple(processor.image_std)) == CLIP
    save_as_timm(model, tmp_path / "timm_folder")
    cfg = json.loads((tmp_path / "timm_folder" / "config.json").read_text())["pretrained_cfg"]
    assert Normalization(tuple(cfg["mean"]), tuple(cfg["std"])) == CLIP


def test_a_processor_that_cannot_give_the_training_size_is_replaced_with_a_warning(monkeypatch, caplog):
    class Stuck(tf.ViTImageProcessor):
        """Ignores the size it is given, as a processor class of its own might."""

        def preprocess(self, images, **kwargs):
            return super().preprocess(images, **{**kwargs, "size": {"height": 7, "width": 7}})

    monkeypatch.setattr(export.AutoImageProcessor, "from_pretrained", lambda source: Stuck(**OWN_PROCESSOR))
    with caplog.at_level("WARNING", logger=export.__name__):
        processor = source_image_processor("some/start", SIZE, OWN)
    assert type(processor) is tf.BitImageProcessor
    assert (processor.crop_size.get("height"), tuple(processor.image_mean)) == (SIZE, OWN.mean)
    assert "gives (7, 7) at the training size 32 px" in caplog.text


# Run where dino_hf cannot be imported: per export, what AutoImageProcessor, the pipeline and timm's own
# loader make of it.
CHECK_WITHOUT_DINO_HF = textwrap.dedent(
    """
    import json, sys
    sys.modules["dino_hf"] = None  # any import of dino_hf now fails, installed or not
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    image = Image.new("RGB", (50, 40), (10, 20, 30))
    results = {}
    for name, (folder, size) in json.loads(sys.argv[1]).items():
        config = json.load(open(folder + "/config.json"))
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
        with torch.no_grad():
            at_size = extractor.model(pixel_values=torch.zeros(1, 3, size, size))[0]
        result = {
            "processor": list(processor(image, return_tensors="pt")["pixel_values"].shape),
            "pipeline": list(extractor(image, return_tensors=True).shape),
            "model_at_training_size": list(at_size.shape),
        }
        if "architecture" in config:
            import timm
            model = timm.create_model("local-dir:" + folder, pretrained=True)
            data_config = timm.data.resolve_data_config({}, model=model)
            transform = timm.data.create_transform(**data_config)
            result["timm"] = list(transform(image).shape)
            result["timm_mean_std"] = [list(data_config["mean"]), list(data_config["std"])]
        else:
            result["mean_std"] = [list(processor.image_mean), list(processor.image_std)]
        results[name] = result
    assert "dino_hf" not in sys.modules or sys.modules["dino_hf"] is None
    print(json.dumps(results))
    """
)


def check_without_dino_hf(exports: dict[str, tuple[Path, Normalization]], tmp_path: Path) -> None:
    """Every export, loaded in a process without dino_hf: the processor and timm's transform give
    SIZE x SIZE pixels with the export's mean and std, and the pipeline's features are those of the
    model at that size."""
    folders = {name: (str(folder), SIZE) for name, (folder, _) in exports.items()}
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", CHECK_WITHOUT_DINO_HF, json.dumps(folders)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for name, (folder, normalization) in exports.items():
        result = results[name]
        assert result["processor"] == [1, 3, SIZE, SIZE], name
        assert result["pipeline"] == result["model_at_training_size"], name
        if _is_timm_folder(folder):
            assert result["timm"] == [3, SIZE, SIZE], name
            mean, std = result["timm_mean_std"]
        else:
            mean, std = result["mean_std"]
        assert Normalization(tuple(mean), tuple(std)) == normalization, name


@pytest.mark.slow
def test_every_export_works_in_stock_transformers_and_timm_without_dino_hf(exports, tmp_path):
    check_without_dino_hf(exports, tmp_path)


@pytest.mark.slow
def test_a_runs_best_and_last_teacher_exports_work_without_dino_hf(data, labelled_images, tmp_path):
    """A run from a ViT whose processor says mean = std = 0.5 (Google's ViTs), with a k-NN at every step."""
    start = tmp_path / "google_style_vit"
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**VIT_SIZES, intermediate_size=64)).save_pretrained(start)
    tf.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(start)
    out = tmp_path / "out"
    result = train_in_process(
        train_dir=str(data / "images"),
        model_name_or_path=str(start),
        output_dir=str(out),
        eval_train_dir=str(labelled_images),
        eval_steps=1,
        max_train_steps=1,
    )
    assert result.best_export_dir == out / "teacher_backbone_best"
    half = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    runs_exports = {name: (out / name, half) for name in ("teacher_backbone_best", "teacher_backbone")}
    check_without_dino_hf(runs_exports, tmp_path)


@pytest.mark.parametrize("model_type", ["vit", "deit"])
@pytest.mark.parametrize("pooler", [True, False])
def test_a_vit_export_pools_to_the_feature_dino_hf_trained(tmp_path, model_type, pooler):
    """`pipeline(..., pool=True)` and `pooler_output` of an exported ViT / DeiT are its CLS token after the final
    LayerNorm (the feature the run trained), not the checkpoint's untrained dense + tanh pooler, nor the random
    one AutoModel gives a model saved without a pooler."""
    config_class, model_class = (tf.ViTConfig, tf.ViTModel) if model_type == "vit" else (tf.DeiTConfig, tf.DeiTModel)
    torch.manual_seed(0)
    model = model_class(config_class(**TINY_VIT), add_pooling_layer=pooler)
    model.save_pretrained(tmp_path / "start")
    backbone = build_backbone(str(tmp_path / "start"), drop_path_rate=0.0).eval()
    export_backbone(backbone, tmp_path / "export", image_size=32)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    extractor = tf.pipeline("image-feature-extraction", model=str(tmp_path / "export"))
    pooled = torch.tensor(extractor(image, pool=True))  # (1, D)
    pixels = tf.AutoImageProcessor.from_pretrained(tmp_path / "export")(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        trained = backbone(pixels)  # (1, D): the CLS token after the final LayerNorm
    torch.testing.assert_close(pooled.reshape(trained.shape), trained, rtol=1e-5, atol=1e-5)
