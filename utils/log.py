"""The project's logger: one named logger that scripts configure and modules write to."""
import logging
import os

from tqdm import tqdm

LOGGER = logging.getLogger("yolo")


class ProgressBarHandler(logging.StreamHandler):
    """Writes each message on its own line above any tqdm progress bar drawn on the same stream (tqdm.write
    clears the bar, prints, and redraws it), instead of gluing it onto the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: a failed write is reported, never raised into the caller
            self.handleError(record)


def set_logging(rank: int = -1, verbose: bool = True) -> None:
    """Print INFO on the main process only; other DDP ranks report warnings and errors."""
    rank = int(os.getenv("RANK", rank))
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    if not LOGGER.handlers:
        handler = ProgressBarHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
