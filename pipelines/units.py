"""Human-readable numbers for panels and logs: bytes, parameter counts, durations (no torch: the studio uses it)."""

from __future__ import annotations


def format_bytes(n: int | None) -> str:
    """Bytes in binary units, e.g. '1.50 GiB'; 'n/a' for None."""
    if n is None:
        return "n/a"
    sign, value = ("-" if n < 0 else ""), float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    return f"{sign}{value:.2f} TiB"


def format_count(n: int) -> str:
    """A parameter count in short form: '11.89B', '7.3M', '12.5K', '512'."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def format_seconds(seconds: float | None) -> str:
    """A duration as '42 s', '3 min 05 s' or '1 h 02 min'; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
