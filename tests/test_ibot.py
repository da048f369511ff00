"""iBOT's masked-patch loss (DINOv2 Sec. 3): the block masks and their statistics, the loss and its
patch center against explicit loops, the step with it, the refusals, and real CLI runs that resume bit
for bit."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from processes import run_in_processes
from runs import TINY, cli_arguments, run_cli
from safetensors.torch import load_file
from tiny import TINY_VIT
from torch.nn import functional as F

from dino_hf.augment.multicrop import MultiCropTransform
from dino_hf.data import masks as masking
from dino_hf.data.loader import build_multicrop_dataloader
from dino_hf.data.masks import BlockMasking, PatchMasks, block_mask
from dino_hf.data.sources import load_image_stream
from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.dino import DinoLoss
from dino_hf.objectives.ibot import IBotLoss, IBotTerm
from dino_hf.training import trainer
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.batches import DeviceBatches, EndlessBatches
from dino_hf.training.networks import build_student_teacher
from dino_hf.training.objectives import build_ibot_loss, build_masking
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.speed import compile_units
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

K, NCROPS = 16, 4
STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)
GRID = (14, 14)  # ViT-S/16 at 224 px


# ---- the block masks ---------------------------------------------------------------------------------


def test_a_block_is_a_rectangle_of_beit_shape():
    """One block on an empty grid: a full rectangle, of the first try's area uniform in [4, max] and
    aspect ratio exp(uniform(ln 0.3, ln 1 / 0.3)), computed here from the same random draws."""
    checked = 0
    for seed in range(200):
        max_patches = 4 + seed % 60
        mask = np.zeros(GRID, dtype=bool)
        added = masking._add_block(mask, np.random.default_rng(seed), max_patches)
        rows, cols = np.nonzero(mask)
        assert 0 < added <= max_patches and added == mask.sum()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all() and h * w == added
        assert h < GRID[0] and w < GRID[1]
        draws = np.random.default_rng(seed)
        area = 4 + (max_patches - 4) * draws.random()
        aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * draws.random())
        first = (round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect)))
        if 0 < first[0] * first[1] <= max_patches and first[0] < GRID[0] and first[1] < GRID[1]:
            assert (h, w) == first  # the first try always fits an empty grid
            checked += 1
    assert checked > 100


def test_a_mask_hides_at_most_its_count_and_nearly_always_exactly():
    rng = np.random.default_rng(0)
    exact = 0
    for _ in range(500):
        target = int(196 * rng.uniform(0.1, 0.5))
        hidden = block_mask(GRID, target, rng).sum()
        assert hidden <= target
        exact += hidden == target
    assert exact >= 0.85 * 500  # BEiT's generator stops early when 10 tries add nothing


def test_the_masked_crops_and_the_ratio_intervals_are_dinov2s():
    masks = BlockMasking(GRID)  # defaults: ratios 0.1 0.5, probability 0.5
    assert masks.masked_crops(128) == 64 and masks.masked_crops(3) == 1
    np.testing.assert_allclose(masks.ratio_edges(8), [0.1, 0.2, 0.3, 0.4, 0.5])
    # int(196 x 0.2) + int(196 x 0.3) + int(196 x 0.4) + int(196 x 0.5)
    assert masks.max_masked_patches(8) == 39 + 58 + 78 + 98
    rng = np.random.default_rng(0)
    for _ in range(100):
        targets = masks.targets(8, rng)
        assert len(targets) == 4
        for target, low, high in zip(targets, (0.1, 0.2, 0.3, 0.4), (0.2, 0.3, 0.4, 0.5)):
            assert int(196 * low) <= target <= int(196 * high)


def test_a_batch_masks_half_its_crops_one_ratio_interval_each_shuffled():
    masks = BlockMasking(GRID)
    crops, n = 16, 8
    upper = [int(196 * edge) for edge in masks.ratio_edges(crops)[1:]]
    masked_at = np.zeros(crops)
    fractions = []
    for batch in range(200):
        drawn = masks.draw(crops // 2, np.random.default_rng(batch))
        counts = drawn.crop_masks().sum(dim=1).numpy()  # (2B,) patches hidden per crop
        assert (counts > 0).sum() == n  # exactly int(2B x 0.5) crops get a mask
        assert all(c <= u for c, u in zip(sorted(counts[counts > 0]), upper))  # the i-th within interval i
        masked_at += counts > 0
        fractions += list(counts[counts > 0] / 196)
    assert max(fractions) <= 0.5
    assert np.mean(np.array(fractions) < 0.1) < 0.02  # below 0.1 only where a mask stopped early
    assert 0.27 < np.mean(fractions) <= 0.3  # the intervals' mean, a little less when a mask stops early
    assert ((0.35 < masked_at / 200) & (masked_at / 200 < 0.65)).all()  # shuffled over the crops


def test_indices_and_weights_describe_each_micro_batch():
    masks = BlockMasking((4, 4), micro_batches=2)
    drawn = masks([11, 12, 13, 14])
    limit = masks.max_masked_patches(4)
    assert drawn.bool_masked_pos.shape == (4, 2, 16) and drawn.bool_masked_pos.dtype == torch.bool
    assert drawn.indices.shape == drawn.weights.shape == (2, limit)
    for micro in drawn.micro_batches():
        rows = micro.crop_masks()  # (2b, N): global crop 1 of both images, then global crop 2
        assert torch.equal(rows[:2], micro.bool_masked_pos[:, 0])
        assert torch.equal(rows[2:], micro.bool_masked_pos[:, 1])
        flat = rows.flatten().nonzero().flatten()
        count = len(flat)
        assert torch.equal(micro.indices[0, :count], flat) and not micro.indices[0, count:].any()
        expected = 1.0 / rows.sum(dim=1).float()[flat // 16]
        assert torch.equal(micro.weights[0, :count], expected) and not micro.weights[0, count:].any()
        assert (rows.any(dim=1)).sum() == 2  # int(2b x 0.5) masked crops in each micro-batch


def test_the_same_seeds_draw_the_same_masks():
    masks = BlockMasking(GRID)
    first, again, other = masks([1, 2, 3]), masks([1, 2, 3]), masks([1, 2, 4])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.bool_masked_pos, other.bool_masked_pos)


def write_images(folder: Path, count: int = 12) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    return folder


def loader_of(folder, masks, num_workers=0):
    stream, column = load_image_stream(train_dir=str(folder))
    transform = MultiCropTransform(global_crops_size=32, local_crops_size=16, local_crops_number=1)
    return build_multicrop_dataloader(
        stream, column, transform, batch_size=4, num_workers=num_workers, shuffle_buffer_size=8, masks=masks
    )


def read_batches(folder, masks, num_workers=0, stop_after=None, state=None):
    loader = loader_of(folder, masks, num_workers)
    if state is not None:
        loader.load_state_dict(state)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == stop_after:
            return batches, loader.state_dict()
    return batches, None


def test_the_loader_draws_the_masks_in_its_workers_seeded_by_position(tmp_path):
    """The same masks with and without workers and after a resume, and the same crops as without iBOT."""
    folder = write_images(tmp_path / "images")
    masks = BlockMasking((4, 4))
    plain, _ = read_batches(folder, None)
    batches, _ = read_batches(folder, masks)
    in_workers, _ = read_batches(folder, masks, num_workers=1)
    first, state = read_batches(folder, masks, stop_after=1)
    rest, _ = read_batches(folder, masks, state=state)
    assert len(batches) == 3 and "masks" not in plain[0]
    for batch, plain_batch, worker_batch, resumed in zip(batches, plain, in_workers, first + rest, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch["crops"], plain_batch["crops"]))
        for other in (worker_batch, resumed):
            assert other["ids"] == batch["ids"]
            assert all(torch.equal(a, b) for a, b in zip(other["masks"], batch["masks"]))
    assert not torch.equal(batches[0]["masks"].bool_masked_pos, batches[1]["masks"].bool_masked_pos)
    crops, batch = next(DeviceBatches(EndlessBatches(loader_of(folder, masks)), "cpu"))  # the step's batches
    assert isinstance(batch["masks"], PatchMasks) and batch["ids"] == batches[0]["ids"]
    assert all(torch.equal(a, b) for a, b in zip(batch["masks"], batches[0]["masks"]))


# ---- the loss and the patch center -------------------------------------------------------------------


def tiny_patches(seed=0, rows=5):
    """Student and teacher logits of `rows` rows (the last one padding) and their weights: crop 0 hides
    rows 0-2 (weight 1/3), crop 1 hides the next ones (weight 1/(rows - 4))."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, 3, generator=generator)
    teacher = torch.randn(rows, 3, generator=generator)
    weights = torch.tensor([1 / 3] * 3 + [1 / (rows - 4)] * (rows - 4) + [0.0])
    return student, teacher, weights


