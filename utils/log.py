"""The project's logger: one named logger that scripts configure and modules write to."""
import logging
import os

LOGGER = logging.getLogger("yolo")


def set_logging(rank: int = -1, verbose: bool = True) -> None:
    """Print INFO on the main process only; other DDP ranks report warnings and errors."""
    rank = int(os.getenv("RANK", rank))
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
