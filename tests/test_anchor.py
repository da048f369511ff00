"""Anchoring to the start (dino_hf/objectives/anchor.py): DINOv3's Gram loss and the cosine term against
formulas written out here, the frozen anchor in the training step, the backbones' patch tokens, and the
anchor's weights through a checkpoint and a resume of scripts/pretrain.py."""

import copy
import logging
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain_script import arguments, python
from tiny import TINY_VIT

from dino_hf import DinoConfig, DinoModel
from dino_hf.models.backbones import build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.anchor import SNAPSHOT_STEP, Anchor, AnchorTerm, anchor_cosine_loss, gram_loss, gram_weight_at
from dino_hf.objectives.dino import DinoLoss
from dino_hf.run_files import checkpoints
from dino_hf.training import trainer
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.objectives import build_anchor
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.run_log import log_line
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

K, B, NCROPS = 64, 2, 4
STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)


# ---- the terms, against formulas written out here -------------------------------------------------


def gram_by_hand(student: torch.Tensor, anchor: torch.Tensor, remove_neg: bool = False) -> float:
    """Image-level Gram loss with explicit loops: per crop, normalise each patch token, G[p, q] the dot
    product of patches p and q, mean of the squared differences over the P x P entries; mean over crops."""
    student, anchor = student.double(), anchor.double()
    losses = []
    for crop in range(len(student)):
        grams = []
        for tokens in (student[crop], anchor[crop]):
            x = tokens / tokens.norm(dim=-1, keepdim=True)  # (P, C)
            gram = torch.einsum("pc,qc->pq", x, x)  # (P, P)
            grams.append(gram.clamp(min=0) if remove_neg else gram)
        patches = len(student[crop])
        total = sum((grams[0][p, q] - grams[1][p, q]) ** 2 for p in range(patches) for q in range(patches))
        losses.append(float(total) / patches**2)
    return sum(losses) / len(losses)


def test_gram_loss_of_a_2x2_example():
    # Student patches at right angles (G_S = I); the anchor's at 45 degrees: off-diagonal 1/sqrt(2), so
    # two of four entries differ by 1/sqrt(2): mean squared difference (1/2 + 1/2) / 4.
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    anchor = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])  # norms do not matter
    assert gram_loss(student, anchor).item() == pytest.approx(0.25, rel=1e-6)
    # At 135 degrees the off-diagonal is -1/sqrt(2): the same loss, and 0 once negatives are removed.
    obtuse = torch.tensor([[[1.0, 0.0], [-1.0, 1.0]]])
    assert gram_loss(student, obtuse).item() == pytest.approx(0.25, rel=1e-6)
    assert gram_loss(student, obtuse, remove_neg=True).item() == pytest.approx(0.0, abs=1e-7)
    # Opposite student patches (off-diagonal -1) against orthogonal ones: (1 + 1) / 4, or 0 without negatives.
    opposite = torch.tensor([[[1.0, 0.0], [-3.0, 0.0]]])
    assert gram_loss(opposite, student).item() == pytest.approx(0.5, rel=1e-6)
    assert gram_loss(opposite, student, remove_neg=True).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_equals_the_loops(remove_neg):
    torch.manual_seed(0)
    student, anchor = torch.randn(3, 5, 4), torch.randn(3, 5, 6)  # the Gram matrices are P x P whatever C
    assert gram_loss(student, anchor, remove_neg).item() == pytest.approx(
        gram_by_hand(student, anchor, remove_neg), rel=1e-5
    )
    if remove_neg:  # random tokens have negative similarities: removing them changes the value
        assert gram_loss(student, anchor).item() != pytest.approx(gram_loss(student, anchor, True).item())


