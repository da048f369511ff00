"""Tests of dino_hf/export.py, model_card.py and hub.py: exports that load, model cards, and uploads to a
fake Hub on 127.0.0.1."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hub_server import FakeHub
from huggingface_hub import ModelCard
from PIL import Image
from tiny import TINY_VIT
from transformers import AutoImageProcessor, AutoModel, TimmWrapperModel, pipeline

import dino_hf  # noqa: F401  (registers DinoModel with AutoModel)
from dino_hf import DinoConfig, DinoModel
from dino_hf.convert.export import export_backbone
from dino_hf.hub.model_card import EvalFigure, model_card_template_path, render_model_card
from dino_hf.hub.push import HubPusher
from dino_hf.models.backbones import build_backbone

TOKEN = "hf_dinoTestToken0123456789abcdef"
REPO = "dino-org/tiny-dino"


def tiny_dino() -> DinoModel:
    torch.manual_seed(0)
    config = DinoConfig(**TINY_VIT)
    return DinoModel(config).eval()


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def hub(tmp_path):
    with FakeHub(tmp_path / "hub") as server:
        yield server


@pytest.fixture
def staging_root(tmp_path, monkeypatch):
    """HubPusher's staging copies go here, so tests can check that they are cleaned up."""
    root = tmp_path / "staging"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def card_for(model, **kwargs) -> ModelCard:
    return render_model_card(model, REPO, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Export


def test_dino_export_pushed_arrives_intact_and_loads(tmp_path, hub, staging_root):
    model = tiny_dino()
    export = export_backbone(model, tmp_path / "export", image_size=32, model_card=card_for(model, steps=10))
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_dino.py",
        "configuration_dino.py",
    } <= set(os.listdir(export))
    before = file_hashes(export)

    pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=0.01)
    pusher.push(export, "step 10")
    report = pusher.finish(timeout=60)

    assert report.final_uploaded and report.uploaded == ("step 10",) and not report.failed
    uploaded = hub.repo_path(REPO)
    assert file_hashes(uploaded) == before  # every file arrived, byte-equal
    assert file_hashes(export) == before  # the local export was not touched
    assert list(staging_root.iterdir()) == []  # the staging copy was removed
    loaded = AutoModel.from_pretrained(uploaded).eval()
    assert type(loaded) is DinoModel
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, model(pixels).pooler_output, rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained(uploaded)
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 37}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(uploaded), pool=True)  # as the card shows
    with torch.no_grad():
        expected = model(processor(image, return_tensors="pt").pixel_values).pooler_output
    torch.testing.assert_close(extractor(image, return_tensors=True), expected)


def test_timm_export_loads_in_timm_and_transformers(tmp_path):
    backbone = build_backbone("timm:vit_tiny_patch16_224", image_size=32, depth=2, embed_dim=32, num_heads=2)
    export = export_backbone(backbone, tmp_path / "timm_export", image_size=32)
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 0 and config["num_features"] == 32
    assert "num_classes" not in config["model_args"]  # TimmWrapperModel passes it itself
    cfg = config["pretrained_cfg"]
    assert cfg["tag"] == "dino" and "license" not in cfg
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    assert cfg["crop_pct"] == pytest.approx(224 / 256) and cfg["interpolation"] == "bicubic"

    model = backbone.model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    reloaded = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    wrapped = AutoModel.from_pretrained(export).eval()
    assert isinstance(wrapped, TimmWrapperModel)
    with torch.no_grad():
        expected = model(pixels)
        torch.testing.assert_close(reloaded(pixels), expected, rtol=0, atol=0)
        torch.testing.assert_close(wrapped(pixel_values=pixels).pooler_output, expected, rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained(export)  # transformers reads timm's pretrained_cfg
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert processor(image, return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=reloaded))
    assert "Resize(size=36, interpolation=bicubic" in str(transform)  # 32 / crop_pct 0.875, as DINO's 224 / 256


def test_export_replaces_the_folder_whole_and_refuses_other_modules(tmp_path):
    first, second = tiny_dino(), tiny_dino()
    with torch.no_grad():
        second.layernorm.bias.fill_(1.0)
    target = tmp_path / "export"
    export_backbone(first, target, image_size=32)
    (target / "stale.txt").write_text("from an older export")
    export_backbone(second, target, image_size=32)
    assert not (target / "stale.txt").exists()
    torch.testing.assert_close(DinoModel.from_pretrained(target).layernorm.bias, torch.ones(32))
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folders left behind

    with pytest.raises(TypeError, match="expected a DinoModel, a transformers model or a timm model"):
        export_backbone(torch.nn.Linear(2, 2), target)
    torch.testing.assert_close(DinoModel.from_pretrained(target).layernorm.bias, torch.ones(32))
    assert sorted(os.listdir(tmp_path)) == ["export"]


# ---------------------------------------------------------------------------------------------------
# Model card

