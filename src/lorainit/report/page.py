"""The report as text: one self-contained HTML page (images embedded as data URIs, no script, no
network) and a Markdown summary with the same findings and tables."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from lorainit.files import write_text_atomic
from lorainit.report import families
from lorainit.report.findings import beyond_paper, headline, summary_lines
from lorainit.report.sweep import task_name
from lorainit.sweeps import outcome

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
.verdict { font-weight: bold; } .holds { color: #176317; } .fails { color: #a11; } .noise, .unknown { color: #8a6d00; }
.equal { color: #555; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #f3f3f3; } tr.diverged td, tr.failed td { background: #fbe3e3; }
tr.did_not_learn td, tr.collapsed td { background: #fdf1dc; }
tr.pending td, tr.running td { background: #eef; color: #555; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.columns { display: flex; gap: 2em; } .columns > div { flex: 1; min-width: 0; }
.answer { font-size: 1.05em; background: #eef6ee; padding: 0.4em 0.8em; border-left: 4px solid #176317; }
.status { background: #f6f6f6; padding: 0.5em 1em; border-left: 4px solid #888; }
"""


def _status_line(report) -> str:
    sweep = report.sweep
    total = len(sweep.runs)
    if total == 0:
        return "The store holds no runs yet: nothing to report."
    statuses = [r.status for r in sweep.runs]
    left = total - sum(s in outcome.SHOWN for s in statuses)
    line = f"{total} runs: {outcome.tally(statuses)}"
    if left:
        line += f"; {left} not finished ({sweep.count('running')} running, {sweep.count('pending')} pending)"
    return line


def findings_text(report) -> str:
    lines = [f"sweep {report.sweep.name}: {_status_line(report)}"]
    for f in report.findings:
        lines.append(f"\n{f.group.title}, final {f.metric.label}:")
        lines += [f"  {line}" for line in summary_lines(f)]
    if not report.findings and report.sweep.runs:
        lines.append("no run of a known task has finished: no findings yet")
    return "\n".join(lines)


def _verdict_class(verdict: str) -> str:
    return {"holds": "holds", "does not hold": "fails", "within seed noise": "noise", "equal": "equal",
            "spread unknown": "unknown"}.get(verdict, "")


def _findings_html(report) -> str:
    parts = []
    for f in report.findings:
        items = []
        for line in summary_lines(f):
            verdict = next((c.verdict for c in f.claims if line.startswith(c.text + ":")), None)
            text = html.escape(line)
            if verdict:
                head, rest = text.split(":", 1)
                upper = html.escape(verdict.upper())
                rest = rest.replace(upper, f'<span class="verdict {_verdict_class(verdict)}">{upper}</span>', 1)
                text = f"{head}:{rest}"
            items.append(f"<li>{text}</li>")
        title = f"{html.escape(f.group.title)}: final {html.escape(f.metric.label)}"
        table = ""
        if beyond_paper(f):
            header, rows = _family_table(f)
            table = _table_html(header, rows, [""] * len(rows))
        parts.append(f'<section class="finding"><h3>{title}</h3><p class="answer">{html.escape(headline(f))}</p>'
                     f'{table}<ul>{"".join(items)}</ul></section>')
    return "".join(parts) or "<p>No run of a known task has finished yet: no findings.</p>"


def _family_table(f) -> tuple[list[str], list[list[str]]]:
    """Per family: its best lr, the metric there with the seeds' range, the largest lr at which every
    seed learned, and its best lr against Init[A]'s, as a factor and in octaves."""
    header = ["family", "best lr", f"{f.metric.name} (seeds)", "largest lr every seed learned",
              "lr / Init[A]'s", "octaves"]
    rows = []
    for family, i in f.inits.items():
        if i.best_lr is None:
            value = f"every lr gives {i.tie:.4g}" if i.tie is not None else "no lr at which every seed learned"
            best = "-"
        else:
            best = f"{i.best_lr:.3g}"
            value = f"{i.best_mean:.4g}" + (f" ({i.best_min:.4g}–{i.best_max:.4g})" if i.seeds > 1 else " (one seed)")
        learned = f"{i.largest_learned_lr:.3g}" if i.largest_learned_lr is not None else "none"
        ratio = f.ratios.get(family)
        rows.append([families.name(family), best, value, learned,
                     f"{ratio:.3g}x" if ratio is not None else "-",
                     f"{math.log2(ratio):+.1f}" if ratio is not None else "-"])
    return header, rows


def image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _metric_names(report) -> list[str]:
    names: list[str] = []
    for g in report.sweep.groups:
        for m in g.metrics:
            if m.name not in names:
                names.append(m.name)
    return names


def _axes(report) -> list[str]:
    axes: list[str] = []
    for g in report.sweep.groups:
        axes += [a for a in g.axes if a not in axes]
    return axes