def cross_entropy_by_hand(student, targets, weights, crops, student_temp=0.1):
    total = 0.0
    for s_row, q_row, w in zip(student.tolist(), targets, weights.tolist()):
        logits = [s / student_temp for s in s_row]
        top = max(logits)
        log_norm = top + math.log(sum(math.exp(x - top) for x in logits))
        total += w * -sum(q * (x - log_norm) for q, x in zip(q_row, logits))
    return total / crops


def test_the_loss_with_the_patch_center_against_explicit_loops():
    student, teacher, weights = tiny_patches()
    loss = IBotLoss(3)
    loss.center.copy_(torch.tensor([[0.2, -0.1, 0.4]]))
    temp = 0.07
    targets = []
    for t_row in teacher.tolist():
        scores = [(t - c) / temp for t, c in zip(t_row, loss.center[0].tolist())]
        top = max(scores)
        exps = [math.exp(x - top) for x in scores]
        targets.append([e / sum(exps) for e in exps])
    expected = cross_entropy_by_hand(student, targets, weights, crops=4)
    assert loss(student, teacher, weights, temp, crops=4).item() == pytest.approx(expected, rel=1e-5)


def sinkhorn_by_hand(teacher, valid, temp, iterations=3):
    """SPEC's Sinkhorn-Knopp over the valid rows only, with explicit loops; zeros for the others."""
    rows = [row for row, ok in zip(teacher.tolist(), valid) if ok]
    prototypes, samples = len(rows[0]), len(rows)
    q = [[math.exp(rows[b][k] / temp) for b in range(samples)] for k in range(prototypes)]  # K x B
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for k in range(prototypes):
            row_sum = sum(q[k])
            q[k] = [x / row_sum / prototypes for x in q[k]]
        for b in range(samples):
            column = sum(q[k][b] for k in range(prototypes))
            for k in range(prototypes):
                q[k][b] = q[k][b] / column / samples
    valid_targets = iter([[q[k][b] * samples for k in range(prototypes)] for b in range(samples)])
    return [next(valid_targets) if ok else [0.0] * prototypes for ok in valid]