# Unrendered template syntax, unset values, notes, empty bullets, empty table cells.
PLACEHOLDERS = re.compile(r"None|\{\{|\{%|\}\}|TODO|FIXME|^[ \t]*[-*][ \t]*$|\|[ \t]*\|", re.MULTILINE)


def test_card_with_evaluation_has_parsable_metadata_and_no_placeholders(tmp_path):
    model = tiny_dino()
    figures = [
        EvalFigure("k-NN top-1 (k=20)", 61.234, "cifar10", "test"),
        EvalFigure("k-NN top-5 (k=20)", 90.0, "cifar10", "test"),
    ]
    card = card_for(
        model,
        training_args={"learning_rate": 5e-4, "hub_token": TOKEN, "global_crops_scale": (0.4, 1.0), "seed": None},
        datasets=["cifar10", str(tmp_path)],
        steps=1200,
        epochs=3,
        hardware="2 CPU cores",
        evaluation=figures,
    )
    text = str(card)
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.search(text)
    assert TOKEN not in text and "hub_token" not in text and "seed" not in text
    assert "| `global_crops_scale` | 0.4, 1.0 |" in text and "1,200 steps, 3 epochs" in text
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.pipeline_tag == "image-feature-extraction"
    assert loaded.data.library_name == "transformers"
    assert loaded.data.datasets == ["cifar10"]  # the local folder is not a Hub dataset
    assert {"dino", "self-supervised"} <= set(loaded.data.tags)
    assert loaded.data.model_name == "tiny-dino"
    assert [(r.metric_name, r.metric_value, r.dataset_split) for r in loaded.data.eval_results] == [
        ("k-NN top-1 (k=20)", 61.23, "test"),
        ("k-NN top-5 (k=20)", 90.0, "test"),
    ]
    assert f'AutoModel.from_pretrained("{REPO}")' in text and '"image-feature-extraction"' in text
    assert "to_timm_model" in text  # eps 1e-6 and GELU: the timm conversion applies


def test_card_without_data_leaves_sections_out():
    text = str(card_for(tiny_dino()))
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.search(text)
    assert "## Evaluation" not in text and "model-index" not in text and "Recipe" not in text
    assert "Hardware" not in text and "Data (no labels used)" not in text
    assert ModelCard(text).data.eval_results is None


def test_card_lists_the_dinov2_options_that_are_on():
    plain = str(card_for(tiny_dino()))
    assert "layerscale_value" not in plain and "num_register_tokens" not in plain
    torch.manual_seed(0)
    config = DinoConfig(**TINY_VIT, num_register_tokens=4, layerscale_value=1e-5, drop_path_uniform=True)
    text = str(card_for(DinoModel(config).eval()))
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.search(text)
    for row in ("num_register_tokens", "4"), ("layerscale_value", "1e-05"), ("drop_path_uniform", "True"):
        assert re.search(rf"\|\s*`?{row[0]}`?\s*\|\s*`?{re.escape(row[1])}`?\s*\|", text), row
    assert "use_mask_token" not in text


def test_timm_card_loads_with_timm_and_templates_resolve():
    backbone = build_backbone("timm:test_resnet", image_size=32)
    text = str(render_model_card(backbone, REPO, image_size=32))
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.search(text)
    assert ModelCard(text).data.library_name == "timm"
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in text
    assert "Patch size" not in text and "dino_hf.convert.export" not in text
    assert "| Input | 32 x 32 px" in text
    assert model_card_template_path() == Path(__file__).resolve().parent.parent / "model_cards" / "backbone.md"


# ---------------------------------------------------------------------------------------------------
# Uploads under faults


def export_with_marker(folder: Path, marker: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "step.txt").write_text(marker)
    return folder


def test_5xx_and_429_are_retried_until_the_upload_succeeds(tmp_path, hub, staging_root):
    statuses = [500, 429, 503]
    folder = export_with_marker(tmp_path / "export", "step 5")
    for status in statuses:
        hub.fail_next(1, status)
    pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=0.01)
    pusher.push(folder, "step 5")
    report = pusher.finish(timeout=60)
    assert report.final_uploaded and not report.failed
    assert pusher.retries == len(statuses)
    assert [path for _, path, _ in hub.requests[: len(statuses) + 1]] == ["/api/repos/create"] * (len(statuses) + 1)
    assert (hub.repo_path(REPO) / "step.txt").read_text() == "step 5"
    assert list(staging_root.iterdir()) == []


def test_hub_down_for_good_gives_a_report_and_never_raises(tmp_path, staging_root):
    down = FakeHub(tmp_path / "gone")
    down.stop()  # nothing listens on its port any more
    pusher = HubPusher(REPO, token=TOKEN, endpoint=down.url, max_retries=2, backoff=0.01)
    pusher.push(export_with_marker(tmp_path / "export", "a"), "step 1")
    report = pusher.finish(timeout=60)
    assert not report.final_uploaded and report.uploaded == ()
    assert [(f.label, f.attempts) for f in report.failed] == [("step 1", 3)]
    assert "ConnectError" in report.failed[0].error and pusher.retries == 2
    assert list(staging_root.iterdir()) == []


