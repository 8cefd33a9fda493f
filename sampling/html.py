"""A self-contained HTML page for an evaluation report folder (``alit eval`` / ``alit demo``).

The page embeds every figure of the folder as a data URI, so it opens in a browser with no server and
survives being mailed or copied alone. It shows the rFID/gFID-vs-tokens plot, the numbers table, the
adaptive (token-count selection) histogram, the reconstruction grid and the sample grids, plus the
protocol, checkpoints and versions from ``report.json``. Every numbers table names the evaluation protocol
in its caption (``sampling.protocol``), and the standard metric set (FID, sFID, KID, precision/recall, IS)
has a table of its own.

:func:`check_in_browser` opens the page in headless Chromium (Debian's ``chromium``) and reports whether every
figure decoded, what the console said, and the tables' captions; it keeps a screenshot beside the page.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tokenizer.core.io import atomic_write_text

from .report import METRIC_COLUMNS, metric_notes, metric_rows


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
    p = report["protocol"]
    caption = f"protocol {p['summary']}"  # the summary starts with the protocol's name
    metric_head = "".join(f"<th>{html.escape(c)}</th>" for c in METRIC_COLUMNS)
    metric_rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                               for row in metric_rows(report))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in metric_notes(report))
    meta = {"protocol": report["protocol"]["id"], "evaluation protocol": p["summary"],
            "reference (reconstructions)": p["recon_reference"], "reference (samples)": p["gen_reference"], "tokenizer": report["tokenizer"]["tag"],
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
caption {{ caption-side: top; text-align: left; font-size: 0.9em; color: #444; padding: 4px 0; }}
figure {{ display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; }}
img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.9em; color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Per token count</h2>
<table><caption>{html.escape(caption)}</caption>
<tr><th>budget</th><th>rFID</th><th>gFID</th><th>L1</th><th>LPIPS</th><th>images</th></tr>{''.join(rows)}</table>
<h2>Standard metrics</h2>
<table class="metrics"><caption>{html.escape(caption)}; reconstructions against {html.escape(p["recon_reference"])},
samples against {html.escape(p["gen_reference"])}</caption><tr>{metric_head}</tr>{metric_rows_html}</table>
<ul class="notes">{notes}</ul>
<p>L1 is the mean absolute pixel error in [0, 1] units; FID with few images is strongly biased upward and is
comparable only at equal image counts under the same protocol.</p>
{''.join(figures)}
<h2>How these numbers were made</h2>
<table><caption>{html.escape(caption)}</caption>{meta_rows}</table>
</body></html>
"""
    out = root / "report.html"
    atomic_write_text(out, page)
    return out


# ============================================================================ checking the page in a browser
# Runs inside the page before anything else: records errors and console.error, then on load every image's
# natural size and every table's caption, into a <pre id="alit-check"> that --dump-dom prints.
_PROBE = """<script>
window.__alit = {errors: [], console: []};
window.addEventListener("error", e => window.__alit.errors.push(String(e.message || (e.target && e.target.src
  ? "failed to load " + e.target.src.slice(0, 60) : e))), true);
for (const level of ["error", "warn"]) {
  const original = console[level].bind(console);
  console[level] = (...args) => { window.__alit.console.push(level + ": " + args.join(" ")); original(...args); };
}
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "alit-check";
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                            height: i.naturalHeight})),
    tables: [...document.querySelectorAll("table")].map(t => t.caption ? t.caption.textContent : null),
    errors: window.__alit.errors, console: window.__alit.console});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or ``chromium-browser`` / ``google-chrome``) on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(binary: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    home = tempfile.mkdtemp(prefix="alit-chromium-")  # a private profile: no state shared between runs
    try:
        return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-extensions", f"--user-data-dir={home}", "--enable-logging=stderr",
                               "--v=0", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HOME": home})
    finally:
        shutil.rmtree(home, ignore_errors=True)


def check_in_browser(page: str | Path, *, screenshot: str | Path | None = None, chromium: str | None = None,
                     width: int = 1200, height: int = 4000, timeout: float = 120.0) -> dict[str, Any]:
    """Render ``page`` (a ``report.html``) in headless Chromium.

    Returns ``{"images": [{alt, complete, width, height}], "tables": [caption or None], "errors": [...],
    "console": [...], "screenshot": path}``: ``errors`` holds page errors and failed loads, ``console`` the
    page's console.error/warn calls and the browser's ``CONSOLE`` log lines. The screenshot (PNG,
    ``width`` x ``height``) goes to ``screenshot`` (default: ``report.png`` beside the page).
    """
    page = Path(page).resolve()
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH: install Debian's chromium (apt-get install chromium)")
    probe = page.with_name(f".{page.stem}.check.html")  # beside the page: the same relative paths resolve
    text = page.read_text()
    head = text.find("<head>")
    probe.write_text(text[:head + 6] + _PROBE + text[head + 6:] if head >= 0 else _PROBE + text)
    try:
        dom = _chromium(binary, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), timeout=timeout)
    finally:
        probe.unlink(missing_ok=True)
    start, end = dom.stdout.find('<pre id="alit-check">'), dom.stdout.find("</pre>", dom.stdout.find('id="alit-check"'))
    if start < 0 or end < 0:
        raise RuntimeError(f"chromium rendered no check result (rc {dom.returncode}): {dom.stderr[-2000:]}")
    raw = html.unescape(dom.stdout[start + len('<pre id="alit-check">'):end])
    result = json.loads(raw)
    result["console"] += [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    shot = Path(screenshot) if screenshot is not None else page.with_name("report.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    taken = _chromium(binary, f"--screenshot={shot}", f"--window-size={width},{height}",
                      "--hide-scrollbars", page.as_uri(), timeout=timeout)
    if not shot.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (rc {taken.returncode}): {taken.stderr[-2000:]}")
    result["screenshot"] = str(shot)
    return result
