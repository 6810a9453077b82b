"""Where runs write: numbered run folders (runs/train/exp, exp2, ...), and the newest run's weights."""
from __future__ import annotations

import re
from pathlib import Path

from utils.cli import shown_path

# Where val.py, detect.py and export.py without --weights look for the newest best.pt (train.py's default project)
TRAIN_RUNS = Path(__file__).resolve().parents[1] / "runs" / "train"


def increment_path(path: str | Path, exist_ok: bool = False) -> Path:
    """path itself when free (or with exist_ok), else path{N} with N one above the highest number in use,
    so the newest run always carries the highest number (runs/val/exp -> exp2, exp3, ...)."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    numbered = re.compile(rf"^{re.escape(path.name)}(\d+)$")
    used = [int(m.group(1)) for p in path.parent.glob(f"{path.name}*") if (m := numbered.match(p.name))]
    return path.with_name(f"{path.name}{max(used + [1]) + 1}")


def latest_best_weights(runs_dir: str | Path) -> Path:
    """The newest runs_dir/**/weights/best.pt: what val.py, detect.py and export.py use without --weights.
    FileNotFoundError (one line) when there is none."""
    runs_dir = Path(runs_dir)
    found = sorted(runs_dir.glob("**/weights/best.pt"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no --weights given and no trained weights found under {shown_path(runs_dir)}; "
                                "pass --weights path/to/best.pt")
    return found[-1]
