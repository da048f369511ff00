"""The run's own state, beside the weights: what `trainer_state.json` of a checkpoint holds."""

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunState:
    """Counters and figures of a run, saved with each checkpoint and restored on resume.

    `global_step`: optimisation steps done; `nonfinite_skipped`: steps skipped on a non-finite loss;
    `skipped_samples`: images skipped by reason; `stream_retries`: stream reads retried;
    `knn_random_init` / `knn`: the k-NN figures of the random-init and the latest teacher;
    `num_processes`: the processes that wrote the checkpoint (their data positions).
    """

    global_step: int = 0
    nonfinite_skipped: int = 0
    skipped_samples: dict = field(default_factory=dict)
    stream_retries: int = 0
    knn_random_init: dict = field(default_factory=dict)
    knn: dict = field(default_factory=dict)
    num_processes: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})


__all__ = ["RunState"]
