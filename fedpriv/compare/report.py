"""One self-contained HTML report: the comparison table, the notes and the PNGs inlined as base64."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def write_html(path: Path, header: list[str], rows: list[list[str]], plots: dict[str, Path], notes: list[str], title: str) -> Path:
    def img(name: str, p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(p.name)}</figcaption></figure>'

    thead = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    tbody = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table><thead><tr>{thead}</tr></thead><tbody>
{tbody}
</tbody></table>
{f"<ul>{notes_html}</ul>" if notes else ""}
{"".join(img(n, p) for n, p in plots.items())}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path