def test_the_loss_with_sinkhorn_knopp_over_the_masked_patches_against_explicit_loops():
    student, teacher, weights = tiny_patches(seed=1, rows=7)
    loss = IBotLoss(3, centering="sinkhorn_knopp")
    temp = 0.5
    targets = sinkhorn_by_hand(teacher, (weights > 0).tolist(), temp)
    got = loss.targets(teacher, weights, temp)
    torch.testing.assert_close(got, torch.tensor(targets), rtol=1e-5, atol=1e-7)
    assert not got[-1].any()  # the padding row has no target
    expected = cross_entropy_by_hand(student, targets, weights, crops=4)
    assert loss(student, teacher, weights, temp, crops=4).item() == pytest.approx(expected, rel=1e-5)


def test_the_patch_center_moves_to_the_mean_over_the_masked_patches():
    _, teacher, weights = tiny_patches()
    loss = IBotLoss(3)
    loss.center.copy_(torch.tensor([[0.2, -0.1, 0.4]]))
    before = loss.center.clone()
    loss.update_center(teacher, weights, keep=torch.tensor(True))
    assert torch.equal(loss.center, before)  # a skipped step
    loss.update_center(teacher, torch.zeros_like(weights))
    assert torch.equal(loss.center, before)  # no masked patch: nothing to average
    loss.update_center(teacher, weights, keep=torch.tensor(False))
    torch.testing.assert_close(loss.center, 0.9 * before + 0.1 * teacher[:4].mean(0, keepdim=True))  # not the padding
    sinkhorn = IBotLoss(3, centering="sinkhorn_knopp")
    sinkhorn.update_center(teacher, weights)
    assert not sinkhorn.center.any()


