"""The one exception type for errors a user can cause (bad files, unsupported ops, bad data), and
the helpers that keep its messages to one readable line."""

# Details quoted in messages (a library's text, a value's repr) are clipped to this many characters.
MAX_DETAIL_CHARS = 200


class OnnxZipError(Exception):
    """A problem with the user's models, data or options; the message names the culprit."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's text inside one of ours), else its type."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def printable(text: str) -> str:
    """Text as one printable line: line breaks and other control characters (from file names, option
    values, metadata) escaped as Python writes them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Text of at most ``limit`` characters (and '...')."""
    return text if len(text) <= limit else text[:limit] + "..."
