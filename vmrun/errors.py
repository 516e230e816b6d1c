"""The one exception type that reaches the user as a single red line and exit code 4."""


class VmrunError(Exception):
    """A user-facing error: bad input, missing file, a guest image we cannot use.

    The message is one line saying what is wrong and where (file, key path, value).
    """

    exit_code = 4
