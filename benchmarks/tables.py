"""Benchmark tables printed as aligned text or as Markdown ready for RESULTS.md, and the CPU name their notes cite."""

from __future__ import annotations

import platform


def render(title: str, headers: list[str], rows: list[list[str]], notes: list[str], markdown: bool) -> str:
    """A table as Markdown or as aligned text, first column left-aligned and the others right-aligned."""
    if markdown:
        lines = [f"### {title}", "", "| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += [""] + [f"- {note}" for note in notes]
        return "\n".join(lines) + "\n"
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    body = [title, line(headers), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
    return "\n".join(body + [f"  * {note}" for note in notes]) + "\n"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()