def test_gram_loss_is_averaged_over_images_not_over_the_batch():
    torch.manual_seed(1)
    student, anchor = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    per_crop = [gram_loss(student[i : i + 1], anchor[i : i + 1]).item() for i in range(2)]
    assert gram_loss(student, anchor).item() == pytest.approx(sum(per_crop) / 2, rel=1e-6)
    # The reference's img_level=False: all 8 patches of the batch in one 8 x 8 matrix; another number.
    batch_level = gram_by_hand(student.reshape(1, 8, 8), anchor.reshape(1, 8, 8))
    assert gram_loss(student, anchor).item() != pytest.approx(batch_level, rel=1e-3)


def test_the_terms_are_computed_in_float32():
    torch.manual_seed(2)
    student, anchor = torch.randn(2, 4, 8).bfloat16(), torch.randn(2, 4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = gram_loss(student, anchor)
        cosine = anchor_cosine_loss(student[:, 0], anchor[:, 0])
    assert gram.dtype == cosine.dtype == torch.float32
    assert gram.item() == pytest.approx(gram_by_hand(student.float(), anchor.float()), rel=1e-5)


def test_the_cosine_term_by_hand():
    torch.manual_seed(3)
    student, anchor = torch.randn(4, 6), torch.randn(4, 6)
    cosines = [float(student[i] @ anchor[i] / (student[i].norm() * anchor[i].norm())) for i in range(4)]
    assert anchor_cosine_loss(student, anchor).item() == pytest.approx(1 - sum(cosines) / 4, rel=1e-6)
    assert anchor_cosine_loss(student, 3 * student).item() == pytest.approx(0.0, abs=1e-6)
    assert anchor_cosine_loss(student, -student).item() == pytest.approx(2.0, rel=1e-6)


def test_mismatched_tokens_are_refused():
    with pytest.raises(ValueError, match="same N crops and P patches"):
        gram_loss(torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="same crops"):
        anchor_cosine_loss(torch.randn(2, 8), torch.randn(3, 8))


def test_the_gram_weight_ramps_linearly_from_zero():
    assert [gram_weight_at(step, 4, 2.0) for step in range(7)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert gram_weight_at(0, 0, 2.0) == 2.0
    # From the first snapshot of an EMA Gram teacher: 0 before it, the ramp from it.
    assert [gram_weight_at(step, 2, 2.0, start_step=3) for step in range(7)] == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    assert gram_weight_at(2, 0, 2.0, start_step=3) == 0.0 and gram_weight_at(3, 0, 2.0, start_step=3) == 2.0


def plan(tmp_path, **options) -> TrainingPlan:
    args = DinoTrainingArguments(train_dir=str(tmp_path), per_device_train_batch_size=B, **options)
    return TrainingPlan.from_args(args, samples_per_epoch=100, num_processes=1, fresh_head=False)


def test_the_plan_gives_the_weights_to_the_step(tmp_path):
    on = plan(tmp_path, gram_loss_weight=2.0, gram_warmup_steps=10, anchor_cosine_weight=0.5)
    assert [on.term_weights(step)["gram"] for step in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    assert on.term_weights(3)["anchor_cos"] == 0.5
    off = plan(tmp_path)
    assert off.term_weights(0)["gram"] == 0.0 and off.term_weights(0)["anchor_cos"] == 0.0


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(gram_loss_weight=-1.0), "--gram_loss_weight"),
        (dict(gram_warmup_steps=-1), "--gram_warmup_steps"),
        (dict(anchor_cosine_weight=-0.1), "--anchor_cosine_weight"),
    ],
)
def test_wrong_anchor_settings_are_refused(tmp_path, options, error):
    with pytest.raises(ValueError, match=error):
        DinoTrainingArguments(train_dir=str(tmp_path), **options)


# ---- the backbones' patch tokens ------------------------------------------------------------------


def test_dino_model_tokens_come_from_the_forward():
    backbone = build_backbone(DinoConfig(**TINY_VIT), drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 16)
    features, patch_tokens = backbone.forward_tokens(x)
    assert torch.equal(features, backbone(x))
    assert patch_tokens.shape == (2, 4 * 2, 32)
    assert torch.equal(patch_tokens, backbone.model(x).last_hidden_state[:, 1:])  # after the final norm


