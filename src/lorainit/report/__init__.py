"""`lorainit report DIR`: a sweep folder's figures, findings and one self-contained page.

Reads only the folder's store (read-only, so it can run while the sweep does) and writes
`DIR/report/`: `index.html` (findings, then figures embedded as images, then every run with its
status; no network needed to view it), `summary.md` (the same findings and tables as text), and
each figure as PNG and SVG. `compare` puts two sweeps side by side.

Init[A] is judged against every other init family of a group; further family pairs come from the
sweep file's `compare:` and from `pairs` (`lorainit report --pair X:Y`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorainit.errors import BadInput
from lorainit.report import families, figures, page
from lorainit.report.findings import Finding, judge, summary_lines
from lorainit.report.sweep import Sweep, finished, load


@dataclass
class Report:
    sweep: Sweep
    findings: list[Finding]
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png) in page order
    out: Path | None = None

    @property
    def index(self) -> Path:
        return self.out / "index.html"

    def text(self) -> str:
        """The findings as plain text, for a terminal."""
        return page.findings_text(self)


def analyse(sweep: Sweep, pairs: list[tuple[str, str]] = ()) -> list[Finding]:
    """One finding per group and metric that some run of the group has recorded; besides Init[A]
    against each family, the sweep file's `compare:` pairs and `pairs` (family keys) are judged.
    BadInput when a pair of `pairs` names a family no run of the sweep has."""
    present = {r.family for r in sweep.runs}
    for pair in pairs:
        missing = [families.name(x) for x in pair if x not in present]
        if missing:
            raise BadInput(f"--pair {':'.join(pair)}: {' and '.join(missing)} not in the sweep at {sweep.folder}; "
                           f"its families: {', '.join(sorted(present, key=families.order))}")
    wanted = [*sweep.compare, *pairs]
    return [judge(group, metric, wanted) for group in sweep.groups for metric in group.metrics
            if any(metric.name in r.final for r in group.runs)]


def draw(report: Report, out: Path) -> None:
    for group in report.sweep.groups:
        mine = [f for f in report.findings if f.group is group]
        if not mine or not finished(group):
            continue
        slug = group.slug
        png = figures.metric_vs_lr(mine, out, f"metric_vs_lr_{slug}")[0]
        report.figures.append((f"{group.title}: final metric against learning rate, per init", png))
        for f in mine:
            png = figures.heatmap(f, out, f"heatmap_{slug}_{f.metric.name}")[0]
            report.figures.append((f"{group.title}: (init, lr) → mean final {f.metric.label}", png))
        best = {init: i.best_lr for init, i in mine[0].inits.items() if i.best_lr is not None}
        drawn = figures.dynamics(group, best, out, f"dynamics_{slug}")
        if drawn:
            report.figures.append((f"{group.title}: LoRA feature norms (the theory's Z_A and LoRA output)", drawn[0]))
        drawn = figures.curves(group, [m.name for m in group.metrics], out, f"curves_{slug}")
        if drawn:
            report.figures.append((f"{group.title}: training curves per run", drawn[0]))


def build(folder: str | Path, pairs: list[tuple[str, str]] = ()) -> Report:
    """Read DIR's store, write DIR/report/, and return the report (its findings and files); `pairs`:
    family pairs to judge beyond the defaults (`analyse`)."""
    sweep = load(folder)
    report = Report(sweep, analyse(sweep, pairs))
    out = Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    report.out = out
    draw(report, out)
    page.write(report, out)
    return report


def compare(folders: list[str | Path], out: str | Path, pairs: list[tuple[str, str]] = ()) -> Path:
    """Two or more sweeps' findings and main figures side by side in OUT/index.html."""
    sweeps = [load(folder) for folder in folders]
    analysed = [analyse(sweep, pairs) for sweep in sweeps]  # a bad pair is refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for i, (sweep, found) in enumerate(zip(sweeps, analysed)):
        report = Report(sweep, found, out=out)
        for group in sweep.groups:
            mine = [f for f in report.findings if f.group is group]
            if mine and finished(group):
                png = figures.metric_vs_lr(mine, out, f"sweep{i + 1}_metric_vs_lr_{group.slug}")[0]
                report.figures.append((f"{group.title}: final metric against learning rate", png))
        reports.append(report)
    return page.write_compare(reports, out)


__all__ = ["Report", "build", "compare", "summary_lines"]
