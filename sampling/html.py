"""A self-contained HTML page for an evaluation report folder (``alit eval`` / ``alit demo``).

The page embeds every figure of the folder as a data URI, so it opens in a browser with no server and
survives being mailed or copied alone. It shows the rFID/gFID-vs-tokens plot, the numbers table, the
adaptive (token-count selection) histogram, the reconstruction grid and the sample grids, plus the
protocol, checkpoints and versions from ``report.json``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from tokenizer.core.io import atomic_write_text


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(x: Any, fmt: str) -> str:
    return "&ndash;" if x is None else format(x, fmt)


def render_html(report_dir: str | Path, title: str = "alit-stack report", extra: dict[str, str] | None = None) -> Path:
    """Write ``report.html`` into ``report_dir`` (which holds ``report.json`` and its figures); returns it."""
    root = Path(report_dir)
    report = json.loads((root / "report.json").read_text())
    rows = []
    for e in report["budgets"]:
        rows.append(f"<tr><td>{e['budget']}</td><td>{_num(e['rfid'], '.2f')}</td><td>{_num(e.get('gfid'), '.2f')}</td>"
                    f"<td>{_num(e['l1'], '.4f')}</td><td>{_num(e['lpips'], '.4f')}</td><td>{e['n_images']}</td></tr>")
    a = report.get("adaptive")
    if a:
        who = f", budgets: {a['length_model']}, generated mean {a['generated_mean_tokens']:.1f}, TV {a['length_tv']:.3f}" \
            if a.get("length_model") else ""
        rows.append(f"<tr class='tsc'><td>adaptive (mean {a['mean_tokens']:.1f}{html.escape(who)})</td>"
                    f"<td>{_num(a['rfid'], '.2f')}</td>"
                    f"<td>{_num(a.get('gfid'), '.2f')}</td><td>{_num(a['l1'], '.4f')}</td>"
                    f"<td>{_num(a['lpips'], '.4f')}</td><td>{a['n_images']}</td></tr>")
    figures = []
    for name, caption in [("fid_vs_tokens.png", "rFID and gFID against the token budget"),
                          ("adaptive_histogram.png", "budgets chosen per image by token-count selection"),
                          ("reconstructions.png", "reconstructions: rows = images; columns = original, then each "
                                                  "budget (and adaptive)"),
                          ("specialization.png", "token specialization: each latent token's attention over the 2D "
                                                 "grid (rows = the first iteration's tokens, last encoder layer; "
                                                 "columns = validation images; alit inspect draws more)"),
                          ("complexity/complexity.png", "complexity: the adaptive budget and each budget's L1 against "
                                                        "PNG/JPEG bits per pixel and the mean gradient (Spearman "
                                                        "in the titles; table in complexity/complexity.csv)")]:
        if (root / name).is_file():
            figures.append(f"<figure>{_img(root / name, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    for p in sorted(root.glob("samples_*.png")):
        label = p.stem.removeprefix("samples_")
        figures.append(f"<figure>{_img(p, label)}<figcaption>samples, {html.escape(label)}</figcaption></figure>")
    meta = {"protocol": report["protocol"]["id"], "tokenizer": report["tokenizer"]["tag"],
            "prior": (report.get("prior") or {}).get("tag", "none"), "split": report["data"]["split"],
            "images": str(report["data"]["n_images"]), "git commit": report["git_commit"],
            "created": report["created"], **(extra or {})}
    meta_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f4f4f4; text-align: left; }} tr.tsc td {{ font-style: italic; }}
figure {{ display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; }}
img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.9em; color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Per token count</h2>
<table><tr><th>budget</th><th>rFID</th><th>gFID</th><th>L1</th><th>LPIPS</th><th>images</th></tr>{''.join(rows)}</table>
<p>L1 is the mean absolute pixel error in [0, 1] units; FID with few images is strongly biased upward and is
comparable only at equal image counts under the same protocol.</p>
{''.join(figures)}
<h2>How these numbers were made</h2>
<table>{meta_rows}</table>
</body></html>
"""
    out = root / "report.html"
    atomic_write_text(out, page)
    return out
