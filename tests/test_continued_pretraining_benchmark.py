"""benchmarks/continued_pretraining.py: the recipes' warm-ups scale with the run, the LoRA recipe differs from the
full one by LoRA alone, the weights' movement is measured per part, and the seeds are summarised per recipe."""

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import continued_pretraining as benchmark  # noqa: E402

from dino_hf.training.arguments import parse_training_args


def _parsed(recipe: str, steps: int, image_dir: str) -> dict:
    flags = benchmark.RECIPES[recipe]
    argv = flags + benchmark.warmups(flags, steps) + benchmark.BUDGET
    argv += ["--train_dir", image_dir, "--max_steps", str(steps), "--model_name_or_path", "vit_tiny_patch8"]
    return parse_training_args(argv).to_dict()


def test_each_warm_up_is_a_fifth_of_the_run_and_the_recipes_differ_by_lora_alone(tmp_path):
    full = _parsed("(b) continue_pretraining.yaml", 280, str(tmp_path))
    lora = _parsed("(d) continue_pretraining_lora.yaml", 280, str(tmp_path))
    plain = _parsed("(a) DINO, no safeguards", 280, str(tmp_path))
    assert (full["head_warmup_steps"], full["backbone_warmup_steps"]) == (56, 56)
    assert (plain["head_warmup_steps"], plain["gram_loss_weight"]) == (0, 0.0)
    differ = {name for name in full if full[name] != lora[name]}
    assert differ == {"lora_rank", "lora_alpha", "unfreeze_last_blocks", "output_dir"}
    # The benchmark's budget overrides the configs' learning rate and momentum, the same for every recipe.
    assert full["learning_rate"] == lora["learning_rate"] == plain["learning_rate"] == 0.002


def _save_vit(folder: Path, seed: int) -> transformers.Dinov2Model:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = transformers.Dinov2Model(config)
    model.save_pretrained(folder)
    return model


def test_movement_is_the_relative_change_of_each_part(tmp_path):
    model = _save_vit(tmp_path / "start", 0)
    with torch.no_grad():
        block = model.encoder.layer[1]
        before = torch.cat([p.flatten() for p in block.state_dict().values() if p.is_floating_point()])
        block.mlp.fc1.weight.add_(0.5)
    model.save_pretrained(tmp_path / "moved")
    moved = benchmark.movement(tmp_path / "start", tmp_path / "moved")
    expected = 100 * (0.5 * block.mlp.fc1.weight.numel() ** 0.5) / before.norm().item()
    assert moved["block 1"] == pytest.approx(expected, rel=1e-4)
    assert moved["block 0"] == moved["embeddings"] == moved["rest"] == 0.0


def test_the_seed_summary_gives_each_seeds_change_from_the_start():
    rows = [{"start": "vit", "recipe": "(c) frozen start", "domain start": 20.0, "domain end": 20.0}]
    for seed, end in enumerate((21.0, 19.5)):
        row = {"start": "vit", "recipe": "(b)", "seed": seed, "domain start": 20.0, "domain end": end}
        rows.append({**row, "release end": 30.0 + seed})
    summary = benchmark.seed_summary(rows).splitlines()
    assert len(summary) == 3  # the header, its rule and the one recipe with seeds
    assert summary[2] == "| vit | (b) | 20.0 | 20.2 | +1.0, -0.5 | 30.5 |"
