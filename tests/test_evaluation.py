import inspect
import io
import json
import math

import datasets
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import TINY_VIT
from torch import nn
from torchvision.transforms import InterpolationMode

from dino_hf import DinoConfig, DinoModel, dino_image_processor
from dino_hf.convert.export import save_as_timm, save_as_vit, to_timm_model
from dino_hf.evaluation.attention import MASK_THRESHOLD, attention_maps, attention_masks, save_attention_maps
from dino_hf.evaluation.feature_export import write_feature_dataset
from dino_hf.evaluation.feature_models import DinoFeatureModel, TimmFeatureModel, eval_transform, load_feature_model
from dino_hf.evaluation.features import ImageBatches, extract_features, find_label_column
from dino_hf.evaluation.knn import KNN_KS, KNN_TEMPERATURE, knn_evaluate, knn_votes, nearest_neighbours
from dino_hf.evaluation.linear_probe import (
    LinearProbe,
    cached_batches,
    evaluate_linear_probe,
    probe_feature_size,
    probe_features,
    train_linear_probe,
)

CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> DinoModel:
    torch.manual_seed(seed)
    config = DinoConfig(
        **TINY_VIT,
        drop_path_rate=0.0,
    )
    return DinoModel(config).eval()


def class_image(label: int, seed: int, size=(40, 36)) -> Image.Image:
    """An RGB image whose dominant colour encodes the label, with noise."""
    rng = np.random.default_rng(seed)
    base = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 31 + 160) % 256], dtype=np.float32)
    pixels = base + rng.normal(0, 20, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# k-NN


def brute_force_knn(train, train_labels, test, test_labels, num_classes, k, temperature):
    """The reference's weighted k-NN, one query and one neighbour at a time; ties go to the lower class."""
    train = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in train.tolist()]
    scores_all, top1, top5 = [], 0, 0
    for query, target in zip(test.tolist(), test_labels.tolist()):
        norm = math.sqrt(sum(v * v for v in query))
        sims = [sum(a * b / norm for a, b in zip(query, row)) for row in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        scores = [0.0] * num_classes
        for j in nearest:
            scores[int(train_labels[j])] += math.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1 += ranking[0] == target
        top5 += target in ranking[: min(5, k, num_classes)]
        scores_all.append(scores)
    return torch.tensor(scores_all, dtype=torch.float64), 100 * top1 / len(test), 100 * top5 / len(test)


def test_knn_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=generator), torch.randn(25, 8, generator=generator)
    train_labels = torch.randint(0, 7, (60,), generator=generator)
    test_labels = torch.randint(0, 7, (25,), generator=generator)
    metrics = knn_evaluate(
        train,
        train_labels,
        test,
        test_labels,
        num_classes=7,
        ks=(1, 3, 10, 20),
        temperature=0.07,
        chunk_size=7,
        device=CPU,
    )
    for k in (1, 3, 10, 20):
        expected_scores, top1, top5 = brute_force_knn(train, train_labels, test, test_labels, 7, k, 0.07)
        assert metrics[f"knn_top1@{k}"] == pytest.approx(top1)
        assert metrics[f"knn_top5@{k}"] == pytest.approx(top5)
        chunks = nearest_neighbours(train, train_labels, test, k, chunk_size=4, device=CPU)
        scores = torch.cat([knn_votes(similarity, labels, k, 7, 0.07) for similarity, labels in chunks])
        torch.testing.assert_close(scores.double(), expected_scores, rtol=1e-4, atol=1e-6)


def test_knn_features_that_encode_the_label_give_100_percent():
    generator = torch.Generator().manual_seed(1)
    train_labels, test_labels = torch.randint(0, 10, (200,), generator=generator), torch.arange(10).repeat(5)
    encode = lambda labels: F.one_hot(labels, 10).float() * 3 + 0.3 * torch.randn(len(labels), 10, generator=generator)  # noqa: E731
    metrics = knn_evaluate(
        encode(train_labels), train_labels, encode(test_labels), test_labels, ks=(10, 20), device=CPU
    )
    assert metrics == {"knn_top1@10": 100.0, "knn_top5@10": 100.0, "knn_top1@20": 100.0, "knn_top5@20": 100.0}


