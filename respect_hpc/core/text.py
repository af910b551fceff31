"""Text from data made safe to print: never read as markup, control characters made visible, long values
clipped.

Policy names, game ids, paths and utterances come from files a user (or someone else) wrote: a terminal
escape sequence in an utterance must not clear a screen or write a clipboard, ``[/x]`` in a name must not
break or silently restyle a line, and a refused 5 MB value must not be echoed whole.
"""

from __future__ import annotations

from rich.console import Console

CLIP = 200  # characters of a value an error message shows (a long path fits)


def printable(value: object) -> str:
    """``value`` as text with every control character but newline and tab shown as its escape (``\\x1b``)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in str(value))


def clip(value: object, limit: int = CLIP) -> str:
    """A short excerpt of a value's repr (strings quoted, control characters escaped), for error messages."""
    text = printable(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def log_console() -> Console:
    """A console for a job's log (stderr): lines kept whole, nothing read as markup, emoji or highlighting."""
    return Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)


def duration(seconds: float) -> str:
    """A time span as 3m07s, or 2h05m from an hour on (progress lines, ETAs)."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
