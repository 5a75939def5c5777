"""The replay report as one self-contained HTML page, fit to attach to a change request: inline CSS,
an inline SVG bar chart of flips per policy, no script and no external assets (its Content
Security Policy allows none), and it prints. Every recorded value is escaped: paths and user
agents in recorded traffic are chosen by whoever sent them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from gateway.replay.engine import Replayed
from gateway.replay.report import (
    ALLOW_TO_BLOCK,
    BLOCK_TO_ALLOW,
    DIMENSIONS,
    ReplayReport,
    summary_text,
    url,
    when,
)

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1b1f; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; } .muted { color: #5c5c66; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0; padding: 0; list-style: none; }
.tiles li { border: 1px solid #d7d7de; border-radius: 8px; padding: 10px 16px; min-width: 120px; }
.tiles b { display: block; font-size: 26px; } .block b { color: #b3261e; } .allow b { color: #1e7a34; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 14px; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e6e6ea; vertical-align: top; }
th { background: #f4f4f7; } td.n { text-align: right; width: 4em; } code { font-size: 12px; word-break: break-all; }
.groups { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 0 20px; }
svg text { font: 12px system-ui, sans-serif; fill: #1b1b1f; }
@media print { main { padding: 0; } h2 { break-after: avoid; } table, figure, .tiles { break-inside: avoid; } }
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'"
BAR_COLOURS = {ALLOW_TO_BLOCK: "#b3261e", BLOCK_TO_ALLOW: "#1e7a34"}


def as_html(report: ReplayReport, generated: datetime | None = None) -> str:
    generated = generated or datetime.now(UTC)
    changes = report.changes()
    tiles = [("replayed", len(report.replayed), ""), ("same result", report.unchanged, ""),
             (ALLOW_TO_BLOCK, len(changes[ALLOW_TO_BLOCK]), "block"),
             (BLOCK_TO_ALLOW, len(changes[BLOCK_TO_ALLOW]), "allow"),
             *((change, len(items), "") for change, items in changes.items()
               if change not in (ALLOW_TO_BLOCK, BLOCK_TO_ALLOW)),
             ("still blocked, another reason", len(report.other_reason), ""), ("skipped", len(report.skipped), "")]
    body = [
        f"<h1>Replay: {_e(report.candidate)}</h1>",
        f'<p class="muted">compared with {_e(report.baseline)}; {len(report.replayed)} recorded requests from '
        f"{_e(', '.join(report.sources))}; generated {generated.astimezone(UTC):%Y-%m-%d %H:%M} UTC</p>",
        '<ul class="tiles">' + "".join(f'<li class="{kind}" data-name="{_e(name)}"><b>{count}</b>{_e(name)}</li>'
                                        for name, count, kind in tiles) + "</ul>",
        "<h2>Flips per policy</h2>", chart(report),
    ]
    for change, items in changes.items():
        body.append(f'<h2 id="{_e(change)}">{_e(change)}: {len(items) or "none"}</h2>')
        if items:
            body.append(_groups(report, change))
            body += [f"<h3>{_e(group.label)}: {len(group.items)}</h3>{_examples(group.items[: report.examples])}"
                     for group in report.groups(change, "policy")]
    if report.other_reason:
        body += [f"<h2>Still blocked, another reason: {len(report.other_reason)}</h2>",
                 _examples(report.other_reason[: report.examples])]
    body.append(f"<h2>Policies that never matched under the candidate: {len(report.never_matched) or 'none'}</h2>")
    if report.never_matched:
        body.append("<table><tr><th>policy</th><th>state</th><th>display name</th></tr>" + "".join(
            f"<tr><td>{_e(name)}</td><td>{_e(state)}</td><td>{_e(display)}</td></tr>"
            for name, display, state in report.never_matched) + "</table>")
    if report.skipped:
        body.append(f"<h2>Skipped: {len(report.skipped)}</h2><table><tr><th>requests</th><th>why</th>"
                    "<th>where (first few)</th></tr>" + "".join(
                        f'<tr><td class="n">{len(places)}</td><td>{_e(reason)}</td>'
                        f"<td><code>{_e(', '.join(places[: report.examples]))}</code></td></tr>"
                        for reason, places in report.skipped_by_reason()) + "</table>")
    if report.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(note)}</li>" for note in report.notes) + "</ul>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Portcullis replay: {_e(report.candidate)}</title><style>{STYLE}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def chart(report: ReplayReport) -> str:
    """Horizontal bars, two per policy (allow→block, block→allow), scaled to the largest count."""
    rows = report.flips_per_policy()
    if not rows:
        return '<p id="flips-chart">No decision flips.</p>'
    label_width, bar_width, bar, row = 300, 560, 14, 40
    height = row * len(rows) + 36
    largest = max(max(a, b) for _, _, a, b in rows)
    width = label_width + bar_width + 60
    parts = [f'<figure><svg id="flips-chart" role="img" aria-labelledby="flips-title" width="{width}"'
             f' height="{height}" viewBox="0 0 {width} {height}">'
             '<title id="flips-title">Decision flips per policy</title>']
    for index, (key, label, to_block, to_allow) in enumerate(rows):
        top = index * row + 6
        shown = key if len(key) <= 40 else key[:39] + "…"
        parts.append(f'<text x="{label_width - 12}" y="{top + 20}" text-anchor="end"><title>{_e(label)}</title>'
                     f"{_e(shown)}</text>")
        for offset, (change, count) in enumerate(((ALLOW_TO_BLOCK, to_block), (BLOCK_TO_ALLOW, to_allow))):
            length = round(bar_width * count / largest)
            y = top + offset * (bar + 2)
            parts.append(f'<rect class="bar" data-policy="{_e(key)}" data-change="{_e(change)}" data-count="{count}" '
                         f'x="{label_width}" y="{y}" width="{length}" height="{bar}" '
                         f'fill="{BAR_COLOURS[change]}"><title>{_e(key)}: {count} {_e(change)}</title></rect>')
            parts.append(f'<text x="{label_width + length + 6}" y="{y + bar - 2}">{count}</text>')
    legend_y = height - 12
    parts += [f'<rect x="{label_width}" y="{legend_y - 10}" width="12" height="12" '
              f'fill="{BAR_COLOURS[ALLOW_TO_BLOCK]}"/>',
              f'<text x="{label_width + 18}" y="{legend_y}">allow→block</text>',
              f'<rect x="{label_width + 120}" y="{legend_y - 10}" width="12" height="12" '
              f'fill="{BAR_COLOURS[BLOCK_TO_ALLOW]}"/>',
              f'<text x="{label_width + 138}" y="{legend_y}">block→allow</text>', "</svg></figure>"]
    return "".join(parts)


def _groups(report: ReplayReport, change: str) -> str:
    cells = []
    for dimension in DIMENSIONS:
        rows = "".join(f'<tr><td>{_e(group.label)}</td><td class="n">{len(group.items)}</td></tr>'
                       for group in report.groups(change, dimension))
        cells.append(f"<div><h3>by {dimension}</h3><table>{rows}</table></div>")
    return f'<div class="groups">{"".join(cells)}</div>'


def _examples(items: Sequence[Replayed]) -> str:
    rows = "".join(
        f"<tr><td>{_e(when(item))}</td><td><code>{_e(item.request.method)} {_e(url(item))}</code></td>"
        f"<td>{_e(item.user or '-')}</td><td>{_e(item.app or '-')}</td><td>{_e(summary_text(item.baseline))}</td>"
        f"<td>{_e(summary_text(item.candidate))}</td><td><code>{_e(item.request.correlation_id or '-')}</code><br>"
        f"<code>{_e(item.request.place)}</code></td></tr>" for item in items)
    return ("<table><tr><th>time</th><th>request</th><th>user</th><th>app</th><th>baseline</th>"
            f"<th>candidate</th><th>correlation id, source</th></tr>{rows}</table>")


def _e(text: str) -> str:
    return escape(text, quote=True)
