"""Terminal output of the command line and the benchmarks: tables and a progress bar drawn by ``rich``
when it is installed (the ``cli`` extra), plain text otherwise; markdown tables for results meant to be
pasted into notes. A GPU image may hold only torch, triton and numpy: nothing here may fail for want of
``rich``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import TracebackType

# Without a terminal (CI logs, a captured remote run) rich would wrap tables at 80 columns.
CAPTURED_WIDTH = 200
RICH_MISSING = "rich is not installed: plain tables and progress lines (pip install rich, or the `cli` extra)"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left/right-aligned text table (no dependency): numbers right, text left."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_numberlike(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def format_markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (cells as given: format numbers first)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|---" * len(headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _numberlike(s: str) -> bool:
    try:
        float(s.rstrip("!x%"))
        return True
    except ValueError:
        return s in ("-", "")


def _console():  # -> rich.console.Console | None
    try:
        from rich.console import Console
    except ImportError:
        return None
    # markup off: cells and log lines hold brackets ("[1/4 D=64 ...]") that are not rich markup
    console = Console(markup=False, highlight=False)
    if not console.is_terminal:
        console = Console(markup=False, highlight=False, width=CAPTURED_WIDTH)
    return console


def rich_available() -> bool:
    return _console() is not None


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "",
          markdown: bool = False) -> None:
    """Print a table: numeric columns right-aligned, a cell "FAIL..." or ending in "!" in red; with
    ``markdown``, as plain markdown (:func:`format_markdown`) to paste into notes."""
    if markdown:
        print(("\n" + title if title else ""), format_markdown(headers, rows), sep="\n", flush=True)
        return
    console = _console()
    cells = [[str(c) for c in r] for r in rows]
    if console is None:
        print(("\n" + title if title else ""), format_table(headers, cells), sep="\n", flush=True)
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, h in enumerate(headers):
        numeric = all(_numberlike(r[i]) for r in cells)
        t.add_column(str(h), justify="right" if numeric else "left", no_wrap=numeric)
    for r in cells:
        t.add_row(*(Text(c, style="bold red" if c.startswith("FAIL") or c.endswith("!") else "") for c in r))
    console.print()
    if title:
        console.print(title, style="bold")
    console.print(t)
    sys.stdout.flush()


class Progress:
    """A progress bar over ``total`` steps with log lines above it (rich), or just the log lines.

    ``with Progress(n, "bench") as bar: bar.log("a line"); bar.advance()``
    """

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description = total, description
        self._bar = None
        console = _console()
        if console is None:
            print(f"({RICH_MISSING})", flush=True)
        else:
            import rich.progress as rp

            self._bar = rp.Progress(
                rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TimeElapsedColumn(), rp.TextColumn("eta"), rp.TimeRemainingColumn(), console=console)
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> Progress:  # noqa: PYI034 - typing.Self needs Python 3.11
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def log(self, line: str) -> None:
        if self._bar is None:
            print(line, flush=True)
        else:
            self._bar.console.print(line)

    def advance(self, description: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=description or self.description)
