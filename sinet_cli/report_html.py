"""The HTML page of ``sinet report``: plain string templates, every value escaped.

One self-contained file: styles and the (small) script inline, plots and thumbnails as base64
PNG data URIs, no external resource, so it opens offline from disk. The command hands in plain
values (strings, numbers, PNG bytes); nothing here reads artifacts or computes statistics.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from typing import Any, Sequence

# the page's content, computed by stages.report.build_report (re-exported for callers of this module)
from stages.report import ClassRow, ClassSection, Page, Suspect, Thumb, pct  # noqa: F401

# Kept small and inline. The filter runs on input; on load the page records how many of its
# images decoded (data-images-loaded / data-images-total on <body>): a check for tests and CI.
SCRIPT = """
(function () {
  var box = document.getElementById('class-search');
  var rows = document.querySelectorAll('#class-index tbody tr');
  var count = document.getElementById('class-count');
  function filter() {
    var q = box.value.trim().toLowerCase(), shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var hit = !q || rows[i].cells[1].textContent.toLowerCase().indexOf(q) >= 0;
      rows[i].style.display = hit ? '' : 'none';
      if (hit) shown++;
    }
    count.textContent = shown + ' of ' + rows.length + ' classes';
  }
  if (box) { box.addEventListener('input', filter); filter(); }
  window.addEventListener('load', function () {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
    document.body.setAttribute('data-images-loaded', String(ok));
    document.body.setAttribute('data-images-total', String(imgs.length));
  });
})();
"""

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 12px 24px 48px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.muted { color: #666; } .rule { background: #f5f5f7; padding: 6px 10px; border-left: 3px solid #888; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; vertical-align: top; }
th { background: #fafafa; position: sticky; top: 0; }
td.l, th.l { text-align: left; }
#class-index td:nth-child(2), #class-index td:last-child, #class-index th:nth-child(2), #class-index th:last-child
  { text-align: left; }
i { font-style: normal; color: #666; }
.scroll { max-height: 420px; overflow-y: auto; border: 1px solid #ddd; display: inline-block; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.plots.three figure.plot { flex: 1 1 0; min-width: 0; } .plots.three img.plot { width: 100%; }
.montage { display: flex; flex-wrap: wrap; gap: 6px; margin: 2px 0 8px; }
figure.plot { margin: 0; } figure.plot figcaption { font-size: 12px; color: #666; max-width: 640px; }
.montage figure { margin: 0; width: calc(var(--thumb) + 4px); font-size: 10px; line-height: 1.2; text-align: center; }
.montage img { display: block; width: var(--thumb); height: var(--thumb); object-fit: contain; background: #f0f0f0;
               border: 2px solid #bbb; }
.montage figure.noisy img { border-color: #d62728; } .montage figure.clean img { border-color: #2ca02c; }
.montage figcaption { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.class-block { border-top: 1px solid #eee; }
.strip { display: flex; align-items: flex-start; gap: 8px; }
.label { flex: 0 0 64px; color: #666; font-size: 12px; padding-top: 4px; }
details { margin: 4px 0; } summary { cursor: pointer; }
input#class-search { font-size: 14px; padding: 3px 6px; width: 260px; margin: 4px 0; }
ul.unknown { background: #fff8e5; border-left: 3px solid #e0a800; padding: 6px 10px 6px 28px; }
#suspects td.text { text-align: left; max-width: 420px; overflow-wrap: anywhere; font-size: 12px; }
#suspects img { width: var(--thumb); height: var(--thumb); object-fit: contain; background: #f0f0f0; }
pre { background: #f7f7f7; padding: 6px 8px; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; max-height: 240px; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def num(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _anchor(i: int) -> str:
    return f"class-{i}"


def _plot(page: Page, name: str) -> str:
    if name not in page.plots:
        return ""
    png, caption = page.plots[name]
    return (f'<figure class="plot"><img class="plot" src="{data_uri(png)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)} (<code>{escape(name)}</code>)</figcaption></figure>")


def _thumbs(thumbs: Sequence[Thumb]) -> str:
    if not thumbs:
        return '<span class="muted">none</span>'
    parts = []
    for t in thumbs:
        cls = f' class="{t.status}"' if t.status else ""
        parts.append(f'<figure{cls} title="{escape(t.title)}"><img src="{data_uri(t.png)}" alt="{escape(t.title)}">'
                     f"<figcaption>{escape(t.caption)}{'<br>' + escape(t.sub) if t.sub else ''}</figcaption></figure>")
    return '<div class="montage">' + "".join(parts) + "</div>"


def _nearest(row: ClassRow) -> str:
    return ", ".join(f"{escape(n)} <i>{s:.2f}</i>" for n, s in row.nearest) or "–"


def _index_table(page: Page) -> str:
    flagged = any(r.n_flagged is not None for r in page.rows)
    head = ["#", "class", "train images", "low weight"] + (["flagged"] if flagged else []) + ["estimated noise"]
    if page.has_truth:
        head.append("true noise")
    head.append("nearest classes (S_t)")
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = []
    for rank, r in enumerate(page.rows, 1):
        name = escape(r.name)
        link = f'<a href="#{_anchor(r.index)}">{name}</a>' if r.detailed else name
        cells = [str(rank), link, str(r.n_train), str(r.n_low)] + (
            [num(r.n_flagged, "d")] if flagged else []) + [pct(r.estimated)]
        if page.has_truth:
            cells.append(pct(r.true))
        cells.append(_nearest(r))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        '<div><input id="class-search" type="search" placeholder="filter classes by name" aria-label="filter classes"> '
        '<span id="class-count" class="muted"></span></div>'
        f'<div class="scroll"><table id="class-index"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}'
        "</tbody></table></div>"
    )


def _metrics_table(metrics: list[dict[str, Any]]) -> str:
    cols = ["run", "mode", "on", "seed", "top1", "top5", "n_train", "eval_labels"]
    th = "".join(f'<th class="{"l" if c in ("run", "mode", "on", "eval_labels") else ""}">{escape(c)}</th>' for c in cols)
    rows = []
    for m in metrics:
        cells = []
        for c in cols:
            v = m.get(c)
            if c in ("top1", "top5"):
                s = f"{v:.2f}%" if isinstance(v, (int, float)) else "–"  # sinet train stores percent
            else:
                s = num(v, "d") if isinstance(v, int) and not isinstance(v, bool) else ("–" if v is None else str(v))
            cells.append(f'<td class="{"l" if c in ("run", "mode", "on", "eval_labels") else ""}">{escape(s)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _detection_table(detection: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, m in detection.items():
        rows.append(f'<tr><td class="l">{escape(name)}</td><td>{escape(num(m.get("roc_auc"), ".4f"))}</td>'
                    f'<td>{escape(num(m.get("average_precision"), ".4f"))}</td>'
                    f'<td>{escape(pct(m.get("noise_rate")))}</td><td>{escape(num(m.get("rows"), "d"))}</td></tr>')
    return ('<table><thead><tr><th class="l">suspicion score</th><th>ROC-AUC</th><th>AP</th><th>true noise</th>'
            f'<th>rows</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _suspects_table(page: Page) -> str:
    head = ["", "id", "label", "suggested", "confidence", "weight"] + (["side text"] if page.side_text else [])
    th = "".join(f'<th class="{"" if h in ("confidence", "weight") else "l"}">{escape(h)}</th>' for h in head)
    body = []
    for s in page.suspects:
        alt = escape(f"{s.id}{'' if s.readable else ' (image unreadable)'}")
        cells = [f'<td><img src="{data_uri(s.png)}" alt="{alt}" title="{alt}"></td>',
                 f'<td class="l">{escape(s.id)}</td>', f'<td class="l">{escape(s.label)}</td>',
                 f'<td class="l">{escape(s.suggested)}</td>',
                 f"<td>{escape(num(s.confidence, '.2f'))}</td>", f"<td>{escape(num(s.weight, '.3f'))}</td>"]
        if page.side_text:
            cells.append(f'<td class="text">{escape(_plain(s.text, 300)) or "–"}</td>')
        body.append('<tr class="suspect">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="suspects"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}'
            "</tbody></table></div>")


def _plain(text: str, limit: int) -> str:
    from .console import plain

    return plain(text, limit)


def _resolution_table(page: Page) -> str:
    words = {"table": "class table", "name": "looked up by name", "parent": "placed below a parent",
             "none": "unresolved: text similarity only"}
    rows = []
    for r in page.resolution:
        src = r.get("source") or "none"
        rows.append(f'<tr><td class="l">{escape(r.get("class", ""))}</td><td class="l">{escape(r.get("synset") or "–")}'
                    f'</td><td class="l">{escape(words.get(src, src))}</td>'
                    f'<td class="l">{escape(r.get("lemma") or "–")}</td></tr>')
    return ('<div class="scroll"><table id="name-resolution"><thead><tr><th class="l">class</th>'
            '<th class="l">WordNet synset</th><th class="l">how</th><th class="l">matched lemma</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _provenance(items: list[dict[str, Any]]) -> str:
    out = []
    for a in items:
        meta = " · ".join(f"{escape(k)} {escape(str(a[k]))}" for k in ("fingerprint", "created", "package_version")
                          if a.get(k))
        params = json.dumps(a.get("params", {}), sort_keys=True, default=str)
        inputs = json.dumps(a.get("inputs", {}), indent=1, sort_keys=True, default=str)
        out.append(
            f'<details><summary><b>{escape(a["name"])}</b> <span class="muted">{escape(str(a["path"]))}</span></summary>'
            f'<div class="muted">{meta}</div>'
            f"<div>params</div><pre>{escape(params)}</pre><div>inputs</div><pre>{escape(inputs)}</pre></details>"
        )
    return "".join(out)


def _section(s: ClassSection, has_truth: bool) -> str:
    r = s.row
    stats = f"{r.n_train} training images, {r.n_low} with low weight: estimated noise {pct(r.estimated)}"
    if has_truth:
        stats += f", true noise {pct(r.true)}"
    return (
        f'<div class="class-block" id="{_anchor(s.index)}"><h3>{escape(s.name)}</h3>'
        f'<div class="muted">{escape(stats)}; nearest classes: {_nearest(r)}</div>'
        f'<div class="strip"><span class="label">suspect</span>{_thumbs(s.suspects)}</div>'
        f'<div class="strip"><span class="label">typical</span>{_thumbs(s.typical)}</div></div>'
    )


def render(page: Page) -> str:
    """The whole page as one string."""
    summary = "".join(f"<tr><td class=\"l\">{escape(k)}</td><td class=\"l\">{escape(v)}</td></tr>"
                      for k, v in page.summary)
    notes = "".join(f'<p class="muted">{escape(n)}</p>' for n in page.notes)
    legend = ("Border: <span style=\"color:#d62728\">red</span> = truly mislabeled, "
              "<span style=\"color:#2ca02c\">green</span> = correctly labeled (from the clean labels). "
              if page.has_truth else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(page.title)}</title><style>{STYLE}</style></head>",
        f'<body style="--thumb:{int(page.thumb_size)}px">',
        f"<h1>{escape(page.title)}</h1>",
        f"<table>{summary}</table>",
        f'<p class="rule">{escape(page.rule)}</p>',
        notes,
    ]
    if page.unknown:
        parts.append('<ul class="unknown" id="not-known">' + "".join(f"<li>{escape(u)}</li>" for u in page.unknown)
                     + "</ul>")
    if page.suspects:
        parts += ["<h2>Top suspects</h2>", f'<p class="muted">{escape(page.suspects_note)}</p>',
                  _suspects_table(page)]
    if page.metrics:
        parts += ["<h2>Accuracy on the validation split (metrics.json)</h2>", _metrics_table(page.metrics),
                  '<p class="muted">A: all images, unweighted; B: only images with weight above the threshold; '
                  "C: weighted by w (SINet); oracle: trained on the clean labels. eval_labels: clean_labels = "
                  "against the clean labels, labels = against the given val labels.</p>"]
    if page.detection:
        parts += ["<h2>Noise detection on the training split (scores.h5)</h2>", _detection_table(page.detection)]
    parts += [
        "<h2>Noise rate per class</h2>",
        '<div class="plots">' + _plot(page, "noise-rate.png") + "</div>",
        "<p>All classes, noisiest first. Classes with a link have a section with their images below.</p>",
        _index_table(page),
        "<h2>Weights</h2>",
        '<div class="plots">' + _plot(page, "weights.png") + _plot(page, "weights-by-class.png") + "</div>",
        *(["<h2>Class names</h2>",
            '<p class="muted">How each class name was placed in WordNet by build-graph (graph.h5 name_resolution); '
            "a class table's synset column overrides it.</p>", _resolution_table(page)] if page.resolution else []),
        "<h2>Class relations</h2>",
        f'<p class="muted">{escape(page.heatmap_note)}</p>',
        f'<div class="plots{" three" if page.heatmaps_in_a_row else ""}">'
        + "".join(_plot(page, n) for n in ("S_t.png", "S_w.png", "S_l.png")) + "</div>",
        "<h2>Classes in detail</h2>",
        f'<p class="muted">Per class: its most suspect training images (lowest weight; caption: the suggested class = '
        f"class of the nearest prototype, and the weight) and its most typical ones (nearest to the class prototype; "
        f"caption: the distance). {legend}Hover an image for its id.</p>",
        "".join(_section(s, page.has_truth) for s in page.sections),
        "<h2>Provenance</h2>",
        '<p class="muted">Parameters and input fingerprints of every artifact this report was built from.</p>',
        _provenance(page.provenance),
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