@pytest.mark.parametrize("name", ["test_vit", "test_vit2", "test_vit3"])  # CLS; + a register; + map pooling
def test_timm_vit_tokens_drop_the_prefix_tokens(name):
    backbone = build_backbone(f"timm:{name}", image_size=64).eval()
    model = backbone.model
    x = torch.randn(2, 3, 64, 64)
    features, patch_tokens = backbone.forward_tokens(x)
    assert torch.equal(features, backbone(x))
    assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    grid = 64 // model.patch_embed.patch_size[0]
    assert patch_tokens.shape == (2, grid * grid, model.embed_dim)
    assert torch.equal(patch_tokens, model.forward_features(x)[:, model.num_prefix_tokens :])


@pytest.mark.parametrize("name", ["test_resnet", "mobilenetv3_small_050", "test_mambaout"])  # NCHW, pre-logits, NHWC
def test_timm_cnn_tokens_are_the_final_feature_map(name):
    backbone = build_backbone(f"timm:{name}").eval()
    x = torch.randn(2, 3, 64, 96)
    features, patch_tokens = backbone.forward_tokens(x)
    assert torch.equal(features, backbone(x))
    feature_map = backbone.model.forward_features(x)
    if getattr(backbone.model, "output_fmt", "NCHW") == "NHWC":
        feature_map = feature_map.permute(0, 3, 1, 2)
    _, channels, h, w = feature_map.shape
    assert (h, w) == (2, 3) and patch_tokens.shape == (2, h * w, channels)
    for i, j in [(0, 0), (0, 2), (1, 1)]:  # row-major: patch i * w + j
        assert torch.equal(patch_tokens[:, i * w + j], feature_map[:, :, i, j])


