"""DINOv3's Gram teachers beyond the start (dino_hf/objectives/anchor.py): the EMA Gram teacher's snapshot
schedule, the snapshot itself (also from a sharded teacher), the trainer taking it at the scheduled steps
and not moving it in between while the EMA teacher moves, the Gram loss off before the first snapshot,
the high-resolution Gram teacher against torch's interpolation written out here, the settings refused
before training, and a run of scripts/pretrain.py stopped and resumed against an uninterrupted one."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from processes import run_in_processes
from safetensors.torch import load_file
from test_anchor import gram_by_hand
from test_pretrain_script import arguments, python
from test_sharding import setup as sharded_setup
from test_sharding import shard_as_accelerate
from torch.distributed.device_mesh import init_device_mesh
from torch.nn import functional as F

from dino_hf.models.backbones import build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.anchor import SNAPSHOT_STEP, Anchor, AnchorTerm, GramSnapshots, resize_token_map, token_grid
from dino_hf.objectives.dino import DinoLoss
from dino_hf.run_files import checkpoints
from dino_hf.run_files.whole_weights import whole_state_dict
from dino_hf.training import trainer
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.networks import build_student_teacher
from dino_hf.training.objectives import build_anchor
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.sharding import shard_like
from dino_hf.training.step import train_step
from dino_hf.training.teacher import build_teacher

K, B, NCROPS = 64, 2, 4
EMA = dict(gram_loss_weight=1.0, gram_teacher="ema", gram_start_step=2, gram_update_steps=2, gram_max_updates=1)


# ---- the schedule -----------------------------------------------------------------------------------


def test_the_snapshot_schedule():
    snapshots = GramSnapshots(start=3, every=4, max_updates=2)
    assert [step for step in range(30) if snapshots.due(step)] == [3, 7, 11]  # the first, then 2 refreshes
    assert [snapshots.last(step) for step in range(14)] == [None] * 3 + [3] * 4 + [7] * 4 + [11] * 3
    assert snapshots.last(1000) == 11
    # A checkpoint after 7 steps is written before the snapshot due at step 7: it holds that of step 3.
    assert [snapshots.held(done) for done in (0, 3, 4, 7, 8)] == [None, None, 3, 3, 7]
    unlimited = GramSnapshots(start=0, every=5)
    assert [step for step in range(16) if unlimited.due(step)] == [0, 5, 10, 15]
    never_refreshed = GramSnapshots(start=2)
    assert [step for step in range(10) if never_refreshed.due(step)] == [2]
    assert never_refreshed.last(9) == 2 and never_refreshed.last(1) is None
    assert [step for step in range(30) if GramSnapshots(1, 4, max_updates=0).due(step)] == [1]


def plan(tmp_path, **options) -> TrainingPlan:
    args = DinoTrainingArguments(train_dir=str(tmp_path), per_device_train_batch_size=B, **options)
    return TrainingPlan.from_args(args, samples_per_epoch=100, num_processes=1, fresh_head=False)


def test_the_plan_schedules_the_snapshots_and_the_weight_from_the_first(tmp_path):
    ema = plan(tmp_path, **{**EMA, "gram_warmup_steps": 4, "gram_loss_weight": 2.0})
    assert ema.gram_snapshots == GramSnapshots(2, 2, 1)
    # 0 before the first snapshot, then the warm-up from 0 at step 2 to 2.0 at step 6.
    assert [ema.term_weights(step)["gram"] for step in range(8)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    start = plan(tmp_path, gram_loss_weight=2.0, gram_warmup_steps=4)
    assert start.gram_snapshots is None  # the start is taken once, before the first step
    assert [start.term_weights(step)["gram"] for step in range(3)] == [0.0, 0.5, 1.0]
    assert plan(tmp_path).gram_snapshots is None


# ---- the snapshot -----------------------------------------------------------------------------------


def setup(backbone_name: str = "vit"):
    """A tiny timm ViT (or CNN) student (no stochastic depth), a teacher that differs from it, fixed crops."""
    torch.manual_seed(0)
    if backbone_name == "vit":
        options = dict(drop_path_rate=0.0, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        backbone = build_backbone("timm:test_vit", **options)
    else:
        backbone = build_backbone("timm:test_resnet", drop_path_rate=0.0)
    student = MultiCropWrapper(backbone, DinoHead(backbone.num_features, K, hidden_dim=48, bottleneck_dim=16))
    teacher = build_teacher(student)
    move(teacher)
    dino_loss = DinoLoss(K, NCROPS)
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    return student, teacher, dino_loss, crops


def move(module: torch.nn.Module, scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_snapshot_copies_the_ema_teachers_backbone_and_its_step():
    student, teacher, _, _ = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False, snapshot_step=None)
    assert anchor.taken_at() is None and anchor.state_dict()[SNAPSHOT_STEP].item() == -1
    anchor.snapshot_(teacher.backbone, 5)
    assert anchor.taken_at() == 5 and same(anchor.backbone.state_dict(), teacher.backbone.state_dict())
    for p, q in zip(anchor.backbone.parameters(), teacher.backbone.parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr() and not p.requires_grad
    move(teacher)  # a copy, not a view: the teacher moves on alone
    assert not same(anchor.backbone.state_dict(), teacher.backbone.state_dict())
    assert Anchor(student.backbone, gram=True, cosine=True).taken_at() == 0  # the start
    with pytest.raises(ValueError, match="same architecture"):
        anchor.snapshot_(build_backbone("timm:test_resnet"), 6)


def _sharded_snapshot(rank, world_size, results):
    mesh = init_device_mesh("cpu", (world_size,))
    student, teacher, _, _ = sharded_setup()
    move(teacher)
    whole_teacher = copy.deepcopy(teacher.backbone.state_dict())
    anchor = Anchor(student.backbone, gram=True, cosine=False, snapshot_step=None)  # before sharding, as the trainer
    shard_as_accelerate(student, mesh)
    shard_like(teacher, student)
    anchor.snapshot_(teacher.backbone, 3)  # every process: the teacher's shards gathered whole
    results[rank] = {"anchor": anchor.backbone.state_dict(), "teacher": whole_teacher, "step": anchor.taken_at()}
    gathered = whole_state_dict(teacher)
    if rank == 0:
        backbone = {key: value for key, value in gathered.items() if key.startswith("backbone.")}
        results["gathered"] = {key.removeprefix("backbone."): value for key, value in backbone.items()}


@pytest.mark.slow
def test_under_fsdp_every_process_takes_the_whole_teacher(tmp_path):
    """2 gloo processes shard the student and the teacher as the trainer does; each takes the snapshot
    from the teacher's shards and holds the whole backbone, equal to the gathered teacher."""
    results = run_in_processes(_sharded_snapshot, 2, tmp_path)
    for rank in (0, 1):
        assert results[rank]["step"] == 3
        assert same(results[rank]["anchor"], results[rank]["teacher"])
        assert same(results[rank]["anchor"], results["gathered"])