def _center_and_sinkhorn_in_process(rank, world_size, results):
    _, teacher, weights = tiny_patches(seed=rank, rows=6)
    loss = IBotLoss(3)
    loss.update_center(teacher, weights)
    results[rank] = (loss.center.clone(), IBotLoss(3, centering="sinkhorn_knopp").targets(teacher, weights, 0.5))


@pytest.mark.slow
def test_over_two_processes_the_center_and_sinkhorn_knopp_see_all_masked_patches(tmp_path):
    results = run_in_processes(_center_and_sinkhorn_in_process, 2, tmp_path)
    parts = [tiny_patches(seed=rank, rows=6) for rank in range(2)]
    teacher, weights = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    whole = IBotLoss(3)
    whole.update_center(teacher, weights)
    targets = IBotLoss(3, centering="sinkhorn_knopp").targets(teacher, weights, 0.5).chunk(2)
    for rank in range(2):
        torch.testing.assert_close(results[rank][0], whole.center)
        torch.testing.assert_close(results[rank][1], targets[rank])


# ---- the step ----------------------------------------------------------------------------------------


def setup(batch=2, separate_head=False, accumulation=1, **loss_options):
    torch.manual_seed(0)
    backbone = build_backbone(DinoConfig(**TINY_VIT), drop_path_rate=0.0, mask_token=True)
    heads = [DinoHead(32, out_dim=K, hidden_dim=48, bottleneck_dim=16) for _ in range(1 + separate_head)]
    student = MultiCropWrapper(backbone, *heads)
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    crops = [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    masks = BlockMasking((4, 4), micro_batches=accumulation)(list(range(batch)))
    return student, teacher, DinoLoss(K, NCROPS, **loss_options), IBotLoss(K, **loss_options), crops, masks


@pytest.mark.parametrize("separate_head", [False, True])
def test_a_step_with_ibot_computes_both_losses_from_one_masked_forward(separate_head):
    """The DINO loss of the masked student, the iBOT loss of its masked patches against the whole
    teacher's, and the patch center, each computed here from the models' own forwards."""
    student, teacher, dino_loss, ibot_loss, crops, masks = setup(separate_head=separate_head)
    ibot_loss.center.copy_(0.1 * torch.randn(1, K))
    center = ibot_loss.center.clone()
    model, patch_head = student.backbone.model, student.ibot_head if separate_head else student.head
    with torch.no_grad():
        global_crops, rows = torch.cat(crops[:2]), masks.crop_masks()
        masked = model(global_crops, bool_masked_pos=rows)
        features = torch.cat([masked.pooler_output, model(torch.cat(crops[2:])).pooler_output])
        expected_dino = dino_loss(student.head(features), teacher(crops[:2]), 0.04, update_center=False)
        index = masks.indices[0]
        s = patch_head(masked.last_hidden_state[:, 1:].flatten(0, 1)[index])
        t_tokens = teacher.backbone.model(global_crops).last_hidden_state[:, 1:].flatten(0, 1)[index]
        t = (teacher.ibot_head if separate_head else teacher.head)(t_tokens)
        q = F.softmax((t - center) / 0.04, dim=-1)
        ce = -(q * F.log_softmax(s / 0.1, dim=-1)).sum(-1)
        expected_ibot = (ce * masks.weights[0]).sum() / 4
        masked_rows = masks.weights[0] > 0
        expected_center = 0.9 * center + 0.1 * t[masked_rows].mean(0, keepdim=True)

    optimizer = build_optimizer("sgd", get_param_groups(student))
    stats = train_step(
        student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[IBotTerm(ibot_loss, 0.5, masks)]
    )
    assert stats["loss"].item() == pytest.approx(expected_dino.item(), rel=1e-5)
    assert stats["ibot"].item() == pytest.approx(expected_ibot.item(), rel=1e-5)
    assert stats["total_loss"].item() == pytest.approx(stats["loss"].item() + 0.5 * stats["ibot"].item(), rel=1e-6)
    torch.testing.assert_close(ibot_loss.center, expected_center)
    assert stats["nonfinite"].item() == 0.0


def test_gradients_reach_the_mask_token_and_every_parameter():
    student, teacher, _, ibot_loss, crops, masks = setup(separate_head=True)
    index = masks.indices[0]
    logits, patch_logits = student(crops, bool_masked_pos=masks.crop_masks(), patch_indices=index)
    with torch.no_grad():
        _, teacher_patch_logits = teacher(crops[:2], patch_indices=index)
    ibot_loss(patch_logits, teacher_patch_logits, masks.weights[0], 0.04, 4).backward(retain_graph=True)
    mask_token = student.backbone.model.embeddings.mask_token
    assert mask_token.grad is not None and mask_token.grad.abs().sum() > 0
    no_gradient = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    # The iBOT term alone: DINO's head gets no gradient from it when the patches have their own head.
    assert no_gradient and all(name.startswith("head.") for name in no_gradient)
    logits.sum().backward()  # the DINO head's part of the objective
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    optimizer = build_optimizer("sgd", get_param_groups(student))
    before = mask_token.detach().clone()
    train_step(
        student,
        teacher,
        DinoLoss(K, NCROPS),
        optimizer,
        crops,
        StepValues(**STEP),
        terms=[IBotTerm(ibot_loss, 1.0, masks)],
    )
    assert not before.any() and mask_token.abs().sum() > 0  # zeros at init, trained by the step


@pytest.mark.parametrize("head", ["shared", "separate", "shared with BatchNorm"])
def test_a_shared_head_takes_the_features_and_the_masked_patches_in_one_call(head):
    """DINOv2's shared head runs once on the CLS features and the masked patch tokens (its prototypes
    normalised once); a separate head, or BatchNorm in the head (whose batch statistics would mix the
    two), keeps two calls. The outputs are those of the calls made one by one."""
    student, _, _, _, crops, masks = setup(separate_head=head == "separate")
    if head == "shared with BatchNorm":
        student.head = DinoHead(32, out_dim=K, use_bn=True, hidden_dim=48, bottleneck_dim=16)
    calls = []
    for module in {student.head, student.patch_head}:
        module.register_forward_hook(lambda module, inputs, output: calls.append((module, len(inputs[0]))))
    index = masks.indices[0]
    student.eval()  # BatchNorm on running statistics: the reference below sees the same
    logits, features, patch_logits = student(
        crops, return_features=True, bool_masked_pos=masks.crop_masks(), patch_indices=index
    )
    rows = len(crops) * len(crops[0])
    if head == "shared":
        assert calls == [(student.head, rows + len(index))]
    else:
        assert calls == [(student.head, rows), (student.patch_head, len(index))]
    with torch.no_grad():
        tokens = student.backbone.model(torch.cat(crops[:2]), bool_masked_pos=masks.crop_masks()).last_hidden_state
        expected_patches = student.patch_head(tokens[:, 1:].flatten(0, 1)[index])
        expected_logits = student.head(features)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch_logits, expected_patches, rtol=1e-5, atol=1e-6)


