"""The run's own state, beside the weights: what `trainer_state.json` of a checkpoint holds."""

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunState:
    """Counters and figures of a run, saved with each checkpoint and restored on resume.

    `global_step`: optimisation steps done; `nonfinite_skipped`: steps skipped on a non-finite loss;
    `skipped_samples`: images skipped by reason; `stream_retries`: stream reads retried;
    `knn_start` / `knn`: the k-NN figures of the teacher at step 0 (random-init or the starting
    weights) and of the latest one; `knn_best` / `knn_best_step`: the figures of the best k-NN measured
    so far (`dino_hf.training.guard`) and its step (None before the first measurement);
    `num_processes`: the processes that wrote the checkpoint (their data positions).
    """

    global_step: int = 0
    nonfinite_skipped: int = 0
    skipped_samples: dict = field(default_factory=dict)
    stream_retries: int = 0
    knn_start: dict = field(default_factory=dict)
    knn: dict = field(default_factory=dict)
    knn_best: dict = field(default_factory=dict)
    knn_best_step: int | None = None
    num_processes: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})


__all__ = ["RunState"]
