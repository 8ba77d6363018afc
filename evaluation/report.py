"""A self-contained HTML report (inline CSS, thumbnails as data URIs) and the numbers behind it."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from evaluation.catalog import CatalogInfo, catalog_image
from evaluation.evaluate import EvalResult

__all__ = ["per_category", "render_report"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1180px;color:#1d232a;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde3ea;padding-bottom:.3rem}
.sub{color:#5b6672} table{border-collapse:collapse;margin:.6rem 0} th,td{padding:.35rem .7rem;text-align:right;border-bottom:1px solid #eef1f4}
th:first-child,td:first-child{text-align:left} th{background:#f5f7f9;font-weight:600}
.up{color:#0a7d38;font-weight:600} .down{color:#b42318;font-weight:600} .counts td{color:#5b6672}
.query{display:grid;grid-template-columns:150px 1fr;gap:1rem;margin:1.2rem 0;padding:1rem;border:1px solid #e4e8ee;border-radius:10px}
.row{display:flex;gap:.5rem;align-items:flex-start;margin:.2rem 0 .6rem} .label{width:120px;font-size:12px;color:#5b6672;padding-top:.3rem}
figure{margin:0;width:104px;font-size:11px;color:#39424c} figure img{width:96px;height:96px;object-fit:cover;border-radius:6px;border:3px solid #e4e8ee;display:block}
figure.hit img{border-color:#12a150} figcaption{margin-top:.2rem;overflow:hidden;display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical}
.qimg img{width:140px;height:140px} .legend{font-size:12px;color:#5b6672}
"""

# Marks the page once every image has loaded (checked by the report test in headless Chromium).
_SCRIPT = """window.addEventListener('load',function(){var i=[].slice.call(document.images);
document.body.setAttribute('data-images-ok',String(i.length>0&&i.every(function(x){return x.complete&&x.naturalWidth>0})));});"""


def _thumbnail(uri: str | None, size: int = 96) -> str | None:
    if not uri:
        return None
    try:
        image = catalog_image(uri, size * 2)
        image.thumbnail((size * 2, size * 2))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image is shown as missing, the report still renders
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def per_category(result: EvalResult, catalog: CatalogInfo, metric: str = "ndcg") -> list[dict]:
    """Mean of `metric` per query category for every ranker, largest categories first."""
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(catalog.categories_of(result.queries)):
        groups.setdefault(category or "(unknown)", []).append(i)
    rows = []
    for category, idx in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        row = {"category": category, "queries": len(idx)}
        for name, metrics in result.per_query.items():
            row[name] = float(np.mean(metrics[metric][idx]))
        rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:+.1f}%"


def _figure(item_id: str, catalog: CatalogInfo | None, hit: bool, thumbs: dict) -> str:
    if item_id not in thumbs:
        thumbs[item_id] = _thumbnail(catalog.image_uris_of([item_id])[0] if catalog else None)
    src = thumbs[item_id]
    title = html.escape((catalog.titles_of([item_id])[0] if catalog else None) or item_id)
    image = f'<img src="{src}" alt="{html.escape(item_id)}">' if src else '<div class="sub">no image</div>'
    return f'<figure class="{"hit" if hit else ""}" title="{html.escape(item_id)}">{image}<figcaption>{title}</figcaption></figure>'


def render_report(result: EvalResult, doc: dict, catalog: CatalogInfo | None, sample_queries: int = 8,
                  seed: int = 0) -> str:  # fmt: skip
    """The report page: metrics with confidence intervals, counts, categories, and image grids."""
    names = list(result.per_query)
    k = result.k
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lookalike evaluation</title>"
             f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>Offline evaluation @ {k}</h1>",
             f"<p class='sub'>candidate <b>{html.escape(names[0])}</b>"
             + (f" vs baseline <b>{html.escape(names[1])}</b>" if len(names) > 1 else "")
             + f" · {len(result.queries):,} queries · interactions {html.escape(doc['interactions'])}</p>"]  # fmt: skip

    parts.append("<h2>Metrics</h2><table><tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names))
    if result.comparisons:
        parts[-1] += "<th>change</th><th>95% CI (relative)</th><th>95% CI (difference)</th>"
    parts[-1] += "</tr>"
    comparisons = {c.metric: c for c in result.comparisons}
    for metric in ("ndcg", "recall", "mrr", "hit_rate"):
        label = f"{metric}@{k}"
        cells = "".join(f"<td>{result.mean(n, metric):.4f}</td>" for n in names)
        c = comparisons.get(label)
        if c:
            css = "up" if c.delta_ci[0] > 0 else "down" if c.delta_ci[1] < 0 else ""
            rel_ci = f"[{_pct(c.relative_ci[0])}, {_pct(c.relative_ci[1])}]" if c.relative_ci else "–"
            cells += (f"<td class='{css}'>{_pct(c.relative)}</td><td>{rel_ci}</td>"
                      f"<td>[{c.delta_ci[0]:+.4f}, {c.delta_ci[1]:+.4f}]</td>")  # fmt: skip
        parts.append(f"<tr><td>{label}</td>{cells}</tr>")
    cover = "".join(f"<td>{result.coverage[n]:.3f}</td>" for n in names)
    parts.append(f"<tr><td>catalog coverage</td>{cover}</tr></table>")

    if doc.get("gates"):
        parts.append("<h2>Gates</h2><table><tr><th>gate</th><th>value</th><th>threshold</th><th>result</th></tr>")
        for g in doc["gates"]:
            verdict = "<span class='up'>pass</span>" if g["passed"] else "<span class='down'>FAIL</span>"
            parts.append(
                f"<tr><td>{html.escape(g['gate'])}</td><td>{g['value']:.4f}</td><td>{g['threshold']:.4f}</td><td>{verdict}</td></tr>"
            )
        parts.append("</table>")

    parts.append("<h2>Queries</h2><table class='counts'>")
    parts.extend(
        f"<tr><td>{html.escape(key.replace('_', ' '))}</td><td>{value:,}</td></tr>"
        for key, value in result.counts.items()
    )
    parts.append("</table>")

    if doc.get("per_category"):
        parts.append(f"<h2>nDCG@{k} by category</h2><table><tr><th>category</th><th>queries</th>"
                     + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")  # fmt: skip
        for row in doc["per_category"]:
            parts.append(f"<tr><td>{html.escape(row['category'])}</td><td>{row['queries']:,}</td>"
                         + "".join(f"<td>{row[n]:.4f}</td>" for n in names) + "</tr>")  # fmt: skip
        parts.append("</table>")

    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(result.queries), size=min(sample_queries, len(result.queries)), replace=False))
    parts.append(
        "<h2>Sampled queries</h2><p class='legend'>Green border: the shopper clicked it after viewing the query item.</p>"
    )
    thumbs: dict[str, str | None] = {}
    for i in picks:
        query, relevant = result.queries[i], result.relevant(i)
        rows = "".join(
            f"<div class='row'><div class='label'>{html.escape(n)}<br>nDCG {result.per_query[n]['ndcg'][i]:.3f}</div>"
            + "".join(_figure(item, catalog, item in relevant, thumbs) for item in result.ranking(n, i)) + "</div>"
            for n in names
        )  # fmt: skip
        parts.append(
            f"<div class='query'><div class='qimg'>{_figure(query, catalog, False, thumbs)}</div><div>{rows}</div></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
