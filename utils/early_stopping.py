"""Early stopping: end training when fitness has not improved for `patience` epochs."""
from __future__ import annotations

from utils.log import LOGGER


class EarlyStopping:
    """Tracks the best fitness and the epoch it was reached; `__call__` says whether to stop.

    Its state round-trips through state_dict/load_state_dict, so a resumed run keeps counting patience
    from where it was.
    """

    def __init__(self, patience: int = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = float("inf") if patience <= 0 else patience  # patience 0 or less never stops

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:  # >= so that a run stuck at 0 in its first epochs keeps going
            self.best_epoch = epoch
            self.best_fitness = float(fitness)
        stop = self.stopped(epoch)
        if stop:
            LOGGER.info(f"Stopping training early: no improvement in the last {self.patience} epochs. "
                        f"Best results were at epoch {self.best_epoch}. "
                        f"Use --patience 0 to disable early stopping, or a larger --patience.")
        return stop

    def stopped(self, epoch: int) -> bool:
        """Whether the call for `epoch` said stop: a resumed run learns from the saved state that it had ended."""
        return epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        return {"best_fitness": self.best_fitness, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_fitness = float(state["best_fitness"])
        self.best_epoch = int(state["best_epoch"])