def _run_table(report) -> tuple[list[str], list[list[str]], list[str]]:
    metrics = _metric_names(report)
    axes = _axes(report)
    header = ["run_id", "task", *axes, "init", "lr", "seed", "status", "steps", *[f"final {m}" for m in metrics]]
    rows, classes = [], []
    for r in report.sweep.runs:
        cfg = r.config
        status = r.status + (f" at step {r.diverged_step}" if r.status == "diverged" and r.diverged_step else "")
        values = [f"{r.final[m]:.4g}" if isinstance(r.final.get(m), (int, float)) else "" for m in metrics]
        rows.append([r.run_id, task_name(cfg), *[str(cfg.get(a, "")) for a in axes], families.name(r.family),
                     f"{r.lr:.3g}", str(r.seed), status, str(r.steps or ""), *values])
        classes.append(r.status)
    return header, rows, classes


def _table_html(header, rows, classes) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f'<tr class="{c}">' + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                   for row, c in zip(rows, classes))
    return f"<table><tr>{head}</tr>{body}</table>"


def _table_md(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(v.replace("|", "/") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cells_md(report) -> str:
    """Per group and metric: mean final value per (init, lr), seeds shown as n."""
    out = []
    for f in report.findings:
        lrs = sorted({c.lr for cells in f.cells.values() for c in cells})
        header = ["lr", *[families.name(i) for i in f.cells]]
        rows = []
        for lr in lrs:
            row = [f"{lr:.3g}"]
            for cells in f.cells.values():
                c = next((c for c in cells if c.lr == lr), None)
                if c is None:
                    row.append("")
                elif c.complete:
                    spread = f" ({min(c.values):.4g}–{max(c.values):.4g})" if len(c.values) > 1 else ""
                    row.append(f"{c.mean:.4g}{spread}")
                elif c.label():
                    row.append(c.label())
                else:
                    row.append("not finished")
            rows.append(row)
        out.append(f"### {f.group.title}: mean final {f.metric.label} over seeds (min–max)\n\n{_table_md(header, rows)}")
    return "\n\n".join(out)


def write(report, out: Path) -> None:
    sweep = report.sweep
    header, rows, classes = _run_table(report)
    figures_html = "".join(f"<figure>{image(png)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                           for caption, png in report.figures)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorainit report: {html.escape(sweep.name)}</title>
<style>{STYLE}</style></head><body>
<h1>lorainit report: {html.escape(sweep.name)}</h1>
<p class="status">{html.escape(_status_line(report))}</p>
<h2>Findings</h2>
<p>Each value is a run's metric at the end of training. An (init, lr) cell is a candidate for the optimum
only when every seed learned; a verdict is judged against the seeds' spread.</p>
{_findings_html(report)}
<h2>Figures</h2>
{figures_html or "<p>No finished runs to draw yet.</p>"}
<h2>Every run</h2>
{_table_html(header, rows, classes) if rows else "<p>No runs.</p>"}
</body></html>
"""
    write_text_atomic(out / "index.html", page)
    md = [f"# lorainit report: {sweep.name}", "", _status_line(report), "", "## Findings", ""]
    for f in report.findings:
        md += [f"### {f.group.title}: final {f.metric.label}", "", f"**{headline(f)}**", ""]
        if beyond_paper(f):
            md += [_table_md(*_family_table(f)), ""]
        md += [f"- {line}" for line in summary_lines(f)] + [""]
    if not report.findings:
        md += ["No run of a known task has finished yet: no findings.", ""]
    md += ["## Mean metric per (init, lr)", "", _cells_md(report), "", "## Every run", "",
           _table_md(header, rows) if rows else "No runs.", ""]
    write_text_atomic(out / "summary.md", "\n".join(md))


def write_compare(reports, out: Path) -> Path:
    columns = []
    for r in reports:
        figs = "".join(f"<figure>{image(png)}<figcaption>{html.escape(c)}</figcaption></figure>" for c, png in r.figures)
        columns.append(f"<div><h2>{html.escape(r.sweep.name)}</h2><p class=\"status\">{html.escape(str(r.sweep.folder))}: "
                       f"{html.escape(_status_line(r))}</p>{_findings_html(r)}{figs}</div>")
    names = " vs ".join(html.escape(r.sweep.name) for r in reports)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorainit comparison: {names}</title>
<style>{STYLE}</style></head><body><h1>lorainit comparison: {names}</h1>
<div class="columns">{''.join(columns)}</div></body></html>
"""
    path = write_text_atomic(out / "index.html", page)
    md = [f"# lorainit comparison: {' vs '.join(r.sweep.name for r in reports)}", ""]
    for r in reports:
        md += [f"## {r.sweep.name} ({r.sweep.folder})", "", _status_line(r), ""]
        for f in r.findings:
            md += [f"### {f.group.title}: final {f.metric.label}", ""] + [f"- {x}" for x in summary_lines(f)] + [""]
    write_text_atomic(out / "summary.md", "\n".join(md))
    return path
