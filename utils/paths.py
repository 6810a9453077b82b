"""Where runs write: numbered run folders (runs/train/exp, exp2, ...)."""
from __future__ import annotations

import re
from pathlib import Path


def increment_path(path: str | Path, exist_ok: bool = False) -> Path:
    """path itself when free (or with exist_ok), else path{N} with N one above the highest number in use,
    so the newest run always carries the highest number (runs/val/exp -> exp2, exp3, ...)."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    numbered = re.compile(rf"^{re.escape(path.name)}(\d+)$")
    used = [int(m.group(1)) for p in path.parent.glob(f"{path.name}*") if (m := numbered.match(p.name))]
    return path.with_name(f"{path.name}{max(used + [1]) + 1}")
