"""Client-chosen text made safe for where it lands: span names and attributes (`cap`: bounded
length) and log lines (`log_safe`: bounded, every control character escaped, so a request id or
field name cannot forge log lines, colour a terminal or flood the log)."""

from __future__ import annotations

MAX_TRACE_CHARS = 256  # a span name or string attribute value holds at most this many
MAX_LOG_CHARS = 128  # client text in one log argument


def cap(text: str, limit: int = MAX_TRACE_CHARS) -> str:
    """`text` cut to at most `limit` characters (the last one "…" when it was cut)."""
    if len(text) <= limit:
        return text
    return text[:max(limit - 1, 0)] + "…" if limit > 0 else ""


def log_safe(text: object, limit: int = MAX_LOG_CHARS) -> str:
    """`text` for a log line, as `repr()` writes a string (quoted; backslash, quotes and every
    unprintable character escaped) after cutting it to `limit` characters; a cut one says how
    much is left out."""
    value = text if isinstance(text, str) else str(text)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}...(+{len(value) - limit} chars)"