# ---- the trainer's steps ------------------------------------------------------------------------------


def run_steps(tmp_path, steps: int, **options):
    """`steps` steps as `trainer.train_loop` runs them (the plan's schedule and options, the anchor from
    `trainer._anchor_at`); returns the stats, the anchor and teacher weights after each step, and the
    steps whose snapshot was printed."""
    student, teacher, dino_loss, crops = setup()
    run_plan = plan(tmp_path, **options)
    printed = []
    run = SimpleNamespace(
        plan=run_plan,
        anchor=build_anchor(run_plan.args, student.backbone),
        teacher=teacher,
        accelerator=SimpleNamespace(print=printed.append),
        ibot_loss=None,
        distillation=None,
    )
    optimizer = build_optimizer("adamw", get_param_groups(student))
    history = []
    for step in range(steps):
        terms = trainer._terms_at(run, step, run_plan.term_weights(step), batch={})
        stats = train_step(student, teacher, dino_loss, optimizer, crops, run_plan.step_values(step), terms=terms)
        history.append(
            dict(
                stats=stats,
                anchor=None if run.anchor is None else copy.deepcopy(run.anchor.backbone.state_dict()),
                taken_at=None if run.anchor is None else run.anchor.taken_at(),
                teacher=copy.deepcopy(teacher.backbone.state_dict()),
                passed=any(isinstance(term, AnchorTerm) for term in terms),
            )
        )
    return history, printed


