"""`SearchError` and the checks of a query that need no model (`check_text`, `check_k`):
light (no torch), so that the command line refuses a bad query before anything loads."""
from __future__ import annotations

import numbers


class SearchError(ValueError):
    """A search index or a query that cannot be used; the one-line message says why and
    what to do."""


def check_text(query) -> None:
    """Refuse what cannot be a query (SearchError, one line): not a str (bytes included),
    not valid UTF-8 (a lone surrogate: a command-line argument whose bytes were not UTF-8
    arrives with surrogate escapes), empty or only whitespace."""
    if isinstance(query, (bytes, bytearray)):
        raise SearchError("the query is bytes, not text; decode it (UTF-8) into a str first")
    if not isinstance(query, str):
        raise SearchError(f"the query has type {type(query).__name__}, not str; pass the query as text")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(query[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise SearchError(f"the query is not valid UTF-8 ({what} at character {error.start}); pass the query as "
                          f"UTF-8 text") from None
    if not query.strip():
        raise SearchError('the query is empty; pass some words, e.g. "a dog on the beach"')


def check_k(k, name: str = "k") -> int:
    """``k`` (or the count ``name``) as an int if it is a positive integer; else SearchError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        what = "how many results" if name == "k" else "how many pictures to score exactly"
        raise SearchError(f"{name}={k!r} is not a positive integer; pass {name} >= 1 ({what})")
    return int(k)
