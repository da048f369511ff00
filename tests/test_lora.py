"""LoRA through peft (ExPLoRA's recipe): the trainable set of each ViT family, the frozen base held once by
the student, the teacher and the anchor, the EMA of the trainable parameters alone, the merged export
against the adapter applied by peft in a process without dino_hf, checkpoints, resume and the refusal of
another base."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf
import yaml
from runs import ENV, REPO, TINY, pretrain_arguments, run_cli, saved, train_in_process
from safetensors.torch import load_file
from tiny import TINY_VIT
from torch import nn

from dino_hf.convert.export import export_backbone
from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.lora import add_lora_, merged_backbone, save_adapter, with_base_of
from dino_hf.models.modeling_dino import DinoModel
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.networks import build_student_teacher, lora_base_dtype, student_backbone
from dino_hf.training.objectives import build_anchor
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.teacher import ema_update_

VIT_SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
# Each family's model, its block prefix (the format takes the block index) and its query / value names.
QV = ("q_proj", "v_proj")
FAMILIES = {
    "vit": (lambda: tf.ViTModel(tf.ViTConfig(**VIT_SIZES, intermediate_size=64)), "layers.{}.", QV),
    "deit": (lambda: tf.DeiTModel(tf.DeiTConfig(**VIT_SIZES, intermediate_size=64)), "layers.{}.", QV),
    "dinov2": (lambda: tf.Dinov2Model(tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2)), "encoder.layer.{}.", QV),
    "dinov2_with_registers": (
        lambda: tf.Dinov2WithRegistersModel(
            tf.Dinov2WithRegistersConfig(**VIT_SIZES, mlp_ratio=2, num_register_tokens=2)
        ),
        "encoder.layer.{}.",
        QV,
    ),
    "dinov3_vit": (
        lambda: tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**VIT_SIZES, intermediate_size=64, num_register_tokens=2)),
        "model.layer.{}.",
        QV,
    ),
}


def _saved(model: nn.Module, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    torch.manual_seed(0)
    return {name: _saved(make(), root / name) for name, (make, _, _) in FAMILIES.items()}


def _backbones(folders):
    """(name, backbone, block prefix, query / value names) of every family LoRA takes."""
    for name, (_, prefix, targets) in FAMILIES.items():
        yield name, build_backbone(folders[name], drop_path_rate=0.0), prefix, targets
    timm_vit = build_backbone("timm:vit_tiny_patch16_224", drop_path_rate=0.0, image_size=32, depth=3, patch_size=8)
    yield "timm", timm_vit, "blocks.{}.", ("qkv",)
    dino = build_backbone(DinoModel(DinoConfig(**{**TINY_VIT, "num_hidden_layers": 3})))
    yield "dino", dino, "encoder.layer.{}.", ("query", "value")


def _expected_trainable(model: nn.Module, prefix: str, targets: tuple[str, ...]) -> set[str]:
    """The trainable set by ExPLoRA's rule, from the model before injection: LoRA factors on the query and
    value of blocks 0 and 1, block 2 whole, every norm; never a ViT's pooler."""
    expected = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and any(name.startswith(prefix.format(block)) for block in (0, 1)):
            expected |= {f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"}
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm"):
            expected |= {f"{name}.{param}" for param, _ in module.named_parameters(recurse=False)}
    expected |= {name for name, _ in model.named_parameters() if name.startswith(prefix.format(2))}
    return {name for name in expected if not name.startswith("pooler.")}


def test_each_family_trains_the_factors_the_last_block_and_the_norms_and_nothing_else(folders):
    for family, backbone, prefix, targets in _backbones(folders):
        expected = _expected_trainable(backbone.model, prefix, targets)
        add_lora_(backbone, rank=2, base=family, unfreeze_last_blocks=1)
        trainable = {name for name, param in backbone.model.named_parameters() if param.requires_grad}
        assert trainable == expected, family
        # A step: every trainable parameter gets a gradient and optimiser state, every frozen one neither.
        with torch.no_grad():  # B starts at zero (A would get no gradient), a fresh layer scale at zero too
            for param in backbone.model.parameters():
                param.add_(0.1 * torch.randn_like(param))
        head = nn.Linear(backbone.num_features, 4)
        network = nn.ModuleDict({"backbone": backbone, "head": head})
        optimizer = build_optimizer("adamw", get_param_groups(network), device=torch.device("cpu"))
        features, tokens = backbone.forward_tokens(torch.randn(2, 3, 32, 32))
        (head(features).square().sum() + tokens.square().mean()).backward()
        optimizer.step()
        for name, param in backbone.model.named_parameters():
            if param.requires_grad:
                assert param.grad is not None and param.grad.abs().sum() > 0, (family, name)
                assert optimizer.state[param], (family, name)
            else:
                assert param.grad is None and not optimizer.state[param], (family, name)
        assert all(p.grad is not None for p in head.parameters())


def test_other_families_are_refused_with_the_families_that_work():
    convnext = build_backbone("timm:resnet10t", drop_path_rate=0.0)
    with pytest.raises(ValueError, match="transformers vit, deit, dinov2.*timm VisionTransformer.*DinoModel"):
        add_lora_(convnext, rank=2, base="resnet")


def test_target_names_that_match_nothing_are_refused_with_the_names_there_are(folders):
    backbone = build_backbone(folders["dinov2"], drop_path_rate=0.0)
    with pytest.raises(ValueError, match="query names no Linear layer.*q_proj"):
        add_lora_(backbone, rank=2, base="dinov2", target_modules=["query"])


def _lora_args(folder, tmp_path, **options) -> DinoTrainingArguments:
    settings = {**TINY, "output_dir": str(tmp_path / "out"), "model_name_or_path": folder, "demo": True}
    return DinoTrainingArguments(**{**settings, "lora_rank": 2, "unfreeze_last_blocks": 1, **options})


def test_the_frozen_base_is_held_once_by_the_student_the_teacher_and_the_anchor(folders, tmp_path):
    args = _lora_args(folders["dinov2"], tmp_path, gram_loss_weight=1.0)
    student, teacher, _ = build_student_teacher(args)
    anchor = build_anchor(args, student.backbone)
    student_params = dict(student.backbone.model.named_parameters())
    teacher_params = dict(teacher.backbone.model.named_parameters())
    anchor_params = dict(anchor.backbone.model.named_parameters())
    frozen = [name for name, param in student_params.items() if not param.requires_grad]
    assert "embeddings.cls_token" in frozen and any(".base_layer." in name for name in frozen)
    for name in frozen:
        pointer = student_params[name].data_ptr()
        assert teacher_params[name].data_ptr() == pointer, name
        # The anchor is the start without adapters: its adapted layers hold the base weight directly.
        assert anchor_params[name.replace(".base_layer.", ".")].data_ptr() == pointer, name
    trainable = [name for name, param in student_params.items() if param.requires_grad]
    for name in trainable:
        assert teacher_params[name].data_ptr() != student_params[name].data_ptr(), name
        if ".lora_" not in name:  # the unfrozen blocks and norms at their starting values, a copy of their own
            assert anchor_params[name].data_ptr() != student_params[name].data_ptr(), name
            assert torch.equal(anchor_params[name], student_params[name]), name
    assert not any(".lora_" in name or ".base_layer." in name for name in anchor_params)
    pointers = [p.data_ptr() for module in (student, teacher, anchor) for p in module.parameters()]
    assert len(set(pointers)) == len(
        set(map(id, (*student.parameters(), *teacher.parameters(), *anchor.parameters())))
    )


def test_the_ema_averages_the_trainable_parameters_alone(folders, tmp_path):
    student, teacher, _ = build_student_teacher(_lora_args(folders["dinov2"], tmp_path))
    with torch.no_grad():
        for param in student.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    before = {name: param.clone() for name, param in teacher.named_parameters()}
    frozen_before = {name: param.clone() for name, param in student.named_parameters() if not param.requires_grad}
    ema_update_(teacher, student, 0.9)
    students = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        if students[name] is param:  # the shared base: untouched, bit for bit
            assert torch.equal(param, frozen_before[name]), name
        elif students[name].requires_grad:
            torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * students[name], rtol=0, atol=1e-6)