def test_the_trainer_takes_the_snapshots_at_their_steps_and_holds_them_in_between(tmp_path):
    history, printed = run_steps(tmp_path, 7, **EMA)  # snapshots before steps 2 and 4, none at 6 (1 refresh)
    assert printed == [f"step {step}: Gram teacher taken from the EMA teacher" for step in (2, 4)]
    assert [h["taken_at"] for h in history] == [None, None, 2, 2, 4, 4, 4]
    assert [h["passed"] for h in history] == [False, False, True, True, True, True, True]
    # The snapshot before step s is the EMA teacher after s steps (after step s - 1).
    assert same(history[2]["anchor"], history[1]["teacher"]) and same(history[4]["anchor"], history[3]["teacher"])
    # Between refreshes the Gram teacher stays while the EMA teacher moves, also past the last refresh.
    for first, second in [(2, 3), (4, 5), (5, 6)]:
        assert same(history[first]["anchor"], history[second]["anchor"])
        assert not same(history[first]["teacher"], history[second]["teacher"])
    assert not same(history[3]["anchor"], history[4]["anchor"])


def test_before_the_first_snapshot_the_gram_loss_is_off(tmp_path):
    """Steps 0 and 1 with the EMA Gram teacher of step 2 are the plain DINO steps, bit for bit: the
    weight is 0 and the Gram teacher is not run; from step 2 its term is reported."""
    history, _ = run_steps(tmp_path, 3, **EMA)
    plain, _ = run_steps(tmp_path, 2)
    for step in (0, 1):
        assert plan(tmp_path, **EMA).term_weights(step)["gram"] == 0.0
        assert history[step]["stats"].keys() == plain[step]["stats"].keys() and "gram" not in plain[step]["stats"]
        assert all(torch.equal(value, plain[step]["stats"][key]) for key, value in history[step]["stats"].items())
        assert same(history[step]["teacher"], plain[step]["teacher"])
    assert history[2]["stats"]["gram"].item() > 0  # the snapshot of step 2 against the student of step 2


# ---- the high-resolution Gram teacher -------------------------------------------------------------


def test_token_grid_and_the_resize_against_interpolate_by_hand():
    assert token_grid(16, 32, 32) == (4, 4) and token_grid(24, 48, 32) == (6, 4) and token_grid(1, 32, 32) == (1, 1)
    with pytest.raises(ValueError, match="grid"):
        token_grid(15, 32, 32)
    torch.manual_seed(4)
    tokens = torch.randn(2, 6 * 4, 5)  # a 6 x 4 map, row by row
    resized = resize_token_map(tokens, (6, 4), (3, 2))
    token_map = torch.empty(2, 5, 6, 4)
    for i in range(6):
        for j in range(4):
            token_map[:, :, i, j] = tokens[:, i * 4 + j]
    expected = F.interpolate(token_map, size=(3, 2), mode="bicubic", align_corners=False)  # (2, 5, 3, 2)
    assert resized.shape == (2, 6, 5)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(resized[:, i * 2 + j], expected[:, :, i, j], rtol=0, atol=0)


