"""Exceptions raised by birder.

Every error a user can cause (a bad file, a bad name, no network) is a ``BirderError`` with a one-line message
that names the input and says what to do, so command-line tools can print it without a traceback.
"""


class BirderError(Exception):
    """Base class of every error birder raises on purpose."""


def check_at_least(value: float, minimum: float, what: str, error: type[Exception] = BirderError) -> None:
    """Raise ``error`` (one line naming ``what``) when a count or a size is below ``minimum``."""
    if not value >= minimum:  # NaN too
        raise error(f"{what} must be at least {minimum:g}, got {value:g}")


class UnknownModelError(BirderError, KeyError):
    """A network or pretrained model name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(BirderError):
    """A model file that cannot be read, or that does not fit the network."""


class DownloadError(BirderError):
    """A download that failed (offline, HTTP error, interrupted transfer)."""


class ChecksumMismatchError(DownloadError):
    """A file whose sha256 differs from the manifest's."""


class RunFailedError(BirderError):
    """A run that failed for no single input's sake (the model or the transform raised): exit code 1, not 2."""


class ImageDecodeError(BirderError):
    """An image file that cannot be decoded (missing, empty, truncated, not an image)."""


def one_line(exc: BaseException | str, limit: int | None = 300) -> str:
    """``exc``'s message on one line (white space folded, at most ``limit`` characters), else its type's name.

    The one way birder turns a library's exception into the reason it prints or records (failures tables, CLI
    errors): library messages can span lines (torch.load's run to paragraphs), which would break a table row.
    """
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__

    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
