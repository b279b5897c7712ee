"""The one exception type users see: the CLI prints its message and exits 1."""


class DvectorError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""