@pytest.mark.parametrize("backbone_name", ["vit", "cnn"])
def test_the_gram_teacher_sees_the_crops_scaled_and_its_map_resized_to_the_students_grid(backbone_name):
    student, _, _, crops = setup(backbone_name)
    move(student.backbone, 0.05)  # away from the Gram teacher: a Gram loss above 0
    anchor = Anchor(student.backbone, gram=True, cosine=False, resolution_scale=2.0)
    # (2B, 3, G, G): 32 px for the ViT; 64 px for the ResNet (stride 32), whose 1 x 1 map at 32 px has no pairs.
    global_crops = torch.cat(crops[:2]) if backbone_name == "vit" else torch.randn(2 * B, 3, 64, 64)
    crop = global_crops.shape[-1]
    with torch.no_grad():
        features, patch_tokens = student.backbone.eval().forward_tokens(global_crops)
        large = F.interpolate(
            global_crops, size=(2 * crop, 2 * crop), mode="bicubic", antialias=True, align_corners=False
        )
        _, teacher_tokens = anchor.backbone.forward_tokens(large)
    side, student_side = int(teacher_tokens.shape[1] ** 0.5), int(patch_tokens.shape[1] ** 0.5)
    assert side == 2 * student_side  # vit: 8 x 8 patches of 8 px against 4 x 4; resnet: 4 x 4 against 2 x 2
    token_map = teacher_tokens.reshape(len(large), side, side, -1).permute(0, 3, 1, 2)  # (2B, C, 2h, 2w)
    resized = F.interpolate(token_map, size=(student_side, student_side), mode="bicubic", align_corners=False)
    expected = resized.flatten(2).transpose(1, 2)  # (2B, h * w, C)
    gram = anchor.terms(global_crops, features, patch_tokens)["gram"]
    # The loss is a mean of squared differences of float32 cosines about 4e-3 apart: float32 rounding of the
    # cosines alone moves it by up to about 5e-5 of itself.
    assert gram.item() == pytest.approx(gram_by_hand(patch_tokens, expected), rel=2e-4) and gram.item() > 0
    # At scale 1 the same anchor's term is the plain one, of the crops as they are: another number.
    plain = Anchor(student.backbone, gram=True, cosine=False)
    plain.load_state_dict(anchor.state_dict())
    assert plain.terms(global_crops, features, patch_tokens)["gram"].item() != pytest.approx(gram.item(), rel=1e-3)


def test_a_wrong_resolution_scale_is_refused_by_the_anchor():
    student, _, _, _ = setup()
    for options in (dict(resolution_scale=0.5), dict(resolution_scale=2.0, cosine=True)):
        with pytest.raises(ValueError, match="resolution_scale"):
            Anchor(student.backbone, **{"gram": True, "cosine": False, **options})


# ---- settings refused before training -------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(gram_teacher="ema"), "--gram_teacher='ema' .* serves the Gram loss"),
        (dict(gram_teacher="ema", gram_loss_weight=1.0, anchor_cosine_weight=0.5), "--anchor_cosine_weight"),
        (dict(gram_teacher="ema", gram_loss_weight=1.0, gram_max_updates=3), "--gram_max_updates"),
        (dict(gram_teacher="ema", gram_loss_weight=1.0, gram_start_step=-1), "--gram_start_step"),
        (dict(gram_loss_weight=1.0, gram_start_step=100), "--gram_start_step"),
        (dict(gram_loss_weight=1.0, gram_update_steps=100), "--gram_update_steps"),
        (dict(gram_loss_weight=1.0, gram_teacher_resolution_scale=0.5), "--gram_teacher_resolution_scale"),
        (dict(gram_teacher_resolution_scale=2.0), "--gram_teacher_resolution_scale"),
        (dict(gram_loss_weight=1.0, anchor_cosine_weight=1.0, gram_teacher_resolution_scale=2.0), "cosine"),
        (dict(gram_loss_weight=1.0, gram_teacher_resolution_scale=1.3), "whole number of pixels"),
        # vit_small_patch16 at 224 px: x 1.25 gives 280 px, not a multiple of 16.
        (dict(gram_loss_weight=1.0, gram_teacher_resolution_scale=1.25), "multiple of the backbone's patch size 16"),
    ],
)
def test_wrong_gram_teacher_settings_are_refused(tmp_path, options, error):
    with pytest.raises(ValueError, match=error):
        DinoTrainingArguments(train_dir=str(tmp_path), **options)


