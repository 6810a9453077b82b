"""Command-line helpers shared by the scripts; nothing here imports torch, so --help stays instant."""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import NoReturn

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


def exit_process(status: int) -> NoReturn:
    """sys.exit(status) without the interpreter's final garbage collection, which walks the million or so
    objects torch and its imports create and took 1-2 s of every command here. Atexit handlers still run and
    every file the scripts write is closed by then; the objects frozen are freed with the process."""
    gc.freeze()
    sys.exit(status)
