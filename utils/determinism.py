"""What --deterministic cannot promise, said as it happens.

train.py --deterministic asks torch for deterministic kernels with ``use_deterministic_algorithms(True,
warn_only=True)``: a kernel that has no deterministic implementation then only warns ("<op> does not have a
deterministic implementation, but you set ...") instead of stopping the run, and a run that used one may not resume
bit-exactly, which the README promises for --deterministic runs. DeterminismWatch counts those warnings, one per
kernel, and logs each new kernel as a one-line warning that says so.
"""
from __future__ import annotations

import warnings

from utils.log import LOGGER

MESSAGE = "does not have a deterministic implementation"


class DeterminismWatch:
    """Wraps ``warnings.showwarning`` (torch's alerts reach Python as UserWarnings); ``kernels`` lists the
    kernels seen, in order. install() is idempotent; uninstall() puts the previous hook back."""

    def __init__(self):
        self.kernels: list[str] = []
        self._previous = None

    def install(self) -> None:
        if self._previous is not None:
            return
        self._previous = previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            self.seen(str(message))
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def uninstall(self) -> None:
        if self._previous is not None:
            warnings.showwarning, self._previous = self._previous, None

    def seen(self, text: str) -> None:
        if MESSAGE not in text:
            return
        kernel = text.split(MESSAGE)[0].strip() or "a kernel"
        if kernel in self.kernels:
            return
        self.kernels.append(kernel)
        LOGGER.warning(f"WARNING: --deterministic: {kernel} has no deterministic implementation (torch only warns); "
                       f"{len(self.kernels)} such kernel(s) so far: this run may not resume bit-exactly")


WATCH = DeterminismWatch()  # the process's own, installed by utils.torch_utils.init_seeds(deterministic=True)
