"""The one exception type for errors a user can cause (bad files, unsupported ops, bad data)."""


class OnnxZipError(Exception):
    """A problem with the user's models, data or options; the message names the culprit."""
