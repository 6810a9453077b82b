"""Tiny datasets and models for the training tests: made in a temporary folder, seconds to train."""
from pathlib import Path

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int = 12, size: int = 64, nc: int = 2, seed: int = 0) -> Path:
    """n images of coloured rectangles (class 0 red-ish, class 1 blue-ish) with YOLO labels; returns the yaml."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        h, w = size, int(size * rng.choice([1.0, 1.25]))
        img = np.full((h, w, 3), rng.integers(90, 160), np.uint8)
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(nc))
            bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            color = (40, 40, 220) if cls == 0 else (220, 60, 40)  # BGR
            cv2.rectangle(img, (x0, y0), (x0 + bw - 1, y0 + bh - 1), color, -1)
            rows.append(f"{cls} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        cv2.imwrite(str(images / f"im{k:03d}.jpg"), img)
        (labels / f"im{k:03d}.txt").write_text("\n".join(rows) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/train", "names": [f"c{i}" for i in range(nc)]}
    file = root / "data.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


def tiny_model_yaml(root: Path) -> Path:
    """yolov5n's layers at an eighth of yolov5s's width: the real architecture, a fraction of the work."""
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = 0.125
    file = root / "tiny.yaml"
    file.write_text(yaml.safe_dump(cfg))
    return file