def test_torch_compile_compiles_the_separate_head_too():
    student, teacher, *_ = setup(separate_head=True)
    for model in (student, teacher):
        assert compile_units(model)[-2:] == [model.head, model.ibot_head]


def test_accumulated_micro_batches_each_get_their_own_masks():
    student, teacher, dino_loss, ibot_loss, crops, masks = setup(batch=4, accumulation=2)
    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(
        student,
        teacher,
        dino_loss,
        optimizer,
        crops,
        StepValues(**STEP),
        terms=[IBotTerm(ibot_loss, 1.0, masks)],
        accumulation_steps=2,
    )
    assert math.isfinite(stats["ibot"].item()) and ibot_loss.center.abs().sum() > 0
    with pytest.raises(ValueError, match="micro_batches=accumulation_steps"):
        train_step(
            student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[IBotTerm(ibot_loss, 1.0, masks)]
        )


def test_a_non_finite_ibot_term_skips_the_step(monkeypatch):
    student, teacher, dino_loss, ibot_loss, crops, masks = setup()
    optimizer = build_optimizer("adamw", get_param_groups(student))
    terms = [IBotTerm(ibot_loss, 1.0, masks)]
    train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=terms)
    before = [copy.deepcopy(x.state_dict()) for x in (student, teacher, dino_loss, ibot_loss)]
    forward = IBotLoss.forward
    monkeypatch.setattr(IBotLoss, "forward", lambda self, *args: forward(self, *args) * float("nan"))
    stats = train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=terms)
    assert stats["nonfinite"].item() == 1.0 and math.isfinite(stats["loss"].item())
    for module, saved in zip((student, teacher, dino_loss, ibot_loss), before):
        for name, value in module.state_dict().items():
            assert torch.equal(value, saved[name]), name


