"""Export of a trained backbone as a model folder, its model card, and background uploads to the Hub.

- `export_backbone` writes the teacher backbone as a folder that loads without dino_hf's training
  code: a `DinoModel` through `save_pretrained` (`AutoModel`, `pipeline("image-feature-extraction")`),
  a timm model as a timm folder (`timm.create_model("local-dir:PATH")` and transformers'
  `TimmWrapperModel`), both with DINO's evaluation transform as their image preprocessing.
- `render_model_card` fills `model_cards/backbone.md` from real values; a section whose data is
  unknown is left out rather than shown empty.
- `HubPusher` uploads export folders in a background thread: training never waits for the network,
  failed uploads are retried with exponential back-off and reported, never raised. The token lives
  only in memory, inside `huggingface_hub.HfApi`; it is never logged, written or put in a card.
"""

import dataclasses
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx2
import timm.models
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from .backbones import DinoModelBackbone, TimmBackbone
from .modeling_dino import IMAGENET_MEAN, IMAGENET_STD, DinoModel, dino_image_processor

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = "backbone.md"
# Keys of a timm `pretrained_cfg` that describe the exported weights and their preprocessing; the others
# (tag, license, origin_url, paper_ids, ...) describe the weights the architecture was published with.
_TIMM_CFG_KEYS = (
    "custom_load", "input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier",
)
_SECRET_WORDS = ("token", "secret", "password")
_DINO_CITATION_ARXIV = "arxiv:2104.14294"


# ---------------------------------------------------------------------------------------------------
# Export


def export_backbone(
    backbone_model: nn.Module, output_dir: str | Path, *, image_size: int = 224, model_card: ModelCard | None = None
) -> Path:
    """Write `backbone_model` (a `DinoModel`, a timm model, or their `build_backbone` wrappers) to the
    folder `output_dir`, replacing it whole.

    DINO's evaluation transform at `image_size` (resize 256/224 x `image_size` bicubic, centre crop,
    ImageNet mean and std) goes with the weights. A DinoModel folder holds config.json,
    model.safetensors, its modeling code and preprocessor_config.json. A timm folder holds
    model.safetensors and config.json (`architecture`, `num_classes: 0`, `num_features`, `model_args`,
    and the transform as `pretrained_cfg`, which both timm and transformers' `AutoImageProcessor`
    read for timm models). README.md is written when `model_card` is given. The folder is written
    under a temporary name and renamed, so an interrupted export never leaves a half-written folder.
    Returns `output_dir`.
    """
    model = backbone_model.model if isinstance(backbone_model, (TimmBackbone, DinoModelBackbone)) else backbone_model
    output_dir = Path(output_dir).resolve()
    staging = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if isinstance(model, DinoModel):
            model.save_pretrained(staging)
            dino_image_processor(image_size).save_pretrained(staging)
        elif _is_timm_model(model):
            _save_timm_folder(model, staging, image_size)
        else:
            raise TypeError(
                f"cannot export a {type(model).__name__}: expected a DinoModel or a timm model "
                "(or the TimmBackbone / DinoModelBackbone that build_backbone returns)"
            )
        if model_card is not None:
            model_card.save(staging / "README.md")
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _is_timm_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and hasattr(model, "num_features")


