"""The k-NN guard of a run: the best teacher kept, and a stop when the k-NN falls too far below it.

Continued pretraining can lose what the starting weights knew: a DINOv2 user saw the k-NN accuracy of
a trained backbone fall from 80 % to 25 % within 10k images once it was unfrozen (DINOv2 issue #204).
With an evaluation set the trainer measures the teacher's k-NN at step 0 and every `--eval_steps`;
each measurement goes through `observe`, which records a new best in the run state (the trainer then
exports that teacher as OUTPUT_DIR/teacher_backbone_best) and, with `--stop_if_knn_drops POINTS`, says
when the run is to stop: the k-NN is POINTS or more below its best.
"""

from dataclasses import dataclass

from ..evaluation.knn import figure_name, guarded_figure
from ..run_files.state import RunState


def is_new_best(value: float, best: float | None) -> bool:
    """Whether `value` beats the best so far (a tie keeps the earlier step)."""
    return best is None or value > best


def has_dropped(value: float, best: float | None, points: float | None) -> bool:
    """Whether `value` is `points` or more below `best` (never when `points` is None: no guard)."""
    return points is not None and best is not None and best - value >= points


@dataclass(frozen=True)
class Verdict:
    """What a k-NN measurement means for the run: a new best to export, and why it stops (None: go on)."""

    new_best: bool = False
    stop: str | None = None


def observe(state: RunState, knn: dict, step: int, stop_if_drops: float | None) -> Verdict:
    """Judge the k-NN figures `knn`, measured at `step`, against the best so far; a new best is recorded
    in `state.knn_best` / `state.knn_best_step`. Figures without a top-1 change nothing."""
    key = guarded_figure(knn)
    if key is None:
        return Verdict()
    value = knn[key]
    best = state.knn_best.get(key) if state.knn_best_step is not None else None
    if is_new_best(value, best):
        state.knn_best, state.knn_best_step = dict(knn), step
        return Verdict(new_best=True)
    if has_dropped(value, best, stop_if_drops):
        return Verdict(
            stop=f"{figure_name(key)} {value:.1f}% at step {step} is {best - value:.1f} points below its best, "
            f"{best:.1f}% at step {state.knn_best_step} (--stop_if_knn_drops {stop_if_drops:g})"
        )
    return Verdict()


__all__ = ["Verdict", "has_dropped", "is_new_best", "observe"]
