"""Whether a finished run learned: its status as results.csv, the figures and the report show it.

Training gives a run one of `done`, `diverged` or `failed`. A run that trained to the end has
still not necessarily learned anything: at too large a learning rate a classifier can collapse to
the label prior (accuracy at chance, eval loss ln 2 on a balanced binary task) without its loss
ever blowing up. So a `done` run is judged on its evaluation loss, which every task has, against
the loss of a predictor that learned nothing (its *trivial loss*, recorded at step 0 as the metric
row `trivial_loss`):

- classification: the cross-entropy, on the evaluation rows, of always predicting the training
  rows' label prior (the entropy of the prior where both splits share it);
- decoders: the run's own evaluation loss at step 0, before any update.

A run *learned* when its final eval loss is below `trivial x (1 - MARGIN)`. Otherwise it
*collapsed* if an earlier evaluation was below that line (its best eval loss is: it learned, then
fell back), and *did not learn* if none was. Both keep their `final_` and `best_` metrics. The status is worked out
from the stored numbers whenever a store is read, so a store written before the trivial loss was
recorded is judged the same way, from its task's label prior (`Task.trivial_loss_of`).
"""

from __future__ import annotations

import json
import math

MARGIN = 0.02  # a run learned when its final eval loss is more than 2% below the trivial loss
LEARNED, COLLAPSED, DID_NOT_LEARN = "done", "collapsed", "did_not_learn"
# every status a finished run can show, in the order tables and legends list them
SHOWN = ("done", "did_not_learn", "collapsed", "diverged", "failed")
NOT_LEARNED = (DID_NOT_LEARN, COLLAPSED)  # trained to the end without learning


def threshold(trivial: float) -> float:
    """The eval loss a run must end below to have learned."""
    return trivial * (1.0 - MARGIN)


def judge(status: str, final_loss: float | None, best_loss: float | None, trivial: float | None) -> str:
    """The shown status of a run: its training status, or for a `done` run whether it learned.

    `final_loss`: its last eval loss; `best_loss`: its lowest (the final one included);
    `trivial`: its trivial loss, None when unknown (the run is then shown as done, unjudged)."""
    if status != "done" or not _finite(trivial) or not _finite(final_loss):
        return status
    line = threshold(trivial)
    if final_loss < line:
        return LEARNED
    return COLLAPSED if _finite(best_loss) and best_loss < line else DID_NOT_LEARN


class Judge:
    """Judges the runs of one store. Where the store holds no trivial loss for a run (written
    before it was recorded), the run's task gives it from the data alone, read once per data setting."""

    def __init__(self):
        self._from_data: dict[str, float | None] = {}

    def __call__(self, config: dict, status: str, final_loss: float | None, best_loss: float | None,
                 stored_trivial: float | None) -> tuple[str, float | None]:
        """(shown status, trivial loss) of a run: the trivial loss as stored, else, for a run to be
        judged, from its data."""
        trivial = stored_trivial
        if trivial is None and status == "done" and _finite(final_loss):
            trivial = self._trivial_from_data(config)
        return judge(status, final_loss, best_loss, trivial), trivial

    def _trivial_from_data(self, config: dict) -> float | None:
        from lorainit import tasks
        from lorainit.config import RunConfig
        from lorainit.errors import BadInput

        key = json.dumps({f: config.get(f) for f in ("task", "data_dir", "max_train_samples", "max_eval_samples")},
                         sort_keys=True)
        if key not in self._from_data:
            try:
                run = RunConfig.from_dict(config)
                self._from_data[key] = tasks.family(run.task).trivial_loss_of(run)
            except BadInput:
                self._from_data[key] = None
        return self._from_data[key]


def tally(statuses: list[str]) -> str:
    """'18 done, 11 did not learn, 1 collapsed, 0 diverged': each shown status counted, in SHOWN's
    order; done and diverged always, the others where some run has them."""
    return ", ".join(f"{statuses.count(s)} {s.replace('_', ' ')}" for s in SHOWN
                     if statuses.count(s) or s in ("done", "diverged"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
