"""Command-line helpers shared by the scripts; nothing here imports torch, so --help stays instant."""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

DEFAULT_IMGSZ = 640  # pixels: --img of val.py, detect.py and export.py when neither it nor the weights say


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (the help text then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


def shown_path(path: str | Path) -> str:
    """A path as the user would type it: relative to the working folder when it lies inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def args_line(command: str, opt: argparse.Namespace) -> str:
    """Every option of a command in one line, as YOLOv5 prints them: 'train: weights=, cfg=yolov5n.yaml, ...'."""
    return f"{command}: " + ", ".join(f"{k}={v}" for k, v in vars(opt).items())


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a yaml file that `what` names ('--data', '--hyp', 'model config'). A folder, or a
    binary file given by mistake (a .pt, a .jpg), raises ValueError with one line naming both."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a yaml file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a yaml file: it holds binary data, not text") from None


class FlagError(ValueError):
    """A command-line value outside its range; the message is one line naming the flag and the range."""


@dataclass(frozen=True)
class Range:
    """The values a numeric flag takes: low <= v (low < v when low_open), v <= high when high is given."""
    low: float
    high: float | None = None
    low_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"


AT_LEAST_0, AT_LEAST_1, UNIT_INTERVAL = Range(0), Range(1), Range(0, 1)
SIZE_RULE = "one positive number or two (h w)"  # --img of detect.py and export.py, the hub's size=


def check_flags(opt, ranges: dict[str, tuple[str, Range]]) -> None:
    """Refuse, with FlagError, the first value of `opt` (a Namespace or a dict of its values) outside its range:
    ranges maps each option's name to (its flag, its Range); a list value (--img h w) is checked item by item, and
    None (not given) is not checked; an --img list must hold one or two sizes."""
    values = opt if isinstance(opt, dict) else vars(opt)
    for name, (flag, allowed) in ranges.items():
        value = values.get(name)
        if value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        given = " ".join(map(str, items)) or "nothing"
        if isinstance(value, (list, tuple)) and flag == "--img":  # h w, or one size for both
            if len(items) not in (1, 2) or not all(item in allowed for item in items):
                raise FlagError(f"--img must be {SIZE_RULE}, got {given}")
        elif not all(item in allowed for item in items):
            raise FlagError(f"{flag} must be {allowed}, got {given}")


def refuse_bad_flags(command: str, check: Callable[[argparse.Namespace], None], opt: argparse.Namespace,
                     errors: tuple[type[Exception], ...] = (ValueError,)) -> None:
    """At a script's start, before its imports of torch take seconds: a value that check() refuses (raising one of
    `errors`: FlagError is a ValueError) ends the process with one line, 'command: message', and exit status 1."""
    try:
        check(opt)
    except errors as e:
        from utils.log import LOGGER, set_logging  # tqdm only: still quick

        set_logging()
        LOGGER.error(f"{command}: {e}")
        sys.exit(1)


def exit_process(status: int) -> NoReturn:
    """sys.exit(status) without the interpreter's final garbage collection, which walks the million or so
    objects torch and its imports create and took 1-2 s of every command here. Atexit handlers still run and
    every file the scripts write is closed by then; the objects frozen are freed with the process."""
    gc.freeze()
    sys.exit(status)