def _perturbed_backbone(folder, tmp_path):
    student, teacher, _ = build_student_teacher(_lora_args(folder, tmp_path))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in teacher.backbone.model.parameters():
            if param.data_ptr() not in {
                p.data_ptr() for p in student.backbone.model.parameters() if not p.requires_grad
            }:
                param.add_(0.1 * torch.randn_like(param))
    return teacher.backbone


def _peft_difference(merged, adapter, start: str, feature: str = "pooler_output") -> tuple[float, float]:
    """In a process without dino_hf, in fp32: the largest difference between the features of the `merged` export
    and of the `adapter` applied by peft to `start`, and between the export's and the start's."""
    script = f"""
import sys, torch
from transformers import AutoModel
from peft import PeftModel
merged = AutoModel.from_pretrained({str(merged)!r}).eval()
adapted = PeftModel.from_pretrained(AutoModel.from_pretrained({start!r}), {str(adapter)!r}).eval()
start = AutoModel.from_pretrained({start!r}).eval()
assert type(merged).__name__ == type(start).__name__
assert {{p.dtype for p in merged.parameters()}} == {{torch.float32}}
assert "dino_hf" not in sys.modules
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b, c = (m(pixel_values=x).{feature} for m in (merged, adapted, start))
print(float((a - b).abs().max()), float((a - c).abs().max()))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV)
    assert completed.returncode == 0, completed.stderr
    difference, moved = map(float, completed.stdout.split()[-2:])
    return difference, moved


@pytest.mark.parametrize("family", ["dinov2", "dinov3_vit", "vit"])
def test_the_merged_export_equals_the_adapter_applied_by_peft_without_dino_hf(folders, tmp_path, family):
    backbone = _perturbed_backbone(folders[family], tmp_path)
    base_weights = {name: p.clone() for name, p in backbone.model.named_parameters() if ".base_layer." in name}
    save_adapter(backbone, backbone.lora_setup, tmp_path / "adapter")
    export_backbone(merged_backbone(backbone), tmp_path / "merged", image_size=32)
    for name, param in backbone.model.named_parameters():  # merging leaves the teacher's base as it was
        if name in base_weights:
            assert torch.equal(param, base_weights[name]), name
    feature = "last_hidden_state[:, 0]" if family == "vit" else "pooler_output"
    difference, moved = _peft_difference(tmp_path / "merged", tmp_path / "adapter", folders[family], feature)
    assert difference < 1e-5
    assert moved > 1e-3  # the adapter changed the features: the comparison is not between two starts
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == folders[family]
    assert config["r"] == 2 and config["lora_alpha"] == 2


@pytest.mark.parametrize(
    "option, message",
    [
        ({"lora_rank": 0, "unfreeze_last_blocks": 1}, "turn LoRA on"),
        ({"freeze_blocks": 1}, "LoRA already freezes"),
        ({"gram_teacher": "ema", "gram_loss_weight": 1.0}, "second copy"),
        ({"push_adapter": True}, "--push_to_hub"),
    ],
)
def test_options_that_do_not_go_with_lora_are_refused(folders, tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        _lora_args(folders["dinov2"], tmp_path, **option)


def _run_options(data, folders, **more) -> dict:
    """A LoRA run of the Dinov2 start on the `data` images, with the Gram anchor to the start."""
    return dict(
        model_name_or_path=folders["dinov2"],
        train_dir=str(data / "images"),
        lora_rank=2,
        unfreeze_last_blocks=1,
        gram_loss_weight=1.0,
        learning_rate=0.05,
        warmup_epochs=0,
        head_warmup_steps=0,
        **more,
    )


def _resumed_run(options: dict, output_dir, straight, parts: tuple[str, ...]):
    """2 steps, then a resume to 4 in `output_dir`; each of `parts` of its checkpoint equals the 4-step
    `straight` run's, bit for bit. Returns the keys of the compared tensors, by part."""
    train_in_process(**options, output_dir=str(output_dir), max_train_steps=2)
    resumed = train_in_process(
        **options, output_dir=str(output_dir), max_train_steps=4, resume_from_checkpoint="latest"
    )
    keys = {}
    for part in parts:
        got, want = saved(resumed.checkpoint, part), saved(straight.checkpoint, part)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
        keys[part] = set(want)
    return keys