def test_a_gram_teacher_size_the_backbone_cannot_take_is_refused_before_training(data, tmp_path):
    args = dict(train_dir=str(tmp_path), gram_loss_weight=1.0, global_crops_size=32, local_crops_number=0)
    # Saved ViTs with a patch size in their config are checked with the arguments: 32 x 1.125 = 36 px.
    folder = tmp_path / "dinov3"
    config = tf.DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    tf.AutoModel.from_config(config).save_pretrained(folder)
    for model in (data / "model", folder):
        with pytest.raises(ValueError, match="36 px must be a multiple of the backbone's patch size 8"):
            DinoTrainingArguments(model_name_or_path=str(model), gram_teacher_resolution_scale=1.125, **args)
    # A timm ViT once built (patch 16): 32 x 1.25 = 40 px.
    timm_vit = DinoTrainingArguments(backbone="timm:test_vit", gram_teacher_resolution_scale=1.25, **args)
    with pytest.raises(ValueError, match="40 px must be a multiple of the backbone's patch size 16"):
        build_student_teacher(timm_vit)
    # A transformers backbone checks the size itself in build_anchor (its patch size, or a CNN's probe).
    cnn_sized = DinoTrainingArguments(backbone="timm:test_resnet", gram_teacher_resolution_scale=1.125, **args)
    with pytest.raises(ValueError, match="Gram teacher's crop size .* 36 is not a multiple of the patch size 8"):
        build_anchor(cnn_sized, build_backbone(str(folder)))
    taken = DinoTrainingArguments(model_name_or_path=str(folder), gram_teacher_resolution_scale=1.5, **args)
    assert build_anchor(taken, build_backbone(str(folder))).resolution_scale == 1.5  # 48 px


# ---- resuming ---------------------------------------------------------------------------------------


def test_resuming_checks_the_saved_snapshot_against_the_schedule(tmp_path, caplog):
    student, teacher, _, _ = setup()
    anchor = Anchor(student.backbone, gram=True, cosine=False, snapshot_step=None)
    anchor.snapshot_(teacher.backbone, 2)
    saved = copy.deepcopy(anchor.state_dict())
    resumed = Anchor(student.backbone, gram=True, cosine=False, snapshot_step=None)
    trainer._load_anchor(resumed, saved, tmp_path, 4, GramSnapshots(2, 2, 1).held(4))  # held: step 2
    assert resumed.taken_at() == 2 and same(resumed.state_dict(), saved)
    with pytest.raises(ValueError, match="taken at step 2, .* give step 3 after 4 steps"):
        trainer._load_anchor(resumed, saved, tmp_path, 4, GramSnapshots(3).held(4))  # --gram_start_step changed
    with pytest.raises(ValueError, match="taken at step 2, .* give step 0 after 4 steps"):
        trainer._load_anchor(resumed, saved, tmp_path, 4, 0)  # resumed as --gram_teacher start
    # A checkpoint without a Gram teacher: refused once a snapshot was due, taken later otherwise.
    placeholder = Anchor(student.backbone, gram=True, cosine=False, snapshot_step=None)
    with pytest.raises(ValueError, match="--gram_start_step 4 or later"):
        trainer._load_anchor(placeholder, None, tmp_path, 4, 2)
    trainer._load_anchor(placeholder, None, tmp_path, 4, None)
    assert placeholder.taken_at() is None
    # A start anchor written before the snapshot step was saved loads as the start.
    start = Anchor(student.backbone, gram=True, cosine=False)
    old = {key: value for key, value in start.state_dict().items() if key != SNAPSHOT_STEP}
    trainer._load_anchor(start, old, tmp_path, 4, 0)
    assert start.taken_at() == 0


