"""How much of a text that may quote a client's strings (a model name, an input name, a
path) an answer or a log line carries: a client may send megabytes, and the answer or
the line must not grow with them.

The text is cut in its middle, not at its end: a message names what was asked for at its
start and what the server has at its end ("unknown input '...': model 'm' takes 'x'"),
and the caller needs both.
"""

from __future__ import annotations

_CUT_NOTE = " [... {} characters cut ...] "


def bounded(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: whole, or its head and its tail around a
    note of how many characters were cut between them (its head alone where `limit`
    leaves no room for the note)."""
    if len(text) <= limit:
        return text
    # The note counts at most len(text) characters: it never takes more room than this.
    room = limit - len(_CUT_NOTE.format(len(text)))
    if room < 2:
        return text[:limit]
    head = room - room // 2
    tail = room // 2
    return text[:head] + _CUT_NOTE.format(len(text) - room) + text[len(text) - tail:]
