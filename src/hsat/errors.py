"""One exception type for bad user input, so the CLI can print it and exit non-zero."""


class HSATError(Exception):
    """Bad input or state a user can fix: the message names the file, key or value."""