def test_with_ibot_off_the_run_is_todays(tmp_path, data):
    """The defaults build no iBOT loss, no masking and no mask token or second head, and the plan gives
    the trainer no iBOT term, which is the step without any term."""
    args = DinoTrainingArguments(train_dir=str(tmp_path), model_name_or_path=str(data / "model"), **TINY)
    student, _, _ = build_student_teacher(args)
    assert build_ibot_loss(args) is None and build_masking(args, student.backbone) is None
    assert not [name for name in student.state_dict() if "mask_token" in name or name.startswith("ibot_head")]
    assert student.ibot_head is None and student.patch_head is student.head
    plan = TrainingPlan.from_args(args, samples_per_epoch=16, num_processes=1, fresh_head=False)
    assert plan.term_weights(0)["ibot"] == 0.0
    run = SimpleNamespace(ibot_loss=build_ibot_loss(args), plan=plan, anchor=None, distillation=None)
    assert trainer._terms_at(run, 0, plan.term_weights(0), batch={}) == []
    student, teacher, dino_loss, _, crops, _ = setup()
    plain = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), terms=[])
    plain_stats = train_step(*plain, build_optimizer("adamw", get_param_groups(plain[0])), crops, StepValues(**STEP))
    assert stats.keys() == plain_stats.keys() and "ibot" not in stats and "total_loss" not in stats
    assert all(torch.equal(stats[key], plain_stats[key]) for key in stats)
    for module, plain_module in zip((student, teacher, dino_loss), plain):
        for (key, value), plain_value in zip(module.state_dict().items(), plain_module.state_dict().values()):
            assert torch.equal(value, plain_value), key


def test_with_ibot_on_the_networks_have_a_mask_token_and_the_plan_passes_the_weight(tmp_path, data):
    args = DinoTrainingArguments(
        train_dir=str(tmp_path), model_name_or_path=str(data / "model"), ibot_loss_weight=1.0, ibot_separate_head=True,
        **TINY,
    )  # fmt: skip
    student, teacher, _ = build_student_teacher(args)
    for network in (student, teacher):
        assert not network.backbone.model.embeddings.mask_token.any()  # zeros, as DINOv2's init
        assert network.ibot_head is not None and network.patch_head is network.ibot_head
    masks = build_masking(args, student.backbone)
    assert masks == BlockMasking(grid=(4, 4), ratio_min_max=(0.1, 0.5), sample_probability=0.5, micro_batches=1)
    plan = TrainingPlan.from_args(args, samples_per_epoch=16, num_processes=1, fresh_head=False)
    assert plan.term_weights(0)["ibot"] == 1.0


# ---- refusals ----------------------------------------------------------------------------------------


def test_backbones_without_a_mask_token_are_refused(tmp_path):
    convnext = tmp_path / "convnext"
    tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1])).save_pretrained(convnext)
    for model in (
        {"backbone": "timm:resnet18"},
        {"model_name_or_path": "timm:vit_tiny_patch16_224"},
        {"model_name_or_path": str(convnext)},
    ):
        with pytest.raises(ValueError, match="mask token") as error:
            DinoTrainingArguments(train_dir=str(tmp_path), ibot_loss_weight=1.0, **model)
        assert "DinoModel" in str(error.value) and "dinov2" in str(error.value)
    with pytest.raises(ValueError, match="mask token"):
        build_backbone("timm:test_vit", mask_token=True)


