"""What the command line and the tools print on a terminal, and how.

Keys, paths and messages may hold any character (an S3 key may hold ESC, BEL or a
newline); :func:`printable` escapes them so that no text from outside drives the user's
terminal or breaks a one-line message. JSON output is never escaped here: ``json.dumps``
escapes control characters itself and keeps the value exact.
"""

from __future__ import annotations

import re

#: C0 and C1 controls, DEL, line/paragraph separators, bidirectional overrides and
#: isolates (they reorder what the terminal shows), and lone surrogates (undecodable
#: bytes of a local file name; printing them would raise).
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: object) -> str:
    """``str(text)`` with every control character written as an escape (``\\x1b``, ``\\n``)."""
    return _UNPRINTABLE.sub(_escape, str(text))
