"""The exception types users see: the CLI prints the message as one line and exits with ``exit_code``."""


class DvectorError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""

    exit_code = 1


class Stopped(DvectorError):
    """Work stopped early on request (SIGTERM, SIGINT) after keeping what it had: the message says where
    it is kept; the exit status is 128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
