"""What a run writes as it goes: the console line of a logging step, the k-NN line, the sample log."""

import json
import os

_LOGGED = (
    "loss",
    "distill_global",
    "distill_local",
    "ibot",
    "total_loss",
    "koleo",
    "gram",
    "anchor_cos",
    "lr",
    "weight_decay",
    "momentum",
    "teacher_temp",
    "teacher_entropy",
    "teacher_max_prob",
    "kl_teacher_student",
    "center_norm",
    "distinct_prototypes",
    "images_per_second",
)


class SampleLog:
    """`--log_sample_ids FILE`: one JSON line per batch, `{"step", "process", "ids"}`. All processes
    append to the same file, one write each."""

    def __init__(self, path: str, process: int):
        self.path = path
        self.process = process

    def write(self, step: int, ids: list[str]) -> None:
        line = json.dumps({"step": step, "process": self.process, "ids": list(ids)}) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)


def log_line(step: int, logs: dict) -> str:
    """The console line of a logging step: the figures of `_LOGGED` it has, then each frozen model's terms of a
    several-teacher distillation (`distill_global/<teacher>`, `distill_local/<teacher>`)."""
    parts = [f"{key}={logs[key]:.4g}" for key in _LOGGED if key in logs]
    parts += [
        f"{key}={value:.4g}" for key, value in logs.items() if key.startswith(("distill_global/", "distill_local/"))
    ]
    return f"step {step} epoch {logs['epoch']:.2f} " + " ".join(parts)


def knn_line(metrics: dict) -> str:
    return ", ".join(f"{key.removeprefix('knn_')} {value:.1f}%" for key, value in metrics.items())


__all__ = ["SampleLog", "knn_line", "log_line"]
