"""The log and the progress bars: a message written during an epoch appears on a line of its own above the bar."""
import io
import logging
import re

from tqdm import tqdm

from utils.log import LOGGER, ProgressBarHandler, set_logging


def test_a_message_during_a_progress_bar_gets_its_own_line():
    stream = io.StringIO()
    handler = ProgressBarHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("yolo.test_log")
    logger.addHandler(handler)
    logger.propagate = False
    message = "Skipped the optimizer step at iteration 6: gradient norm is inf"
    try:
        with tqdm(total=4, file=stream, bar_format="{l_bar}{bar:10}{r_bar}", desc="  0/2  0G  0.1") as bar:
            bar.update(2)
            logger.warning(message)
            bar.update(2)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    # The terminal shows what follows the last carriage return of each line: the message alone, then the bar again.
    shown = [line.split("\r")[-1] for line in text.split("\n")]
    assert message in shown
    after = text.split(message, 1)[1]
    assert re.search(r"\d+/4", after)  # the bar is drawn again below the message
    # set_logging installs this handler for the project's logger (once: other code may add its own first)
    saved = LOGGER.handlers[:]
    LOGGER.handlers.clear()
    try:
        set_logging()
        assert [type(h) for h in LOGGER.handlers] == [ProgressBarHandler]
    finally:
        LOGGER.handlers[:] = saved
