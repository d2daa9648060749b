"""User-facing errors: one line, naming the file (and line or image id) and what is wrong."""


class SinetError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""


class InputError(SinetError):
    """A malformed input file. Formats as ``file:line: message`` when a line is known."""

    def __init__(self, path: object, message: str, line: int | None = None):
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