def setup(batch=B):
    """A tiny timm ViT student (no stochastic depth), a teacher that differs from it, fixed crops."""
    torch.manual_seed(0)
    backbone = build_backbone(
        "timm:test_vit", drop_path_rate=0.0, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    student = MultiCropWrapper(backbone, DinoHead(32, out_dim=K, hidden_dim=48, bottleneck_dim=16))
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dino_loss = DinoLoss(K, NCROPS)
    crops = [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    return student, teacher, dino_loss, crops


def test_the_wrapper_returns_the_global_patch_tokens_from_the_same_backbone_calls():
    student, _, _, crops = setup()
    calls = []  # images per call of the patch embedding: one call per backbone forward
    student.backbone.model.patch_embed.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    plain_logits, plain_features = student(crops, return_features=True)
    assert calls == [2 * B, 2 * B]  # one backbone call per resolution
    calls.clear()
    logits, features, patch_tokens = student(crops, return_features=True, return_patch_tokens=True)
    assert calls == [2 * B, 2 * B]  # the same calls: the global crops' tokens come with their features
    assert torch.equal(logits, plain_logits) and torch.equal(features, plain_features)
    assert patch_tokens.shape == (2 * B, 16, 32)  # the 2 global crops of 4 x 4 patches
    _, expected = student.backbone.forward_tokens(torch.cat(crops[:2]))
    assert torch.equal(patch_tokens, expected)
    logits_only, tokens_only = student(crops, return_patch_tokens=True)
    assert torch.equal(logits_only, plain_logits) and torch.equal(tokens_only, patch_tokens)


# ---- the anchor in the step -------------------------------------------------------------------------


def test_the_anchor_is_a_frozen_copy_in_eval_mode():
    student, _, _, _ = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False)
    assert all(not p.requires_grad for p in anchor.parameters())
    assert all(p.requires_grad for p in student.backbone.parameters())
    assert not anchor.train().training and not any(m.training for m in anchor.modules())
    for p, q in zip(anchor.backbone.parameters(), student.backbone.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with pytest.raises(ValueError, match="gram or cosine"):
        Anchor(student.backbone, gram=False, cosine=False)


def move(module: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_steps_with_the_anchor_report_its_terms_and_leave_it_at_the_start():
    student, teacher, dino_loss, crops = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=True)
    start = copy.deepcopy(anchor.state_dict())
    optimizer = build_optimizer("adamw", get_param_groups(student))
    terms = [AnchorTerm(anchor, gram_weight=1.0, cosine_weight=0.5)]
    for _ in range(3):
        student_before = copy.deepcopy(student.backbone)
        stats = train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=terms)
    # The terms of the last step, from the student as it was before it (no stochastic depth: the same forward).
    global_crops = torch.cat(crops[:2])
    with torch.no_grad():
        features, patch_tokens = student_before.forward_tokens(global_crops)
        anchor_features, anchor_patch_tokens = anchor.backbone.forward_tokens(global_crops)
    assert stats["gram"].item() == pytest.approx(gram_by_hand(patch_tokens, anchor_patch_tokens), rel=1e-5)
    assert stats["anchor_cos"].item() == pytest.approx(anchor_cosine_loss(features, anchor_features).item(), rel=1e-5)
    assert stats["gram"].item() > 0 and stats["nonfinite"].item() == 0.0
    assert all(p.grad is None for p in anchor.parameters())
    for name, value in anchor.state_dict().items():
        assert torch.equal(value, start[name]), name
    moved = [not torch.equal(p, start[f"backbone.{n}"]) for n, p in student.backbone.named_parameters()]
    assert sum(moved) > len(moved) / 2
    line = log_line(3, {"epoch": 0.0, **{key: value.item() for key, value in stats.items()}})
    assert f"gram={stats['gram'].item():.4g}" in line and "anchor_cos=" in line


def test_the_gram_term_trains_the_backbone_and_not_the_head():
    student, teacher, dino_loss, crops = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False)
    move(student.backbone)  # at the start the Gram loss is at its minimum, with no gradient
    _, patch_tokens = student(crops, return_patch_tokens=True)
    _, anchor_patch_tokens = anchor(torch.cat(crops[:2]))
    grads = torch.autograd.grad(gram_loss(patch_tokens, anchor_patch_tokens), list(student.backbone.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0

    zero = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    zero_anchor = copy.deepcopy(anchor)
    optimizer = build_optimizer("sgd", get_param_groups(student))
    train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[AnchorTerm(anchor, 1.0)])
    optimizer = build_optimizer("sgd", get_param_groups(zero[0]))
    train_step(*zero, optimizer, crops, StepValues(**STEP), terms=[AnchorTerm(zero_anchor, 0.0)])
    assert any(not torch.equal(p, q) for p, q in zip(student.backbone.parameters(), zero[0].backbone.parameters()))
    for p, q in zip(student.head.parameters(), zero[0].head.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_with_both_weights_zero_the_step_is_the_plain_step(tmp_path):
    student, teacher, dino_loss, crops = setup()
    assert build_anchor(plan(tmp_path).args, student.backbone) is None  # what a run with the defaults passes
    plain = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[])
    plain_stats = train_step(*plain, build_optimizer("adamw", get_param_groups(plain[0])), crops, StepValues(**STEP))
    assert stats.keys() == plain_stats.keys()
    assert all(torch.equal(stats[key], plain_stats[key]) for key in stats)
    for module, plain_module in zip((student, teacher, dino_loss), plain):
        for (key, value), plain_value in zip(module.state_dict().items(), plain_module.state_dict().values()):
            assert torch.equal(value, plain_value), key


def test_at_the_start_of_the_warm_up_the_term_is_reported_and_changes_nothing():
    student, teacher, dino_loss, crops = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False)
    move(student.backbone)  # away from the anchor: a Gram loss above 0, with a gradient
    plain = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(
        student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[AnchorTerm(anchor, 0.0)]
    )
    plain_stats = train_step(*plain, build_optimizer("adamw", get_param_groups(plain[0])), crops, StepValues(**STEP))
    assert stats["gram"].item() > 0 and "anchor_cos" not in stats
    assert torch.equal(stats["loss"], plain_stats["loss"])
    for p, q in zip(student.parameters(), plain[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_weight_without_its_term_is_refused():
    student, teacher, dino_loss, crops = setup()
    optimizer = build_optimizer("adamw", get_param_groups(student))
    cosine_only = Anchor(student.backbone, gram=False, cosine=True)
    with pytest.raises(ValueError, match="the gram weight 1.0 needs an anchor built with that term"):
        train_step(
            student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[AnchorTerm(cosine_only, 1.0)]
        )
    gram_only = Anchor(student.backbone, gram=True, cosine=False)
    with pytest.raises(ValueError, match="the anchor_cos weight 0.5 needs an anchor"):
        AnchorTerm(gram_only, 1.0, cosine_weight=0.5)


@pytest.mark.parametrize("term", ["gram", "anchor_cos"])
def test_a_non_finite_anchor_term_skips_the_step(term):
    student, teacher, dino_loss, crops = setup()
    anchor = Anchor(student.backbone, gram=term == "gram", cosine=term == "anchor_cos")
    with torch.no_grad():
        anchor.backbone.model.norm.weight.fill_(float("nan"))  # the DINO loss stays finite
    before = [copy.deepcopy(x.state_dict()) for x in (student, teacher, dino_loss)]
    weights = {"gram_weight" if term == "gram" else "cosine_weight": 1.0}
    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(
        student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[AnchorTerm(anchor, **weights)]
    )
    assert math.isfinite(stats["loss"].item()) and not math.isfinite(stats[term].item())
    assert stats["nonfinite"].item() == 1.0
    for module, saved in zip((student, teacher, dino_loss), before):
        for name, value in module.state_dict().items():
            assert torch.equal(value, saved[name]), name


def test_with_accumulation_the_terms_are_per_micro_batch():
    student, teacher, dino_loss, crops = setup(batch=4)
    anchor = Anchor(student.backbone, gram=True, cosine=True)
    move(student.backbone)
    global_crops = torch.cat(crops[:2])
    with torch.no_grad():
        features, patch_tokens = student.backbone.forward_tokens(global_crops)
        anchor_features, anchor_patch_tokens = anchor(global_crops)
    rows = [[0, 1, 4, 5], [2, 3, 6, 7]]  # each micro-batch: 2 images of global crop 1, then of global crop 2
    expected_gram = sum(gram_by_hand(patch_tokens[r], anchor_patch_tokens[r]) for r in rows) / 2
    expected_cos = sum(anchor_cosine_loss(features[r], anchor_features[r]).item() for r in rows) / 2
    optimizer = build_optimizer("adamw", get_param_groups(student))
    terms = [AnchorTerm(anchor, gram_weight=1.0, cosine_weight=1.0)]
    stats = train_step(
        student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=terms, accumulation_steps=2
    )
    assert stats["gram"].item() == pytest.approx(expected_gram, rel=1e-5)
    assert stats["anchor_cos"].item() == pytest.approx(expected_cos, rel=1e-5)


# ---- the run: building, warning, checkpoint -------------------------------------------------------


@pytest.mark.parametrize("start, warns", [("vit_tiny_patch16", True), ("model", False)])
def test_a_random_start_is_warned_about(data, tmp_path, caplog, start, warns):
    spec = str(data / "model") if start == "model" else start
    args = DinoTrainingArguments(train_dir=str(tmp_path), model_name_or_path=spec, gram_loss_weight=1.0)
    student = MultiCropWrapper(
        build_backbone(DinoConfig(**TINY_VIT)), DinoHead(32, K, hidden_dim=48, bottleneck_dim=16)
    )
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        anchor = trainer._build_anchor(args, accelerator, student)
    assert anchor.gram and not anchor.cosine
    assert ("random init" in caplog.text) == warns


def test_the_checkpoint_files_hold_the_anchor_when_there_is_one(tmp_path):
    student, _, _, _ = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False)
    shared = dict(
        student_state=student.state_dict(),
        teacher_state=student.state_dict(),
        loss_state={"center": torch.zeros(1, K)},
        optimizer_state={},
        scaler_state=None,
        trainer_state={"global_step": 1},
        training_args={},
    )
    for name, anchor_state in (("with", anchor.state_dict()), ("without", None)):
        staging = checkpoints.staging_dir(tmp_path / name, 1)
        checkpoints.write_shared_state(staging, **shared, anchor_state=anchor_state)
        checkpoints.write_process_state(staging, 0, {})
        folder = checkpoints.finalize(staging, tmp_path / name, 1, 1)
        checkpoints.check_checkpoint(folder)
        saved = checkpoints.load_checkpoint(folder, 0)["anchor"]
        if anchor_state is None:
            assert saved is None and not (folder / checkpoints.ANCHOR_FILE).exists()
        else:
            assert saved.keys() == anchor_state.keys()
            assert all(torch.equal(saved[key], value) for key, value in anchor_state.items())


def test_resuming_loads_the_saved_anchor_or_keeps_the_built_one(tmp_path, caplog):
    student, _, _, _ = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False)
    built = copy.deepcopy(anchor.state_dict())
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        trainer._load_anchor(anchor, None, tmp_path, 2, 0)  # a checkpoint of a run without anchoring
    assert f"has no {checkpoints.ANCHOR_FILE}" in caplog.text
    assert all(torch.equal(value, built[key]) for key, value in anchor.state_dict().items())
    move(student.backbone)
    saved = Anchor(student.backbone, gram=True, cosine=False).state_dict()
    trainer._load_anchor(anchor, saved, tmp_path, 2, 0)
    assert all(torch.equal(value, saved[key]) for key, value in anchor.state_dict().items())
    assert not all(torch.equal(value, built[key]) for key, value in anchor.state_dict().items())