def log_lines(stdout: str, steps) -> dict[int, str]:
    """The logging lines of `steps`, without the images per second (the one figure that is timed)."""
    lines = {}
    for line in stdout.splitlines():
        if line.startswith("step ") and " epoch " in line:
            step = int(line.split()[1])
            if step in steps:
                lines[step] = line.split(" images_per_second=")[0]
    return lines


@pytest.mark.slow
def test_a_resumed_run_has_the_gram_teacher_and_losses_of_an_uninterrupted_one(data, tmp_path):
    """scripts/pretrain.py, 8 steps, an EMA Gram teacher at twice the resolution taken before step 2 and
    refreshed once, before step 4: uninterrupted, and stopped after step 4 (its checkpoint written before
    the refresh due at step 4) then resumed. The checkpoints and losses of steps 6 and 8 are the same bit
    for bit; each checkpoint's Gram teacher is the EMA teacher of its snapshot step."""
    gram = [
        "--gram_loss_weight", "1.0", "--gram_teacher", "ema", "--gram_start_step", "2", "--gram_update_steps", "2",
        "--gram_max_updates", "1", "--gram_teacher_resolution_scale", "2", "--checkpoints_total_limit", "4",
    ]  # fmt: skip
    whole = python(*arguments(data, tmp_path / "whole", *gram))
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = python(*arguments(data, tmp_path / "resumed", *gram, "--max_train_steps", "4"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = python(*arguments(data, tmp_path / "resumed", *gram, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout

    taken = "Gram teacher taken from the EMA teacher"
    assert [line.split(":")[0] for line in whole.stdout.splitlines() if taken in line] == ["step 2", "step 4"]
    assert [line.split(":")[0] for line in resumed.stdout.splitlines() if taken in line] == ["step 4"]
    whole_lines, resumed_lines = log_lines(whole.stdout, range(5, 9)), log_lines(resumed.stdout, range(5, 9))
    assert len(whole_lines) == 4 and resumed_lines == whole_lines
    assert all("gram=" in line for line in whole_lines.values())
    assert "gram=" not in log_lines(whole.stdout, [1, 2])[2] and "gram=" in log_lines(whole.stdout, [3])[3]

    def files(run: str, step: int) -> dict:
        folder = tmp_path / run / "checkpoints" / f"checkpoint-{step}"
        names = ("student.safetensors", "teacher.safetensors", checkpoints.ANCHOR_FILE)
        return {name: load_file(folder / name) for name in names}

    for step in (6, 8):
        for name, tensors in files("whole", step).items():
            assert same(files("resumed", step)[name], tensors), (step, name)
    # ckpt-2: no snapshot yet; ckpt-4: the teacher of ckpt-2; ckpt-6 and ckpt-8: that of ckpt-4 (1 refresh).
    expected = {2: None, 4: 2, 6: 4, 8: 4}
    for step, snapshot in expected.items():
        gram_teacher = files("whole", step)[checkpoints.ANCHOR_FILE]
        assert gram_teacher.pop(SNAPSHOT_STEP).item() == (-1 if snapshot is None else snapshot)
        if snapshot is not None:
            teacher = files("whole", snapshot)["teacher.safetensors"]
            assert same(gram_teacher, {key: value for key, value in teacher.items() if key.startswith("backbone.")})
    assert not same(files("whole", 6)["teacher.safetensors"], files("whole", 4)["teacher.safetensors"])
    args = json.loads((tmp_path / "whole" / "checkpoints" / "checkpoint-8" / "training_args.json").read_text())
    assert args["gram_teacher"] == "ema" and args["gram_teacher_resolution_scale"] == 2.0