def _save_timm_folder(model: nn.Module, folder: Path, image_size: int) -> None:
    """timm's own `save_for_hf` (safetensors), with the config made loadable by transformers too.

    `model_args` loses `num_classes` (kept at the top level and in `pretrained_cfg`): transformers'
    `TimmWrapperModel` passes num_classes=0 itself and fails on a duplicate. `pretrained_cfg` is DINO's
    evaluation transform (bicubic, crop 224/256, ImageNet mean and std), as in `convert.save_as_timm`.
    """
    if model.num_classes != 0:
        raise ValueError(
            f"the timm model has a {model.num_classes}-class classifier; DINO backbones are built with "
            "num_classes=0 (build_backbone does this): export the backbone, not a classifier"
        )
    data_config = dict(
        input_size=(3, image_size, image_size), interpolation="bicubic", crop_pct=224 / 256, crop_mode="center",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )
    timm.models.save_for_hf(model, folder, safe_serialization=True, data_config=data_config)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    source_cfg = config["pretrained_cfg"]
    config["pretrained_cfg"] = {"tag": "dino", **{key: source_cfg[key] for key in _TIMM_CFG_KEYS if key in source_cfg}}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`; an older `target` is removed once replaced."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        new.rename(target)


# ---------------------------------------------------------------------------------------------------
# Model card


@dataclasses.dataclass(frozen=True)
class EvalFigure:
    """One measured accuracy for the model card and its `model-index`.

    Args:
        name (`str`): what was measured, e.g. `"k-NN top-1 (k=20)"` or `"linear probe top-1"`.
        value (`float`): the accuracy in percent, e.g. `74.5`.
        dataset (`str`): the evaluation dataset, a Hub id where there is one (e.g. `"imagenet-1k"`).
        split (`str`, defaults to `"validation"`): the split the figure was measured on.
    """

    name: str
    value: float
    dataset: str
    split: str = "validation"


def model_card_template_path(name: str = MODEL_CARD_TEMPLATE) -> Path:
    """Path of a model card template: `model_cards/<name>` of a source checkout, else the copy
    installed with the package (`dino_hf.model_cards`)."""
    in_checkout = Path(__file__).resolve().parent.parent / "model_cards" / name
    if in_checkout.is_file():
        return in_checkout
    try:
        installed = importlib.resources.files("dino_hf.model_cards") / name
    except ModuleNotFoundError:
        installed = None
    if installed is not None and installed.is_file():
        return Path(str(installed))
    raise FileNotFoundError(
        f"model card template {name!r} not found in {in_checkout.parent} nor in the installed package "
        "(dino_hf.model_cards); reinstall dino_hf or run from a source checkout"
    )


def render_model_card(
    model: nn.Module,
    model_id: str,
    *,
    training_args: Mapping[str, Any] | Any = None,
    datasets: Sequence[str] = (),
    steps: int | None = None,
    epochs: float | None = None,
    hardware: str | None = None,
    evaluation: Sequence[EvalFigure] = (),
    base_model: str | None = None,
    license: str = "apache-2.0",
    image_size: int | None = None,
) -> ModelCard:
    """The model card of an exported backbone, rendered from `model_cards/backbone.md`.

    Args:
        model: the exported backbone: a `DinoModel`, a timm model or a `build_backbone` wrapper.
        model_id: the Hub id (or folder) that the card's loading snippets use.
        training_args: the resolved training hyperparameters (a mapping or a dataclass such as
            `DinoTrainingArguments`); fields that hold secrets (`*token*`) and unset fields are left out.
        datasets: the pretraining data; names that look like Hub dataset ids go into the metadata.
        steps, epochs: how long the model was trained.
        hardware: e.g. `"8x A100 80GB, 21 h"`.
        evaluation: measured figures; they go into the card and its `model-index`.
        base_model: the Hub id of the weights training started from, if any.
        license: the license of the weights.
        image_size: the crop size of the exported preprocessing (`export_backbone(image_size=...)`);
            defaults to the size the model was built for.

    Sections whose data is unknown (no evaluation, no recipe) are left out, so the card never shows an
    empty field or a placeholder.
    """
    model = model.model if isinstance(model, (TimmBackbone, DinoModelBackbone)) else model
    description = _describe(model, model_id)
    description["image_size"] = image_size or description["image_size"]
    title = model_id.rstrip("/").split("/")[-1]
    hub_datasets = [name for name in datasets if _looks_like_hub_id(name)]
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=figure.dataset,
            dataset_name=figure.dataset,
            dataset_split=figure.split,
            metric_type="accuracy",
            metric_name=figure.name,
            metric_value=round(float(figure.value), 2),
        )
        for figure in evaluation
    ]
    card_data = ModelCardData(
        library_name=description["library_name"],
        pipeline_tag="image-feature-extraction",
        license=license,
        tags=["dino", "self-supervised", "image-feature-extraction", "vision", "dino_hf", _DINO_CITATION_ARXIV],
        datasets=hub_datasets or None,
        base_model=base_model,
        metrics=["accuracy"] if eval_results else None,
        eval_results=eval_results or None,
        model_name=title if eval_results else None,
    )
    progress = ", ".join(
        part for part in (f"{steps:,} steps" if steps else "", f"{epochs:g} epochs" if epochs else "") if part
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template_path()),
        title=title,
        model_id=model_id,
        datasets=list(datasets),
        progress=progress,
        hardware=hardware,
        recipe_rows=_table_rows(training_args),
        evaluation=list(evaluation),
        base_model=base_model,
        **description,
    )


def _describe(model: nn.Module, model_id: str) -> dict[str, Any]:
    """Template values that come from the model itself."""
    count = sum(p.numel() for p in model.parameters())
    num_parameters = f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"
    if isinstance(model, DinoModel):
        config = model.config
        fields = (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
            "image_size", "layer_norm_eps", "qkv_bias", "drop_path_rate",
        )
        return dict(
            library_name="transformers",
            architecture=f"DinoModel (ViT, {config.num_hidden_layers} blocks, {config.num_attention_heads} heads)",
            architecture_summary=f"Vision Transformer with {config.patch_size}x{config.patch_size} patches",
            num_parameters=num_parameters,
            feature_size=config.hidden_size,
            feature_description="the CLS token after the final LayerNorm",
            patch_size=config.patch_size,
            image_size=config.image_size,
            config_rows=[(name, getattr(config, name)) for name in fields],
            # dino_hf.convert.to_timm_model needs timm's LayerNorm eps and activation.
            timm_convertible=config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu",
        )
    if not _is_timm_model(model):
        raise TypeError(f"cannot describe a {type(model).__name__}: expected a DinoModel or a timm model")
    architecture = model.pretrained_cfg.get("architecture") or type(model).__name__
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    patch_embed = getattr(model, "patch_embed", None)
    return dict(
        library_name="timm",
        architecture=f"timm `{architecture}`",
        architecture_summary=f"timm `{architecture}` backbone",
        num_parameters=num_parameters,
        feature_size=getattr(model, "head_hidden_size", None) or model.num_features,
        feature_description="the CLS token after the final norm" if pool == "token" else "the pooled final features",
        patch_size=patch_embed.patch_size[0] if patch_embed is not None else None,
        image_size=model.pretrained_cfg.get("input_size", (3, 224, 224))[-1],
        config_rows=_table_rows(timm.models.get_model_args(model, {})),
        timm_model_name=f"hf-hub:{model_id}" if _looks_like_hub_id(model_id) else f"local-dir:{model_id}",
    )


def _table_rows(values: Mapping[str, Any] | Any) -> list[tuple[str, str]]:
    """(name, value) rows of a mapping or dataclass, without secrets and without unset values."""
    if values is None:
        return []
    if dataclasses.is_dataclass(values):
        values = {field.name: getattr(values, field.name) for field in dataclasses.fields(values)}
    rows = []
    for name, value in values.items():
        if any(word in name.lower() for word in _SECRET_WORDS) or value is None or value == "" or value == []:
            continue
        rows.append((name, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return rows


def _looks_like_hub_id(name: str) -> bool:
    """"name" or "org/name" made of the characters Hub ids allow, and not an existing local path."""
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return (
        1 <= len(parts) <= 2
        and all(part and set(part) <= allowed and not part.startswith(".") for part in parts)
        and not os.path.exists(name)
    )


# ---------------------------------------------------------------------------------------------------
# Background uploads


@dataclasses.dataclass(frozen=True)
class PushFailure:
    """A push that did not reach the Hub: its commit message, the last error (token removed) and how
    many attempts were made."""

    label: str
    error: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class PushReport:
    """What `HubPusher.finish` leaves behind.

    Attributes:
        uploaded: commit messages of the pushes that reached the Hub, in order.
        failed: pushes given up after their retries, or that could not be staged.
        superseded: pushes replaced by a newer one before they were uploaded (the newer folder holds
            everything they held).
        unfinished: pushes still queued or uploading when `finish` stopped waiting.
        final_uploaded: whether the last push reached the Hub.
    """

    uploaded: tuple[str, ...]
    failed: tuple[PushFailure, ...]
    superseded: tuple[str, ...]
    unfinished: tuple[str, ...]
    final_uploaded: bool

    def __str__(self) -> str:
        lines = [f"{len(self.uploaded)} uploaded, {len(self.failed)} failed, {len(self.superseded)} superseded, "
                 f"{len(self.unfinished)} unfinished; final state {'on' if self.final_uploaded else 'NOT on'} the Hub"]
        lines += [f"  failed: {f.label} after {f.attempts} attempt(s): {f.error}" for f in self.failed]
        lines += [f"  unfinished: {label}" for label in self.unfinished]
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    label: str
    staging: Path


class HubPusher:
    """Uploads export folders to a Hub model repository in a background thread.

    `push(folder)` copies the folder to a temporary staging folder (so the local checkpoint is never
    touched and later exports do not race the upload) and returns at once. One upload runs at a time; a
    newer push replaces a queued older one, and also one that is waiting to retry. The repository is
    created on the first upload (`exist_ok`). Connection errors, timeouts, 408, 429 and 5xx answers are
    retried with exponential back-off (`backoff`, doubling up to `max_backoff`, or the server's
    `Retry-After`); other errors (401, 403, 404, bad metadata) fail at once. Failures are logged,
    counted and kept in `.failed`; nothing is raised into the caller. `finish(timeout)` waits for the
    last upload and returns a `PushReport`.

    Args:
        repo_id (`str`): e.g. `"org/dino-vits16"`.
        token (`str`, *optional*): Hub token; defaults to the logged-in one. Kept in memory only.
        private (`bool`, defaults to `False`): create the repository as private.
        endpoint (`str`, *optional*): Hub address; defaults to `HF_ENDPOINT` or https://huggingface.co.
        max_retries (`int`, defaults to 5): retries of one push after its first attempt.
        backoff (`float`, defaults to 2.0): seconds before the first retry.
        max_backoff (`float`, defaults to 120.0): longest wait between two attempts.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        endpoint: str | None = None,
        max_retries: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 120.0,
    ):
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"max_retries, backoff and max_backoff must be >= 0, got {max_retries}, {backoff}, {max_backoff}"
            )
        self.repo_id = repo_id
        self.private = private
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retries = 0  # retries made so far, over all pushes
        self._api = HfApi(endpoint=endpoint, token=token)
        self._secret = token or get_token()  # only to scrub error messages
        self._repo_ready = False
        self._uploaded: list[str] = []
        self._failed: list[PushFailure] = []
        self._superseded: list[str] = []
        self._last_label: str | None = None
        self._queued: _Job | None = None
        self._current: _Job | None = None
        self._closing = False
        self._abandoned = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"HubPusher(repo_id={self.repo_id!r}, endpoint={self._api.endpoint!r})"

    @property
    def uploaded(self) -> list[str]:
        with self._cond:
            return list(self._uploaded)

    @property
    def failed(self) -> list[PushFailure]:
        with self._cond:
            return list(self._failed)

    def push(self, folder: str | Path, commit_message: str | None = None) -> None:
        """Queue an upload of the current contents of `folder` and return without waiting."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"nothing to push: {folder} is not a folder; write the export there first")
        label = commit_message or f"Upload {folder.name}"
        with self._cond:
            if self._closing:
                raise RuntimeError("HubPusher.finish() was called; create a new HubPusher to push again")
            self._last_label = label
        staging = Path(tempfile.mkdtemp(prefix="dino_hf-push-"))
        try:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            self._record_failure(label, f"could not copy {folder} for upload: {error}", attempts=0)
            return
        with self._cond:
            if self._queued is not None:
                self._supersede(self._queued)
            self._queued = _Job(label, staging)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dino_hf-hub-push", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def finish(self, timeout: float | None = None) -> PushReport:
        """Wait up to `timeout` seconds (forever if None) for the queued upload, then report. A push
        still running after the timeout is reported as unfinished and dropped at its next retry."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            unfinished = tuple(job.label for job in (self._current, self._queued) if job is not None)
            if unfinished:
                self._abandoned = True
                self._cond.notify_all()
            report = PushReport(
                uploaded=tuple(self._uploaded),
                failed=tuple(self._failed),
                superseded=tuple(self._superseded),
                unfinished=unfinished,
                final_uploaded=self._last_label is not None and self._last_label in self._uploaded,
            )
        log = logger.info if report.final_uploaded or self._last_label is None else logger.warning
        log("Hub uploads to %s: %s", self.repo_id, report)
        return report

    # -- worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued is not None or self._closing)
                if self._queued is None or self._abandoned:
                    if self._queued is not None:
                        shutil.rmtree(self._queued.staging, ignore_errors=True)
                    return
                job, self._queued = self._queued, None
                self._current = job
            try:
                self._upload_with_retries(job)
            finally:
                shutil.rmtree(job.staging, ignore_errors=True)
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _upload_with_retries(self, job: _Job) -> None:
        for attempt in range(1, self.max_retries + 2):
            try:
                uploaded = self._upload(job)
            except Exception as error:  # a failed upload must never reach the training loop
                message = self._redact(" ".join(f"{type(error).__name__}: {error}".split()))
                if not _is_retryable(error) or attempt > self.max_retries:
                    self._record_failure(job.label, message, attempt)
                    return
                delay = min(self.max_backoff, _retry_after(error) or self.backoff * 2 ** (attempt - 1))
                with self._cond:
                    self.retries += 1
                logger.warning(
                    "Upload of %r to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    job.label, self.repo_id, attempt, self.max_retries + 1, message, delay,
                )
                with self._cond:
                    # A newer push (or an abandoned run) ends this one's retries instead of waiting behind them.
                    self._cond.wait_for(lambda: self._queued is not None or self._abandoned, timeout=delay)
                    if self._queued is not None:
                        self._superseded.append(job.label)
                        logger.info("Upload of %r superseded by %r", job.label, self._queued.label)
                        return
                    if self._abandoned:
                        return
            else:
                if uploaded:
                    with self._cond:
                        self._uploaded.append(job.label)
                    logger.info("Uploaded %r to %s", job.label, self.repo_id)
                return

    def _upload(self, job: _Job) -> bool:
        """Create the repository if needed and upload the staged folder; False if abandoned between."""
        if not self._repo_ready:
            self._api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self._repo_ready = True
        if self._abandoned:
            return False
        self._api.upload_folder(repo_id=self.repo_id, folder_path=job.staging, commit_message=job.label)
        return True

    def _supersede(self, job: _Job) -> None:
        """Drop a queued push that a newer one replaces (called with the lock held)."""
        shutil.rmtree(job.staging, ignore_errors=True)
        self._superseded.append(job.label)

    def _record_failure(self, label: str, message: str, attempts: int) -> None:
        message = self._redact(message)
        with self._cond:
            self._failed.append(PushFailure(label, message, attempts))
        logger.error("Upload of %r to %s failed after %d attempt(s): %s", label, self.repo_id, attempts, message)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _is_retryable(error: Exception) -> bool:
    """Connection problems, timeouts, 408, 429 and 5xx are worth retrying; other answers are final."""
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status in (408, 429) or status >= 500
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def _retry_after(error: Exception) -> float | None:
    """Seconds of a `Retry-After` header on an HTTP error, if the server sent one."""
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
