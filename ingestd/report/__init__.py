"""``ingestd report``: one self-contained HTML file of what the database holds.

Charts are Bokeh (``bokeh.resources`` in inline mode: BokehJS is embedded in the file, so it
opens offline and sends no request; the README says why Bokeh). Each chart is followed by
the table behind it, as plain HTML, which reads even with scripts disabled. When BokehJS
has drawn every plot, a small script writes ``data-rendered-plots``, ``data-canvases`` and
``data-render-ms`` on ``<body>`` (the browser test reads them from the DOM).

Bokeh is an optional dependency (``pip install 'ingestd[report]'``): the daemon never
needs it.
"""

from __future__ import annotations

import html
import string
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd import __version__
from ingestd.errors import IngestdError
from ingestd.report.data import ReportData, Table, load_report_data

if TYPE_CHECKING:
    from bokeh.model import Model

PLOT_WIDTH = 1100
PLOT_HEIGHT = 300
BAR_ROW_PX = 16  # height per device in the loss chart
LOSS_DEVICES_MAX = 50  # worst devices charted; the table lists all
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)  # matplotlib's category10: distinct on screen and in print


class ReportUnavailable(IngestdError):
    """The report needs Bokeh: pip install 'ingestd[report]'."""


def write_report(
    engine: Any,
    path: Path,
    *,
    since: timedelta,
    application_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """Query, render and write the report to ``path``; return a one-line summary."""
    data = load_report_data(engine, since=since, application_id=application_id, now=now)
    page = render_report(data)
    path.write_text(page, encoding="utf-8")
    t = data.totals
    return (
        f"wrote {path} ({len(page.encode()) / 2**20:.1f} MiB): {t['uplinks']:,} uplinks, "
        f"{t['devices']:,} devices, {t['gateways']:,} gateways, {t['downlinks']:,} downlinks, "
        f"{t['gaps_open']:,} open gaps since {data.since.isoformat(timespec='seconds')}"
    )


def render_report(data: ReportData) -> str:
    """The HTML page for ``data``."""
    try:
        from bokeh.embed import components
        from bokeh.resources import Resources
    except ImportError as exc:
        raise ReportUnavailable() from exc

    sections: list[tuple[str, str, Model | None, Table]] = [
        (
            "Uplinks per hour",
            "Uplinks received per hour, per application.",
            _hourly_chart(data.hourly),
            data.hourly,
        ),
        (
            "Frame loss per device",
            "Lost / expected frame counters in the window (from uplink_loss_daily; whole days).",
            _loss_chart(data.loss),
            data.loss,
        ),
        (
            "Signal over time",
            "Hourly average RSSI (dBm) and SNR (dB) of the best gateway, per application.",
            _signal_chart(data.hourly),
            data.hourly,
        ),
        (
            "Gateway coverage",
            "Receptions and distinct devices per gateway.",
            _gateway_chart(data.gateways),
            data.gateways,
        ),
        (
            "Downlink outcomes",
            "Outbox rows created in the window, by status.",
            _downlink_chart(data.downlinks),
            data.downlinks,
        ),
        (
            "Gaps",
            "Windows in which events may be missing (open) or were healed from the "
            "Storage Integration.",
            _gap_chart(data.gaps),
            data.gaps,
        ),
        ("Streams", "The stream_health view.", None, data.streams),
    ]
    models = [m for _, _, m, _ in sections if m is not None]
    script, divs = components(models)
    div_iter = iter(divs)
    resources = Resources(mode="inline", components=["bokeh"])
    body = []
    for title, caption, model, table in sections:
        chart = next(div_iter) if model is not None else ""
        body.append(
            f"<section><h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>{chart}"
            f"<details{' open' if model is None else ''}><summary>Table "
            f"({len(table.rows):,} rows)</summary>{_html_table(table)}</details></section>"
        )
    return _PAGE.substitute(
        title=html.escape(_title(data)),
        heading=html.escape(_title(data)),
        meta=html.escape(
            f"{data.since:%Y-%m-%d %H:%M} to {data.generated_at:%Y-%m-%d %H:%M} UTC · "
            + " · ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in data.totals.items())
            + f" · ingestd {__version__}"
        ),
        css=_CSS,
        bokeh_js=resources.render_js(),
        bokeh_css=resources.render_css(),
        plots=len(models),
        script=script,
        body="\n".join(body),
        marker=_MARKER_JS,
    )


def _title(data: ReportData) -> str:
    scope = f"application {data.application_id}" if data.application_id else "all applications"
    return f"ingestd report: {scope}"


# -- charts ---------------------------------------------------------------------------------


def _time(value: Any) -> datetime:
    """A stored time as naive UTC (SQLite returns text from raw SQL; Bokeh wants datetimes)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value  # type: ignore[no-any-return]


def _figure(**kwargs: Any) -> Any:
    from bokeh.plotting import figure

    opts: dict[str, Any] = {
        "width": PLOT_WIDTH,
        "height": PLOT_HEIGHT,
        "tools": "pan,wheel_zoom,box_zoom,reset,save",
        "toolbar_location": "above",
    }
    opts.update(kwargs)
    return figure(**opts)


def _per_app(hourly: Table) -> dict[str, dict[str, list[Any]]]:
    by_app: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for row in hourly.rows:
        rec = dict(zip(hourly.columns, row, strict=True))
        series = by_app[rec["application_id"]]
        series["hour"].append(_time(rec["hour"]))
        for key in ("uplinks", "rssi_avg", "snr_avg"):
            series[key].append(rec[key])
    return by_app


def _hourly_chart(hourly: Table) -> Any:
    if not hourly.rows:
        return None  # nothing to draw: the (empty) table says so
    from bokeh.models import ColumnDataSource, HoverTool

    p = _figure(x_axis_type="datetime", y_axis_label="uplinks / hour")
    for i, (app, series) in enumerate(sorted(_per_app(hourly).items())):
        src = ColumnDataSource({**series, "app": [app] * len(series["hour"])})
        color = PALETTE[i % len(PALETTE)]
        p.line("hour", "uplinks", source=src, color=color, legend_label=app, line_width=2)
        p.scatter("hour", "uplinks", source=src, color=color, size=4)
    p.add_tools(
        HoverTool(
            tooltips=[
                ("application", "@app"),
                ("hour", "@hour{%F %H:00}"),
                ("uplinks", "@uplinks"),
            ],
            formatters={"@hour": "datetime"},
        )
    )
    _legend(p)
    return p


def _signal_chart(hourly: Table) -> Any:
    if not hourly.rows:
        return None  # nothing to draw: the (empty) table says so
    from bokeh.layouts import column

    rssi = _figure(x_axis_type="datetime", y_axis_label="RSSI (dBm)", height=250)
    snr = _figure(x_axis_type="datetime", y_axis_label="SNR (dB)", height=250, x_range=rssi.x_range)
    for i, (app, series) in enumerate(sorted(_per_app(hourly).items())):
        color = PALETTE[i % len(PALETTE)]
        rssi.line(series["hour"], series["rssi_avg"], color=color, legend_label=app, line_width=2)
        snr.line(series["hour"], series["snr_avg"], color=color, legend_label=app, line_width=2)
    _legend(rssi)
    _legend(snr)
    return column(rssi, snr)


def _loss_chart(loss: Table) -> Any:
    if not loss.rows:
        return None  # nothing to draw: the (empty) table says so
    from bokeh.models import ColumnDataSource, HoverTool

    rows = loss.rows[:LOSS_DEVICES_MAX]  # already worst first
    names = [f"{r[0]}/{r[1]}" for r in rows]
    ratios = [float(r[loss.columns.index("loss_ratio")] or 0.0) for r in rows]
    src = ColumnDataSource(
        {
            "device": names,
            "loss": ratios,
            "lost": [r[loss.columns.index("lost")] for r in rows],
            "expected": [r[loss.columns.index("expected")] for r in rows],
        }
    )
    p = _figure(
        y_range=list(reversed(names)) or ["(none)"],
        x_axis_label="loss ratio",
        height=max(PLOT_HEIGHT // 2, 60 + BAR_ROW_PX * len(names)),
        x_range=(0, max(0.01, max(ratios, default=0.0) * 1.1)),
    )
    p.hbar(y="device", right="loss", height=0.8, source=src, color=PALETTE[3])
    p.add_tools(
        HoverTool(
            tooltips=[
                ("device", "@device"),
                ("loss", "@loss{0.0%}"),
                ("lost / expected", "@lost / @expected"),
            ]
        )
    )
    return p


def _gateway_chart(gateways: Table) -> Any:
    if not gateways.rows:
        return None  # nothing to draw: the (empty) table says so
    from bokeh.layouts import row
    from bokeh.models import ColumnDataSource, HoverTool

    ids = [str(g) for g in gateways.column("gateway_id")]
    src = ColumnDataSource(
        {
            "gateway": ids,
            "receptions": gateways.column("receptions"),
            "devices": gateways.column("devices"),
            "rssi": gateways.column("rssi_avg"),
            "lat": gateways.column("latitude"),
            "lon": gateways.column("longitude"),
        }
    )
    bars = _figure(x_range=ids or ["(none)"], y_axis_label="receptions", width=PLOT_WIDTH // 2)
    bars.vbar(x="gateway", top="receptions", width=0.8, source=src, color=PALETTE[0])
    bars.xaxis.major_label_orientation = 0.8
    bars.add_tools(
        HoverTool(
            tooltips=[
                ("gateway", "@gateway"),
                ("receptions", "@receptions"),
                ("devices", "@devices"),
                ("avg RSSI", "@rssi{0.0}"),
            ]
        )
    )
    located = [i for i, lat in enumerate(gateways.column("latitude")) if lat is not None]
    if not located:
        return bars
    where = _figure(
        x_axis_label="longitude", y_axis_label="latitude", width=PLOT_WIDTH // 2, match_aspect=True
    )
    if located:
        where.scatter("lon", "lat", source=src, size=12, color=PALETTE[2], alpha=0.8)
        where.text(
            "lon", "lat", text="gateway", source=src, x_offset=8, y_offset=4, text_font_size="10px"
        )
    return row(bars, where)


def _downlink_chart(downlinks: Table) -> Any:
    if not downlinks.rows:
        return None  # nothing to draw: the (empty) table says so
    statuses = [str(s) for s in downlinks.column("status")]
    p = _figure(x_range=statuses or ["(none)"], y_axis_label="downlinks", width=PLOT_WIDTH // 2)
    p.vbar(x=statuses, top=downlinks.column("downlinks"), width=0.7, color=PALETTE[4])
    return p


def _gap_chart(gaps: Table) -> Any:
    bounded = [r for r in gaps.rows if r[1] is not None and r[2] is not None]
    if not bounded:
        return None  # nothing to draw: the (empty) table says so
    streams = sorted({str(r[0]) for r in bounded})
    p = _figure(x_axis_type="datetime", y_range=streams, height=max(120, 60 + 30 * len(streams)))
    for state, color in (("open", PALETTE[3]), ("healed", PALETTE[2])):
        picked = [r for r in bounded if r[gaps.columns.index("state")] == state]
        if picked:
            p.hbar(
                y=[str(r[0]) for r in picked],
                left=[_time(r[1]) for r in picked],
                right=[_time(r[2]) for r in picked],
                height=0.6,
                color=color,
                legend_label=state,
            )
    _legend(p)
    return p


def _legend(p: Any) -> None:
    if p.legend:
        p.legend.location = "top_left"
        p.legend.click_policy = "hide"


# -- page -----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return html.escape(str(value))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1160px;
       color: #222; background: #fff; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #555; font-size: .9rem; } p { color: #444; font-size: .9rem; }
table { border-collapse: collapse; font-size: .8rem; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
summary { cursor: pointer; color: #1f5fa8; font-size: .9rem; }
"""

# Runs after BokehJS drew every plot: counts canvases through the shadow roots BokehJS
# renders into and records the time since navigation start.
_MARKER_JS = """
(function () {
  function count(root) {
    var n = root.querySelectorAll('canvas').length;
    root.querySelectorAll('*').forEach(function (el) {
      if (el.shadowRoot) n += count(el.shadowRoot);
    });
    return n;
  }
  function check() {
    var docs = (window.Bokeh && Bokeh.documents) || [];
    var want = Number(document.body.dataset.plots);
    if (docs.length > 0 && docs.every(function (d) { return d.is_idle; }) &&
        docs.reduce(function (a, d) { return a + d.roots().length; }, 0) >= want) {
      document.body.dataset.renderedPlots = String(want);
      document.body.dataset.canvases = String(count(document));
      document.body.dataset.renderMs = String(Math.round(performance.now()));
      return;
    }
    setTimeout(check, 20);
  }
  check();
})();
"""

_PAGE = string.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>$css</style>
$bokeh_css
$bokeh_js
</head>
<body data-plots="$plots">
<h1>$heading</h1>
<div class="meta">$meta</div>
$body
$script
<script>$marker</script>
</body>
</html>
""")