def test_knn_random_features_stay_near_chance():
    generator = torch.Generator().manual_seed(2)
    train, test = torch.randn(2000, 32, generator=generator), torch.randn(1000, 32, generator=generator)
    train_labels, test_labels = (
        torch.randint(0, 10, (2000,), generator=generator),
        torch.randint(0, 10, (1000,), generator=generator),
    )
    metrics = knn_evaluate(train, train_labels, test, test_labels, num_classes=10, ks=(20,), device=CPU)
    # chance is 10 % / 50 %; the standard error over 1000 queries is about 1 % / 1.6 %
    assert 5 < metrics["knn_top1@20"] < 15
    assert 42 < metrics["knn_top5@20"] < 58


def test_knn_refuses_more_neighbours_than_train_features():
    with pytest.raises(ValueError, match="k=20 is larger than the 5 train features"):
        knn_evaluate(
            torch.randn(5, 4),
            torch.zeros(5, dtype=torch.long),
            torch.randn(2, 4),
            torch.zeros(2, dtype=torch.long),
            2,
            ks=(20,),
            device=CPU,
        )


# ---------------------------------------------------------------------------------------------------
# Linear probe


def test_linear_probe_init_is_the_reference_one():
    torch.manual_seed(0)
    probe = LinearProbe(384 * 4, 1000)
    assert probe.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert probe.linear.weight.mean().abs().item() < 1e-4
    assert torch.count_nonzero(probe.linear.bias) == 0


def test_train_linear_probe_follows_sgd_momentum_cosine():
    """Parity with a hand-written loop: lr = base * batch / 256, cosine per epoch, momentum 0.9, wd 0."""
    generator = torch.Generator().manual_seed(3)
    features, labels = torch.randn(12, 6, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    epochs, base_lr, batch = 4, 0.5, 4
    torch.manual_seed(0)
    probe = train_linear_probe(
        cached_batches(features, labels, batch, shuffle=False),
        6,
        3,
        epochs=epochs,
        lr=base_lr,
        batch_size=batch,
        device=CPU,
    )
    torch.manual_seed(0)
    expected = LinearProbe(6, 3)
    params = [expected.linear.weight, expected.linear.bias]
    velocity = [torch.zeros_like(p) for p in params]
    for epoch in range(epochs):
        lr = base_lr * batch / 256 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for start in range(0, 12, batch):
            loss = F.cross_entropy(expected(features[start : start + batch]), labels[start : start + batch])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, v, g in zip(params, velocity, grads):
                    v.mul_(0.9).add_(g)
                    p.sub_(lr * v)
    torch.testing.assert_close(probe.linear.weight, expected.linear.weight)
    torch.testing.assert_close(probe.linear.bias, expected.linear.bias)


def test_linear_probe_learns_a_separable_problem():
    generator = torch.Generator().manual_seed(4)
    centres = 4 * torch.randn(5, 16, generator=generator)
    labels = torch.randint(0, 5, (400,), generator=generator)
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    train = cached_batches(features[:300], labels[:300], 32, seed=0)
    torch.manual_seed(0)
    probe = train_linear_probe(train, 16, 5, epochs=20, lr=2.0, batch_size=32, device=CPU)
    metrics = evaluate_linear_probe(
        probe, cached_batches(features[300:], labels[300:], 50, shuffle=False)(0), device=CPU
    )
    assert metrics["top1"] == 100.0 and metrics["top5"] == 100.0
    untrained = evaluate_linear_probe(
        LinearProbe(16, 5), cached_batches(features[300:], labels[300:], 50, shuffle=False)(0), device=CPU
    )
    assert untrained["top1"] < 60


def test_probe_features_are_the_reference_layouts():
    model = DinoFeatureModel(tiny_model())
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = model.model(pixel_values, output_hidden_states=True).hidden_states  # embeddings + 2 blocks
        normed = [model.model.layernorm(h) for h in hidden[-2:]]
        four = probe_features(model, pixel_values, n_last_blocks=2)
        pooled = probe_features(model, pixel_values, n_last_blocks=1, avgpool_patchtokens=True)
    torch.testing.assert_close(four, torch.cat([normed[0][:, 0], normed[1][:, 0]], dim=-1))
    assert probe_feature_size(model, 2) == four.shape[1] == 64
    # the reference interleaves CLS and mean patch token: [cls_0, mean_0, cls_1, mean_1, ...]
    torch.testing.assert_close(pooled[:, 0::2], normed[1][:, 0])
    torch.testing.assert_close(pooled[:, 1::2], normed[1][:, 1:].mean(dim=1))
    assert probe_feature_size(model, 1, True) == pooled.shape[1] == 64
    with pytest.raises(ValueError, match="n_last_blocks=1"):
        probe_features(model, pixel_values, n_last_blocks=2, avgpool_patchtokens=True)


# ---------------------------------------------------------------------------------------------------
# Attention maps


def test_attention_maps_are_the_last_block_cls_row():
    model = DinoFeatureModel(tiny_model())
    pixel_values = torch.randn(2, 3, 32, 48)  # non-square: a 4 x 6 patch grid
    maps = attention_maps(model, pixel_values)
    assert maps.shape == (2, 2, 4, 6)
    with torch.no_grad():
        last = model.model(pixel_values, output_attentions=True).attentions[-1]  # (B, heads, 25, 25)
    torch.testing.assert_close(maps.flatten(2), last[:, :, 0, 1:])
    assert torch.all(maps.flatten(2).sum(-1) < 1)  # the CLS token's attention to itself is left out


def test_attention_masks_keep_the_given_mass():
    attention = torch.tensor([[0.5, 0.1], [0.3, 0.1]])
    # ascending 0.1, 0.1, 0.3, 0.5 -> cumulative 0.1, 0.2, 0.5, 1.0 > 0.4 keeps 0.3 and 0.5
    assert attention_masks(attention, 0.6).tolist() == [[True, False], [True, False]]
    maps = torch.rand(3, 5, 7, 7)
    masks = attention_masks(maps, 0.6)
    for attention, mask in zip(maps.flatten(0, 1), masks.flatten(0, 1)):
        kept = attention[mask]
        total = attention.sum()
        assert kept.sum() / total >= 0.6 - 1e-6  # the kept patches hold 60 % of the mass...
        assert kept.min() >= attention[~mask].max()  # ...they are the largest ones...
        assert (kept.sum() - kept.min()) / total < 0.6 + 1e-6  # ...and none of them is superfluous
    with pytest.raises(ValueError, match="threshold"):
        attention_masks(maps, 1.5)


def test_save_attention_maps_writes_pngs_at_the_image_size(tmp_path):
    image = class_image(3, 0, size=(45, 37))
    written = save_attention_maps(DinoFeatureModel(tiny_model()), image, tmp_path, image_size=32, device=CPU)
    assert sorted(path.name for path in written) == [
        "attn-head0.png",
        "attn-head1.png",
        "mask-head0.png",
        "mask-head1.png",
    ]
    for path in written:
        with Image.open(path) as decoded:
            decoded.load()
            assert decoded.size == (45, 37)
    with Image.open(tmp_path / "mask-head0.png") as mask:
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


# ---------------------------------------------------------------------------------------------------
# Loading models


def test_timm_feature_model_matches_dino_feature_model():
    dino = DinoFeatureModel(tiny_model())
    timm_model = TimmFeatureModel(to_timm_model(dino.model))
    fused = timm_model.model.blocks[-1].attn.fused_attn
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(pixel_values), dino(pixel_values), atol=1e-5, rtol=1e-4)
        for ours, theirs in zip(timm_model.last_blocks(pixel_values, 2), dino.last_blocks(pixel_values, 2)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        attention_maps(timm_model, pixel_values), attention_maps(dino, pixel_values), atol=1e-5, rtol=1e-4
    )
    assert timm_model.model.blocks[-1].attn.fused_attn == fused  # the fused kernel is switched back on
    assert probe_feature_size(timm_model, 4) == 128


