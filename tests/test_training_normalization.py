"""Training crops are normalised with the start's own mean and std (its image processor's), so that the
student at step 0 is the stock model on the stock processor's pixels."""

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from runs import train_in_process

from dino_hf.training import trainer

# No augmentation that changes colours: a crop of a one-colour image is that colour, normalised.
PLAIN = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=[0.0, 0.0, 0.0], solarize_p=0.0)


@pytest.fixture
def half_start(tmp_path):
    """A tiny ViTModel saved with a processor of mean = std = 0.5, and 8 images of one colour."""
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    tf.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path / "vit"
    )
    (tmp_path / "images").mkdir()
    for index in range(8):
        Image.fromarray(np.full((40, 40, 3), (200, 100, 50), dtype=np.uint8)).save(
            tmp_path / "images" / f"{index}.png"
        )
    return tmp_path


@pytest.mark.parametrize("distil", [False, True])
def test_the_step_receives_crops_in_the_starts_normalisation(half_start, monkeypatch, distil):
    received = []

    def recording_step(student, *args, **kwargs):
        if not received:
            crop = args[3][0]  # teacher, dino_loss, optimizer, crops
            with torch.no_grad():
                received.append((crop.clone(), student.backbone.eval()(crop).clone()))
            student.train()
        return real_step(student, *args, **kwargs)

    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", recording_step)
    options = {"distill_from": str(half_start / "vit"), "dino_loss_weight": 0} if distil else {}
    train_in_process(
        train_dir=str(half_start / "images"),
        model_name_or_path=str(half_start / "vit"),
        output_dir=str(half_start / "out"),
        max_train_steps=1,
        drop_path_rate=0.0,
        local_crops_number=0,
        samples_per_epoch=8,
        **PLAIN,
        **options,
    )
    crop, features = received[0]
    expected = (torch.tensor([200, 100, 50]) / 255 - 0.5) / 0.5
    torch.testing.assert_close(crop, expected.view(1, 3, 1, 1).expand_as(crop), rtol=0, atol=1e-5)
    # The student at step 0 is the stock model on the stock processor's pixels.
    processor = tf.AutoImageProcessor.from_pretrained(half_start / "vit")
    stock = tf.ViTModel.from_pretrained(half_start / "vit", add_pooling_layer=False).eval()
    image = Image.open(half_start / "images" / "0.png")
    with torch.no_grad():
        stock_feature = stock(**processor(image, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(features[:1], stock_feature, rtol=0, atol=1e-5)
    # The export's processor says the same.
    export = half_start / "out" / ("student_backbone" if distil else "teacher_backbone")
    exported = tf.AutoImageProcessor.from_pretrained(export)
    assert list(exported.image_mean) == [0.5] * 3 and list(exported.image_std) == [0.5] * 3
    assert "normalised with mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5)" in (export / "README.md").read_text()