def test_ibot_settings_out_of_range_are_refused(tmp_path):
    cases = {
        "ibot_separate_head": dict(ibot_separate_head=True),  # without the iBOT loss
        "mask_ratio_min_max": dict(ibot_loss_weight=1.0, mask_ratio_min_max=[0.5, 0.1]),
        "mask_sample_probability": dict(ibot_loss_weight=1.0, mask_sample_probability=0.1),  # 4 crops: none masked
        "ibot_loss_weight": dict(ibot_loss_weight=-1.0),
    }
    for name, options in cases.items():
        with pytest.raises(ValueError, match=f"--{name}"):
            DinoTrainingArguments(train_dir=str(tmp_path), per_device_train_batch_size=2, **options)


# ---- real runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2") / "model"
    torch.manual_seed(0)
    tf.Dinov2Model(
        tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                        mlp_ratio=2)
    ).save_pretrained(folder)  # fmt: skip
    return folder


def pretrain(options: dict, output_dir: Path, **extra):
    completed = run_cli(*cli_arguments({**options, "output_dir": output_dir, **extra}))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dino_model", "dinov2"])
def test_an_ibot_run_resumes_bit_for_bit(data, dinov2, tmp_path, model):
    """4 steps in one go, and 2 steps then a resume to 4: the same weights, centers and patch center.
    The DinoModel run uses DINOv2's settings (shared head, patch center); the Dinov2Model run DINOv3's
    separate head, Sinkhorn-Knopp, 2 micro-batches and a loader worker."""
    options = {**TINY, "train_dir": data / "images", "ibot_loss_weight": 1.0}
    if model == "dino_model":
        options["model_name_or_path"] = data / "model"
    else:
        options.update(
            model_name_or_path=dinov2,
            ibot_separate_head=True,
            centering="sinkhorn_knopp",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            dataloader_num_workers=1,
        )
    whole = pretrain(options, tmp_path / "whole", max_train_steps=4)
    pretrain(options, tmp_path / "resumed", max_train_steps=2)
    resumed = pretrain(options, tmp_path / "resumed", max_train_steps=4, resume_from_checkpoint="latest")
    assert "at step 2" in resumed.stdout
    assert "ibot=" in whole.stdout and "total_loss=" in whole.stdout
    ends = [folder / "checkpoints" / "checkpoint-4" for folder in (tmp_path / "whole", tmp_path / "resumed")]
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        got, expected = (load_file(end / f"{part}.safetensors") for end in ends)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (part, name)
    student = load_file(ends[0] / "student.safetensors")
    patch_center = load_file(ends[0] / "ibot_loss.safetensors")["center"]
    if model == "dino_model":
        assert patch_center.abs().sum() > 0  # the patch center moved
        assert not [name for name in student if name.startswith("ibot_head.")]
        config = json.loads((tmp_path / "whole" / "teacher_backbone" / "config.json").read_text())
        assert config["use_mask_token"] is True
        exported = load_file(tmp_path / "whole" / "teacher_backbone" / "model.safetensors")
        assert exported["embeddings.mask_token"].abs().sum() > 0  # trained, and exported with the backbone
    else:
        assert not patch_center.any()  # Sinkhorn-Knopp uses no patch center
        assert [name for name in student if name.startswith("ibot_head.")]


@pytest.mark.slow
def test_the_cli_refuses_ibot_on_a_timm_backbone_with_status_2(data, tmp_path):
    completed = run_cli(
        *cli_arguments({**TINY, "train_dir": data / "images", "output_dir": tmp_path / "out"}),
        "--backbone", "timm:resnet18", "--ibot_loss_weight", "1",
    )  # fmt: skip
    assert completed.returncode == 2
    assert "mask token" in completed.stderr and not (tmp_path / "out").exists()
