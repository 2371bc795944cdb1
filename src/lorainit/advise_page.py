"""`lorainit advise`'s page: the advice, how each family's lrs narrowed stage by stage, and every
stage's own report (its figures and findings), in one self-contained `OUT/report/index.html`, with
the same text in `OUT/advice.md`."""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

from lorainit import report as reports
from lorainit.files import write_text_atomic
from lorainit.report import families, figures, page
from lorainit.report.findings import cells_of
from lorainit.theory.toy_figures import _plt


def narrowing(advice, stage_reports: list, out: Path) -> Path | None:
    """One panel per family: the mean metric over seeds against lr at each stage (a darker line, a
    longer horizon; a hollow marker where a seed did not learn), its chosen lr ringed."""
    plt = _plt()
    fams = list(advice.choices)
    if not fams or not stage_reports:
        return None
    columns = min(len(fams), 4)
    rows = -(-len(fams) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    shades = _plt().get_cmap("Blues")
    for ax, family in zip(axes.flat, fams):
        for i, (stage, built) in enumerate(zip(advice.stages, stage_reports)):
            points = []  # (lr, mean over the seeds that trained to the end, every seed learned)
            ran = set(advice.kept[i].get(family, ()))  # a resumed stage's store can hold an earlier plan's lrs
            for group in built.sweep.groups:
                for c in cells_of(group, advice.metric.name).get(family, []):
                    if c.trained_values and c.lr in ran:
                        points.append((c.lr, sum(c.trained_values) / len(c.trained_values), c.complete))
            if points:
                points.sort()
                color = shades(0.35 + 0.65 * (i + 1) / len(advice.stages))
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                ax.plot(xs, ys, "-", color=color, label=f"stage {i + 1}: {stage.steps} steps")
                ax.scatter(xs, ys, s=14, color=[color if p[2] else "white" for p in points], edgecolors=color,
                           zorder=3)
        choice = advice.choices[family]
        if choice.lr is not None:
            ax.plot([choice.lr], [choice.mean], "o", ms=10, mfc="none", mec="tab:red", label="chosen")
        ax.set_xscale("log", base=2)
        ax.set_title(families.name(family), fontsize=9)
        ax.set_xlabel("learning rate", fontsize=8)
        ax.set_ylabel(advice.metric.label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return figures._save(fig, out, "narrowing")[0]


def stage_report(folder: Path):
    """A stage's report (`lorainit report` of its folder), drawn again only when its results changed
    since it was last drawn: advise run again on finished stages redraws nothing."""
    from lorainit.report.sweep import load

    digest = hashlib.sha256((folder / "results.csv").read_bytes()).hexdigest()
    drawn = folder / "report" / "advise-drawn.json"
    if drawn.is_file():
        saved = json.loads(drawn.read_text())
        figures_ = [(caption, folder / "report" / name) for caption, name in saved["figures"]]
        if saved["results"] == digest and all(path.is_file() for _, path in figures_):
            sweep = load(folder)
            return reports.Report(sweep, reports.analyse(sweep), figures_, folder / "report")
    built = reports.build(folder)
    write_text_atomic(drawn, json.dumps({"results": digest,
                                         "figures": [(caption, path.name) for caption, path in built.figures]}))
    return built


def write(advice) -> Path:
    """Write OUT/report/index.html and OUT/advice.md; returns the page."""
    out = advice.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    built = [stage_report(advice.out / f"stage-{i}") for i in range(1, len(advice.kept) + 1)]
    picture = narrowing(advice, built, out)
    lines = advice.lines()
    table_head = ["family", "best lr", "the optimum lies between", f"{advice.metric.label} (seeds)", "chosen at"]
    table = []
    for c in advice.choices.values():
        if c.lr is None:
            table.append([c.name, "-", "-", "no lr learned", "-"])
            continue
        table.append([c.name, f"{c.lr:.3g}", f"{c.low:.3g}" if c.low else "below the grid",
                      f"{c.mean:.4g} ({min(c.values):.4g}–{max(c.values):.4g})", f"{c.steps} steps"])
        table[-1][2] += " and " + (f"{c.high:.3g}" if c.high else "above the grid")
    dropped = [f"{c.name}: {c.dropped_text()}" for c in advice.choices.values() if c.dropped]
    stages_html = []
    for i, (stage, r) in enumerate(zip(advice.stages, built), 1):
        figs = "".join(f"<figure>{page.image(png)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                       for caption, png in r.figures)
        stages_html.append(f"<h2>Stage {i}: {stage.steps} steps</h2><p class=\"status\">"
                           f"{html.escape(page._status_line(r))}; its own report: stage-{i}/report/index.html</p>"
                           f"<pre>{html.escape(r.text())}</pre>{figs}")
    best = [line for line in lines if line.startswith(("recommended", "no family learned"))]
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorainit advise: {html.escape(advice.settings.name)}</title>
<style>{page.STYLE}</style></head><body>
<h1>lorainit advise: {html.escape(advice.settings.name)}</h1>
<p class="answer">{html.escape(best[0] if best else lines[-1])}</p>
<h2>Each family</h2>
{page._table_html(table_head, table, [""] * len(table))}
<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in lines)}</ul>
{f'<figure>{page.image(picture)}<figcaption>each family, mean {html.escape(advice.metric.label)} against lr at each stage; the choice ringed</figcaption></figure>' if picture else ''}
<h2>What each stage dropped</h2>
<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in dropped) or '<li>nothing</li>'}</ul>
<p>Confirm at the target length: <code>lorainit sweep confirm.yaml --out &lt;folder&gt;</code> (in {html.escape(str(advice.out))}).</p>
{''.join(stages_html)}
</body></html>
"""
    path = write_text_atomic(out / "index.html", doc)
    md = [f"# lorainit advise: {advice.settings.name}", "", *(f"- {line}" for line in lines), "",
          page._table_md(table_head, table), "", "## What each stage dropped", "",
          *(f"- {line}" for line in dropped or ["nothing"]), "",
          f"Every stage's report: `stage-<i>/report/index.html`; all of them: `{path}`.", ""]
    write_text_atomic(advice.out / "advice.md", "\n".join(md))
    return path
