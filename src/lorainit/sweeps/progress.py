"""The sweep's one progress display: runs trained to the end, diverged and left; the current pack's step, mean
loss and throughput, or the evaluation it is running; the ETA from the steps left over all packs.

A bar on a terminal, plain lines elsewhere (`lorainit.display`): one as each pack finishes, and
at most one a minute in between."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorainit.display import ProgressDisplay
from lorainit.engine.order import total_steps
from lorainit.sweeps import estimates
from lorainit.sweeps.plan import Pack


@dataclass
class Progress:
    """One display for the whole sweep: runs trained to the end, diverged and left; the current pack's step,
    mean loss and throughput; the ETA (from the steps left over all packs)."""

    total_runs: int
    done: int = 0
    diverged: int = 0
    failed: int = 0
    enabled: bool = True
    steps: dict = field(default_factory=dict)  # pack id -> (steps done, total steps)
    order: dict = field(default_factory=dict)  # pack id -> its number in the plan, from 1
    display: ProgressDisplay | None = None
    stream: object = None  # where the display writes (stderr unless given)

    def start(self, packs: list[Pack]) -> None:
        for i, p in enumerate(packs, 1):
            run = p.runs[0]
            sample = estimates.data_sample(run, "train")  # corrected once the pack has loaded its data
            self.steps[p.id] = [0, total_steps(sample[0], run.batch_size, run.epochs, run.max_steps) if sample else 1]
            self.order[p.id] = i
        self.display = ProgressDisplay("sweep", sum(t for _, t in self.steps.values()), "step",
                                       status=self._status(""), enabled=self.enabled, stream=self.stream)

    def _status(self, pack: str) -> str:
        left = self.total_runs - self.done - self.diverged - self.failed
        parts = [f"runs {self.done} trained, {self.diverged} diverged"]  # whether they learned: the report
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{left} left")
        return ", ".join(parts) + (f" | {pack}" if pack else "")

    def step(self, pack_id: str, index: int, count: int, step: int, total: int, tok_s: float,
             loss: float | None = None) -> None:
        done, old_total = self.steps[pack_id]
        if total != old_total:  # the estimate before the pack's data was loaded
            self.display.total += total - old_total
        self.steps[pack_id] = [step, total]
        mean = f", loss {loss:.4f}" if loss is not None else ""
        self.display.update(step - done, self._status(f"pack {index}/{count} step {step}/{total}{mean}, "
                                                      f"{tok_s:.0f} tok/s"))

    def evaluating(self, index: int, count: int, runs: int, rows: int) -> None:
        self.display.update(0, self._status(f"pack {index}/{count} evaluating {runs} runs on {rows} rows"))

    def finished(self, pack_id: str, statuses: list[str]) -> None:
        done, total = self.steps.get(pack_id, (0, 0))
        self.steps[pack_id] = [total, total]
        self.done += statuses.count("done")
        self.diverged += statuses.count("diverged")
        self.failed += statuses.count("failed")
        self.display.mark(self._status(f"pack {self.order.get(pack_id, '?')}/{len(self.order)} finished"),
                          total - done)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
