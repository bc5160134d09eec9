"""The one exception type for errors a user can cause (bad files, unsupported ops, bad data)."""


class OnnxZipError(Exception):
    """A problem with the user's models, data or options; the message names the culprit."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's text inside one of ours), else its type."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