@pytest.mark.slow
def test_checkpoints_hold_no_base_weight_resume_exactly_and_refuse_another_base(data, folders, tmp_path):
    options = _run_options(data, folders)
    straight = train_in_process(**options, output_dir=str(tmp_path / "straight"), max_train_steps=4)
    final = straight.checkpoint
    student = load_file(final / "student.safetensors")
    assert not any(".base_layer." in key or "embeddings." in key for key in student)
    assert any(".lora_B." in key for key in student) and "head.last_layer.weight_v" in student
    assert json.loads((final / "lora_base.json").read_text())["base"] == folders["dinov2"]
    lora_b = [value for key, value in student.items() if ".lora_B." in key]
    assert all(value.abs().sum() > 0 for value in lora_b)  # the factors trained

    resumed_dir = tmp_path / "resumed"
    _resumed_run(options, resumed_dir, straight, ("student", "teacher"))

    other = _saved(tf.Dinov2Model(tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2)), tmp_path / "other")
    argv = pretrain_arguments(data, resumed_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "6")
    argv[argv.index("--model_name_or_path") + 1] = other
    argv += ["--lora_rank", "2", "--unfreeze_last_blocks", "1", "--gram_loss_weight", "1.0"]
    completed = run_cli(*argv)
    assert completed.returncode == 2, completed.stderr
    assert "other weights" in completed.stderr and "sha256" in completed.stderr