def test_load_feature_model_reads_every_format(tmp_path):
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).pooler_output
    model.save_pretrained(tmp_path / "dino")
    save_as_vit(model, tmp_path / "vit")
    save_as_timm(model, tmp_path / "timm")
    tiny_model(seed=1).save_pretrained(tmp_path / "run" / "checkpoint-2" / "teacher_backbone")
    model.save_pretrained(tmp_path / "run" / "checkpoint-10" / "teacher_backbone")
    for spec, kind in [
        ("dino", DinoFeatureModel),
        ("vit", DinoFeatureModel),
        ("timm", TimmFeatureModel),
        ("run/checkpoint-2", DinoFeatureModel),
        ("run", DinoFeatureModel),
    ]:
        loaded, transform = load_feature_model(tmp_path / spec)
        assert isinstance(loaded, kind), spec
        assert not loaded.model.training and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            features = loaded(pixel_values)
        if spec == "run/checkpoint-2":
            assert not torch.allclose(features, expected, atol=1e-3)
        else:
            torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
        assert transform(class_image(0, 0)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="no config.json"):
        load_feature_model(tmp_path)


def test_eval_transform_matches_dino_image_processor():
    image = class_image(5, 1, size=(60, 44))
    ours = eval_transform(32)(image)
    processor = dino_image_processor(32)(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == processor.shape == (3, 32, 32)
    torch.testing.assert_close(ours, processor, atol=0.05, rtol=0)
    resize, crop = eval_transform(224).transforms[:2]
    assert resize.size == 256 and crop.size == (
        224,
        224,
    )  # resize 256 bicubic, crop 224 (docs/evaluation.md#evaluation-transform)
    assert resize.interpolation == InterpolationMode.BICUBIC


def test_protocol_defaults_are_the_papers():
    assert KNN_KS == (10, 20, 100, 200) and KNN_TEMPERATURE == 0.07 and MASK_THRESHOLD == 0.6
    defaults = {name: p.default for name, p in inspect.signature(train_linear_probe).parameters.items()}
    assert (defaults["epochs"], defaults["lr"], defaults["batch_size"]) == (100, 0.001, 128)
    defaults = {name: p.default for name, p in inspect.signature(probe_features).parameters.items()}
    assert (defaults["n_last_blocks"], defaults["avgpool_patchtokens"]) == (4, False)  # ViT-S setting


# ---------------------------------------------------------------------------------------------------
# Data and feature extraction


def labelled_rows(count: int, num_classes: int = 3) -> list[dict]:
    return [
        {"image": {"bytes": png_bytes(class_image(i % num_classes, i)), "path": None}, "label": i % num_classes}
        for i in range(count)
    ]


def test_extract_features_batches_and_skips_unreadable_images():
    model = DinoFeatureModel(tiny_model())
    rows = labelled_rows(7)
    rows.insert(3, {"image": {"bytes": b"not an image", "path": None}, "label": 1})
    batches = ImageBatches(rows, "image", eval_transform(32), batch_size=3, label_column="label")
    features, labels = extract_features(model, batches, device=CPU)
    assert batches.skipped == 1
    assert features.shape == (7, 32) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    single = eval_transform(32)(Image.open(io.BytesIO(rows[0]["image"]["bytes"])))
    with torch.no_grad():
        torch.testing.assert_close(features[0], model(single[None])[0], atol=1e-5, rtol=1e-4)


def test_image_batches_map_string_labels_consistently():
    rows = [{"image": row["image"], "label": ["cat", "dog"][row["label"]]} for row in labelled_rows(4, num_classes=2)]
    label_ids = {}
    first = next(iter(ImageBatches(rows, "image", eval_transform(32), 4, "label", label_ids=label_ids)))[1]
    second = next(iter(ImageBatches(rows[::-1], "image", eval_transform(32), 4, "label", label_ids=label_ids)))[1]
    assert first.tolist() == [0, 1, 0, 1] and second.tolist() == [1, 0, 1, 0] and label_ids == {"cat": 0, "dog": 1}


def test_knn_on_generated_images_is_perfect():
    """Colour-coded classes are separable by the raw features of even a random ViT."""
    model = DinoFeatureModel(tiny_model())
    train = ImageBatches(labelled_rows(30), "image", eval_transform(32), 8, "label")
    test = ImageBatches(labelled_rows(9)[::-1], "image", eval_transform(32), 8, "label")
    metrics = knn_evaluate(
        *extract_features(model, train, CPU), *extract_features(model, test, CPU), ks=(5,), device=CPU
    )
    assert metrics["knn_top1@5"] == 100.0


def test_find_label_column():
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    dataset = datasets.Dataset.from_dict({"img": [], "y": []}, features=features)
    assert find_label_column(dataset) == "y"
    plain = datasets.Dataset.from_dict({"image": ["x"], "labels": [1]})
    assert find_label_column(plain) == "labels"
    with pytest.raises(ValueError, match="not found"):
        find_label_column(plain, "label")


def test_write_feature_dataset_keeps_columns_and_loads_back(tmp_path):
    model = DinoFeatureModel(tiny_model())
    rows = labelled_rows(7)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "name": datasets.Value("string"),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {
            "image": [row["image"] for row in rows],
            "label": [row["label"] for row in rows],
            "name": [f"img{i}" for i in range(7)],
        },
        features=features,
    )
    counts = write_feature_dataset(
        model,
        dataset.to_iterable_dataset(num_shards=2),
        "image",
        tmp_path / "out",
        eval_transform(32),
        batch_size=2,
        rows_per_shard=3,
        patch_tokens=True,
        device=CPU,
    )
    assert counts == {"rows": 7, "skipped": 0, "shards": 3}
    loaded = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(loaded.column_names) == {
        "image",
        "label",
        "name",
        "cls_features",
        "mean_patch_features",
        "patch_features",
    }
    assert loaded.features["label"] == features["label"]
    by_name = {row["name"]: row for row in loaded}
    assert sorted(by_name) == [f"img{i}" for i in range(7)]
    row = by_name["img4"]
    assert row["image"].size == (40, 36) and row["label"] == 1
    assert len(row["cls_features"]) == len(row["mean_patch_features"]) == 32
    assert np.asarray(row["patch_features"]).shape == (16, 32)
    with torch.no_grad():
        tokens = model.model(eval_transform(32)(dataset[4]["image"])[None]).last_hidden_state[0]
    np.testing.assert_allclose(row["cls_features"], tokens[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(row["mean_patch_features"], tokens[1:].mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(row["patch_features"], tokens[1:].numpy(), atol=1e-5)


def test_load_feature_model_leaves_a_given_instance_trainable():
    model = tiny_model().train()
    loaded, transform = load_feature_model(model, image_size=16)
    assert loaded.model is model and not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert transform(class_image(0, 0)).shape == (3, 16, 16)


def test_timm_cnn_folder_gives_its_pooled_feature(tmp_path):
    from dino_hf.convert.export import export_backbone
    from dino_hf.models.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("timm:resnet10t", drop_path_rate=0.0).eval()
    export_backbone(backbone, tmp_path / "cnn", image_size=32)
    loaded, transform = load_feature_model(tmp_path / "cnn")
    assert isinstance(loaded, TimmFeatureModel) and not loaded.has_tokens
    pixel_values = transform(class_image(1, 0))[None]
    with torch.no_grad():
        expected = backbone(pixel_values)
        torch.testing.assert_close(loaded(pixel_values), expected, atol=1e-5, rtol=1e-4)
        # the reference's linear probe takes a CNN's pooled feature whatever n_last_blocks says
        torch.testing.assert_close(
            probe_features(loaded, pixel_values, n_last_blocks=4), expected, atol=1e-5, rtol=1e-4
        )
    assert probe_feature_size(loaded, 4) == loaded.num_features == expected.shape[1]
    with pytest.raises(ValueError, match="needs a ViT"):
        attention_maps(loaded, pixel_values)


def test_load_feature_model_names_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a Hub id"):
        load_feature_model(tmp_path / "missing")


def test_the_default_evaluation_size_is_the_models_own(tmp_path):
    """Image processor crop, then the checkpoint's training resolution, then timm's pretrained_cfg,
    then a DinoModel's config; 224 when nothing names a size."""
    from dino_hf.evaluation.feature_models import native_image_size

    model = tiny_model()
    folder = tmp_path / "checkpoint-5" / "teacher_backbone"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").unlink()  # saved at the config's size; replaced below
    (tmp_path / "checkpoint-5" / "training_args.json").write_text(json.dumps({"global_crops_size": 48}))
    assert native_image_size(model, folder) == (48, "the training resolution of its checkpoint")
    (folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 40, "width": 40}}))
    assert native_image_size(model, folder) == (40, "the crop size of its image processor")
    loaded, transform = load_feature_model(tmp_path / "checkpoint-5")
    assert (loaded.image_size, transform(class_image(0, 0)).shape) == (40, (3, 40, 40))
    assert native_image_size(model) == (model.config.image_size, "its config")
    cnn = timm.create_model("resnet10t", num_classes=0, pretrained_cfg_overlay={"input_size": (3, 56, 56)})
    assert native_image_size(cnn) == (56, "timm's pretrained_cfg")
    assert native_image_size(nn.Linear(2, 2)) == (224, "the default: the model names no size")


def test_write_feature_dataset_of_a_cnn_writes_its_pooled_feature(tmp_path):
    torch.manual_seed(0)
    model = TimmFeatureModel(timm.create_model("resnet10t", num_classes=0))
    rows = labelled_rows(5)
    dataset = datasets.Dataset.from_dict(
        {"image": [row["image"] for row in rows], "label": [row["label"] for row in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    counts = write_feature_dataset(
        model, dataset, "image", tmp_path / "out", eval_transform(32), batch_size=2, device=CPU
    )
    assert counts == {"rows": 5, "skipped": 0, "shards": 1}
    loaded = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(loaded.column_names) == {"image", "label", "pooled_features"}
    with torch.no_grad():
        expected = model(eval_transform(32)(loaded[3]["image"])[None])[0]
    np.testing.assert_allclose(loaded[3]["pooled_features"], expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="patch tokens need a ViT"):
        write_feature_dataset(model, dataset, "image", tmp_path / "out2", eval_transform(32), patch_tokens=True)
