"""What the benches that run YOLOv5's own train.py in its separate interpreter need from its checkout: train.py's
source with its hard-coded nominal batch changed, and the font its check_dataset would otherwise download."""
from __future__ import annotations

from pathlib import Path

NBS_LINE = "    nbs = 64  # nominal batch size"


def train_source_with_nbs(src: str, nbs: int, bench: str) -> str:
    """YOLOv5's train.py source with its one `nbs = 64` line set to `nbs`; ValueError when that line is not there
    exactly once (a YOLOv5 that changed)."""
    if src.count(NBS_LINE) != 1:
        raise ValueError("YOLOv5's train.py changed: no single nbs line to patch")
    return src.replace(NBS_LINE, f"    nbs = {nbs}  # patched by {bench}")


def provide_font(config: Path, yolov5_python: str) -> None:
    """Arial.ttf in YOLOv5's config folder: its check_dataset downloads the font when absent, this machine has no
    internet, and the font only draws plots, so any TrueType font under that name will do (matplotlib's DejaVu
    Sans from YOLOv5's environment)."""
    config.mkdir(parents=True, exist_ok=True)
    if (config / "Arial.ttf").exists():
        return
    font = next(Path(yolov5_python).absolute().parents[1].glob(
        "lib/python*/site-packages/matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf"), None)
    if font is not None:
        (config / "Arial.ttf").write_bytes(font.read_bytes())