def _perturbed_trainable_(network: nn.Module, seed: int) -> None:
    """Move every trainable parameter of `network` by seeded noise (B starts at zero: A would get no gradient)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("family", ["dinov2", "dinov3_vit", "vit"])
def test_a_base_held_in_bf16_computes_the_same_step_bit_for_bit_under_bf16_autocast(folders, tmp_path, family):
    args = _lora_args(folders[family], tmp_path, gram_loss_weight=1.0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for base_dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        student, teacher, _ = build_student_teacher(args, base_dtype=base_dtype)
        anchor = build_anchor(args, student.backbone)
        _perturbed_trainable_(student, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, tokens = student.backbone.forward_tokens(x)
            _, anchor_tokens = anchor(x)
            teacher_output = teacher(x)
            loss = features.float().square().mean() + (tokens.float() - anchor_tokens.float()).square().mean()
        loss.backward()
        grads = {name: p.grad for name, p in student.backbone.named_parameters() if p.requires_grad}
        results.append((loss.detach(), teacher_output, grads))
    (loss, teacher_output, grads), (held_loss, held_teacher_output, held_grads) = results
    assert torch.equal(held_loss, loss) and torch.equal(held_teacher_output, teacher_output)
    assert held_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(held_grads[name], grad), name

    # What is held in bf16: the frozen Linear layers' weights, shared by the three networks; nothing else.
    layers = nn.Linear
    layer_params = {
        f"{n}.{p}"
        for n, m in student.backbone.model.named_modules()
        if isinstance(m, layers)
        for p, _ in m.named_parameters(recurse=False)
    }
    anchor_params = dict(anchor.backbone.model.named_parameters())
    for name, param in teacher.backbone.model.named_parameters():
        student_param = dict(student.backbone.model.named_parameters())[name]
        held = name in layer_params and not student_param.requires_grad
        assert param.dtype == (torch.bfloat16 if held else torch.float32), name
        if held:
            assert param.data_ptr() == student_param.data_ptr()
            assert anchor_params[name.replace(".base_layer.", ".")].data_ptr() == param.data_ptr(), name
    assert student.backbone.lora_setup.base_dtype == torch.bfloat16


def test_the_base_is_held_in_the_dtype_of_mixed_precision_when_the_start_can_be_read_again(folders, tmp_path):
    args = _lora_args(folders["dinov2"], tmp_path)
    assert lora_base_dtype(args, "bf16") == torch.bfloat16 and lora_base_dtype(args, "fp16") == torch.float16
    assert lora_base_dtype(args, "no") is None and lora_base_dtype(args, "fp8") is None
    full = _lora_args(folders["dinov2"], tmp_path, lora_rank=0, unfreeze_last_blocks=0)
    assert lora_base_dtype(full, "bf16") is None
    # Random weights (a preset) cannot be read again for the export: they stay as built.
    preset = _lora_args(None, tmp_path, model_name_or_path="vit_tiny_patch16", global_crops_size=32)
    assert lora_base_dtype(preset, "bf16") is None


def test_the_full_precision_copy_is_the_run_in_fp32_and_refuses_a_start_that_changed(folders, tmp_path):
    args = _lora_args(folders["dinov2"], tmp_path)
    torch.manual_seed(1)
    _, reference, _ = build_student_teacher(args)
    torch.manual_seed(1)
    _, teacher, _ = build_student_teacher(args, base_dtype=torch.bfloat16)
    for network in (reference, teacher):
        _perturbed_trainable_(network, 2)  # the teacher's own tensors (its EMA), the same in both
        network.requires_grad_(False)
    start, _ = student_backbone(args)
    copied = with_base_of(teacher, start)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(copied.backbone(x), reference.backbone(x))
    assert {p.dtype for p in copied.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32, torch.bfloat16}  # left as it was
    shared = {p.data_ptr() for p in teacher.parameters() if p.dtype == torch.float32}
    assert shared <= {p.data_ptr() for p in copied.parameters()}  # the trained tensors are not copied
    with pytest.raises(ValueError, match="merge the adapters into its copy"):
        merged_backbone(teacher.backbone)
    merged_backbone(copied.backbone)

    other = _saved(tf.Dinov2Model(tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2)), tmp_path / "other")
    changed, _ = student_backbone(_lora_args(other, tmp_path))
    with pytest.raises(ValueError, match="no longer holds the weights this run started from"):
        with_base_of(teacher, changed)


@pytest.mark.slow
def test_a_bf16_run_holds_its_base_in_bf16_resumes_exactly_and_exports_in_full_precision(
    data, labelled_images, folders, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("dino_hf.training.plan.cpu_has_bf16", lambda: True)  # bf16 autocast on any CPU
    options = _run_options(data, folders, mixed_precision="bf16", eval_train_dir=str(labelled_images), eval_steps=2)
    straight = train_in_process(**options, output_dir=str(tmp_path / "straight"), max_train_steps=4)
    assert f"sharing the frozen {folders['dinov2']} (held in bfloat16)" in capsys.readouterr().out
    # The k-NN saw the start and each teacher in full precision (a bf16 base under fp32 inputs would not run).
    assert straight.knn_start and straight.knn and straight.knn_best_step is not None

    keys = _resumed_run(options, tmp_path / "resumed", straight, ("student", "teacher", "gram_teacher"))
    for part, names in keys.items():
        assert not any(".base_layer." in key for key in names), part

    # The export merges the adapters into the start read again in fp32: peft's adapter on the fp32 start agrees
    # (the best is the start here: the k-NN of the two colours is 100 % throughout, and a tie keeps the earlier).
    for export, adapter in (
        ("teacher_backbone", "teacher_adapter"),
        ("teacher_backbone_best", "teacher_adapter_best"),
    ):
        difference, moved = _peft_difference(
            straight.output_dir / export, straight.output_dir / adapter, folders["dinov2"]
        )
        assert difference < 1e-5, export
        assert (moved > 1e-4) == (export == "teacher_backbone"), (export, moved)


def test_the_lora_config_is_the_continued_pretraining_config_with_explora_choices():
    base = yaml.safe_load((REPO / "configs" / "continue_pretraining.yaml").read_text())
    lora = yaml.safe_load((REPO / "configs" / "continue_pretraining_lora.yaml").read_text())
    changed = {key: value for key, value in lora.items() if base.get(key, "unset") != value}
    assert changed == {
        "lora_rank": 64,
        "lora_alpha": 64,
        "lora_dropout": 0.0,
        "unfreeze_last_blocks": 1,
        "output_dir": "outputs/dino-continued-lora",
    }
    assert set(base) <= set(lora)