@pytest.mark.slow
def test_a_resumed_run_anchors_to_the_start_it_saved(data, tmp_path):
    """scripts/pretrain.py with both terms on for 2 of 4 steps; then the source model changes and the run
    resumes: the anchor of every checkpoint is the original start, not the changed source."""
    source = tmp_path / "source"
    shutil.copytree(data, source)
    original = DinoModel.from_pretrained(source / "model").state_dict()
    out = tmp_path / "out"
    anchored = ["--gram_loss_weight", "1.0", "--gram_warmup_steps", "2", "--anchor_cosine_weight", "0.5"]
    first = python(*arguments(source, out, *anchored, "--num_train_epochs", "1", "--max_train_steps", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "gram=" in first.stdout and "anchor_cos=" in first.stdout and "random init" not in first.stderr

    torch.manual_seed(1)
    DinoModel(DinoConfig(**TINY_VIT)).save_pretrained(source / "model")  # the source moves on
    resumed = python(
        *arguments(source, out, *anchored, "--num_train_epochs", "1", "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    for step in (2, 4):
        anchor = load_file(out / "checkpoints" / f"checkpoint-{step}" / checkpoints.ANCHOR_FILE)
        assert anchor.keys() == {f"backbone.model.{key}" for key in original} | {SNAPSHOT_STEP}
        assert anchor[SNAPSHOT_STEP].item() == 0  # the start
        for key, value in original.items():
            assert torch.equal(anchor[f"backbone.model.{key}"], value), key
    student = load_file(out / "checkpoints" / "checkpoint-4" / "student.safetensors")
    assert not torch.equal(student["backbone.model.layernorm.weight"], original["layernorm.weight"])
