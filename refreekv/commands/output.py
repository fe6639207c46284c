"""Where results go: JSON, Markdown tables and PNG plots under one folder."""

from __future__ import annotations

import json
from pathlib import Path


def write(out_dir: str | Path, name: str, data, markdown: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=float))
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x).replace("|", "\\|").replace("\n", " ") for x in r) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(title: str, headers: list[str], rows: list[list]):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for h in headers:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*[f"{x:.4g}" if isinstance(x, float) else str(x) for x in r])
    return t
