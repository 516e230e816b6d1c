"""The exception types that reach the user as a single red line and exit code 4.

A leaf module: it imports nothing from vmrun, so every layer (the config loader, the plugin
system, the block layer) can raise these without import cycles.
"""


class VmrunError(Exception):
    """A user-facing error: bad input, missing file, a guest image we cannot use.

    The message is one line saying what is wrong and where (file, key path, value).
    """

    exit_code = 4


class ConfigError(VmrunError):
    """A problem with a machine file: one line naming the file, the key path and the value.

    Line breaks are escaped here, whoever builds the message, so that a value (or a file name)
    containing one cannot split the error over several lines.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
