"""One error type for bad user input: the stages print its message as one line and exit 2."""


class LeoInputError(Exception):
    """Bad input (file, key, flag or data) that the user must fix; message is one clear line."""
