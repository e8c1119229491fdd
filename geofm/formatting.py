"""How a value is written in every table the workflow prints or writes (Markdown, HTML, console)."""

from __future__ import annotations


def value(v, digits: int = 4, width: int | None = None) -> str:
    """None -> '', floats to `digits` significant digits, anything else as str (cut to `width`)."""
    if v is None:
        return ""
    text = f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    return text if width is None else text[:width]


def markdown(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table (for papers and READMEs)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(value(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict], columns: list[str], width: int = 60) -> str:
    """A plain aligned table for a console; columns empty in every row are left out."""
    columns = [c for c in columns if any(value(r.get(c), width=width) for r in rows)]
    widths = {c: max(len(c), *(len(value(r.get(c), width=width)) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(value(r.get(c), width=width).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