def test_client_errors_fail_at_once(tmp_path, hub):
    hub.fail_next(10, 403)
    pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=0.01)
    pusher.push(export_with_marker(tmp_path / "export", "a"), "step 1")
    report = pusher.finish(timeout=60)
    assert [(f.label, f.attempts) for f in report.failed] == [("step 1", 1)] and pusher.retries == 0
    assert "403" in report.failed[0].error


def test_newer_push_supersedes_a_queued_one_and_snapshots_are_isolated(tmp_path, hub):
    hub.delay = 0.15
    folder = export_with_marker(tmp_path / "export", "A")
    pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=0.01)
    pusher.push(folder, "A")
    deadline = time.monotonic() + 10
    while not hub.requests and time.monotonic() < deadline:  # A is being uploaded
        time.sleep(0.01)
    export_with_marker(folder, "B")  # a later save while A uploads
    pusher.push(folder, "B")
    export_with_marker(folder, "C")
    pusher.push(folder, "C")
    report = pusher.finish(timeout=60)
    assert report.uploaded == ("A", "C") and report.superseded == ("B",) and report.final_uploaded
    sha = {m: hashlib.sha256(m.encode()).hexdigest() for m in "AC"}
    assert [(c["summary"], c["files"]["step.txt"]) for c in hub.commits] == [("A", sha["A"]), ("C", sha["C"])]


def test_newer_push_ends_the_back_off_of_a_failed_one(tmp_path, hub):
    hub.fail_next(1, 502)
    pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=60.0)
    started = time.monotonic()
    pusher.push(export_with_marker(tmp_path / "a", "A"), "A")
    deadline = time.monotonic() + 10
    while pusher.retries == 0 and time.monotonic() < deadline:  # A failed and waits 60 s to retry
        time.sleep(0.01)
    pusher.push(export_with_marker(tmp_path / "b", "B"), "B")
    report = pusher.finish(timeout=30)
    assert report.superseded == ("A",) and report.uploaded == ("B",) and report.final_uploaded
    assert time.monotonic() - started < 30  # B did not wait for A's back-off
    assert (hub.repo_path(REPO) / "step.txt").read_text() == "B"


def test_push_never_waits_and_finish_reports_unfinished_uploads(tmp_path, hub):
    hub.delay = 1.0
    pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=0.01)
    started = time.monotonic()
    pusher.push(export_with_marker(tmp_path / "export", "A"), "slow")
    assert time.monotonic() - started < 0.5
    report = pusher.finish(timeout=0.2)
    assert report.unfinished == ("slow",) and not report.final_uploaded and report.uploaded == ()
    with pytest.raises(RuntimeError, match="finish"):
        pusher.push(tmp_path / "export")


def test_token_never_in_logs_files_or_cards(tmp_path, hub, caplog, capfd):
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "httpx2", "dino_hf")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    try:
        model = tiny_dino()
        card = card_for(model, training_args={"hub_token": TOKEN, "hub_model_id": REPO})
        export = export_backbone(model, tmp_path / "export", image_size=32, model_card=card)
        hub.fail_next(1, 500)
        hub.fail_next(1, 429)
        pusher = HubPusher(REPO, token=TOKEN, endpoint=hub.url, backoff=0.01)
        pusher.push(export, "step 1")
        report = pusher.finish(timeout=60)
        down = HubPusher(REPO, token=TOKEN, endpoint="http://127.0.0.1:9", max_retries=1, backoff=0.01)
        down.push(export, "step 2")
        failed = down.finish(timeout=60)
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    assert report.final_uploaded and failed.failed
    assert ("POST", "/api/repos/create", f"Bearer {TOKEN}") in hub.requests  # the token was used
    assert "retrying" in caplog.text and "failed after 2 attempt(s)" in caplog.text  # the logs were captured
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, str(card), repr(pusher), str(report), str(failed)):
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_push_through_hf_endpoint_in_a_subprocess(tmp_path, hub):
    """huggingface_hub reads HF_ENDPOINT when it is imported: the client runs in a child process."""
    folder = export_with_marker(tmp_path / "export", "from a child")
    script = textwrap.dedent(f"""
        import json
        from dino_hf.hub.push import HubPusher
        pusher = HubPusher({REPO!r}, token={TOKEN!r}, backoff=0.01)
        pusher.push({str(folder)!r}, "child")
        report = pusher.finish(timeout=60)
        print(json.dumps({{"uploaded": report.uploaded, "endpoint": repr(pusher)}}))
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["uploaded"] == ["child"] and hub.url in answer["endpoint"]
    assert (hub.repo_path(REPO) / "step.txt").read_text() == "from a child"
    assert TOKEN not in result.stdout + result.stderr
