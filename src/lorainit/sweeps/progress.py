"""The sweep's one progress display: runs done, diverged and left; the current pack's step, mean
loss and throughput, or the evaluation it is running; the ETA from the steps left over all packs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lorainit.engine.order import total_steps
from lorainit.sweeps import estimates
from lorainit.sweeps.plan import Pack


@dataclass
class Progress:
    """One display for the whole sweep: runs done, diverged and left; the current pack's step,
    mean loss and throughput; the ETA (from the steps left over all packs)."""

    total_runs: int
    done: int = 0
    diverged: int = 0
    failed: int = 0
    enabled: bool = True
    steps: dict = field(default_factory=dict)  # pack id -> (steps done, total steps)
    bar: object = None

    def start(self, packs: list[Pack]) -> None:
        from tqdm.auto import tqdm

        for p in packs:
            run = p.runs[0]
            sample = estimates.data_sample(run, "train")  # corrected once the pack has loaded its data
            self.steps[p.id] = [0, total_steps(sample[0], run.batch_size, run.epochs, run.max_steps) if sample else 1]
        self.bar = tqdm(total=sum(t for _, t in self.steps.values()), unit="step", desc="sweep",
                        disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)
        self._show("")

    def _show(self, pack: str) -> None:
        left = self.total_runs - self.done - self.diverged - self.failed
        parts = [f"runs {self.done} done, {self.diverged} diverged"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{left} left")
        self.bar.set_postfix_str(", ".join(parts) + (f" | {pack}" if pack else ""), refresh=False)

    def step(self, pack_id: str, index: int, count: int, step: int, total: int, tok_s: float,
             loss: float | None = None) -> None:
        done, old_total = self.steps[pack_id]
        if total != old_total:  # the estimate before the pack's data was loaded
            self.bar.total += total - old_total
        self.steps[pack_id] = [step, total]
        mean = f", loss {loss:.4f}" if loss is not None else ""
        self._show(f"pack {index}/{count} step {step}/{total}{mean}, {tok_s:.0f} tok/s")
        self.bar.update(step - done)

    def evaluating(self, index: int, count: int, runs: int, rows: int) -> None:
        self._show(f"pack {index}/{count} evaluating {runs} runs on {rows} rows")
        self.bar.refresh()

    def finished(self, pack_id: str, statuses: list[str]) -> None:
        done, total = self.steps.get(pack_id, (0, 0))
        self.steps[pack_id] = [total, total]
        self.done += statuses.count("done")
        self.diverged += statuses.count("diverged")
        self.failed += statuses.count("failed")
        self._show("")
        self.bar.update(total - done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
