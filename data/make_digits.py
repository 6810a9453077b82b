"""Make the held-out digits detection set: real handwritten digits on noisy canvases, in YOLO format.

    python data/make_digits.py                       # into the first writable datasets folder, as digits/
    python data/make_digits.py --out /tmp/digits --train 40 --val 10 --test 10 --seed 3

The 1,797 real 8x8 handwritten digits of scikit-learn's `load_digits` (they ship with scikit-learn: nothing is
downloaded) are split, stratified by class, into three disjoint groups of source digits: train, val (for
choosing anything: an EMA width, a decay, a best epoch) and test (only reported). Each canvas of a split
holds several digits of that split only, upscaled to random sizes, at random positions (never overlapping),
in random ink contrast and polarity, on a background of a random grey level with a gradient, blurred blotches,
pixel noise and a few unlabelled strokes. Labels are YOLO rows `class cx cy w h` whose box is the tight box of
the digit's drawn ink. Everything is a function of --seed and the sizes: the same command writes the same
bytes. `manifest.json` records the settings, each split's source digits and every drawn object (source index,
patch position and size, box), so the splits and boxes can be checked. data/digits.yaml describes the result.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from utils.cli import HelpFormatter, shown_path  # noqa: E402
from utils.data_config import dataset_search_dirs, writable_dir  # noqa: E402

SPLITS = ("train", "val", "test")
DATASET_NAME = "digits"
MANIFEST = "manifest.json"
SOURCE_LEVELS = 16  # load_digits pixels are 0..16


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    canvas: int = 64  # square canvas side, pixels: small, so that a CPU trains on it in minutes
    train: int = 2400  # canvases per split
    val: int = 200
    test: int = 400
    min_digits: int = 2  # digits per canvas
    max_digits: int = 5
    min_size: int = 12  # side of an upscaled digit patch, pixels
    max_size: int = 26
    val_fraction: float = 0.2  # of the 1,797 source digits
    test_fraction: float = 0.2

    def check(self) -> None:
        rules = [
            (self.canvas >= 32, f"--canvas must be at least 32 pixels, got {self.canvas}"),
            (min(self.train, self.val, self.test) >= 1, "--train, --val and --test need at least 1 canvas each"),
            (1 <= self.min_digits <= self.max_digits, f"--digits needs 1 <= min <= max, got "
                                                      f"{self.min_digits} {self.max_digits}"),
            (8 <= self.min_size <= self.max_size <= self.canvas // 2,
             f"--sizes needs 8 <= min <= max <= canvas/2 ({self.canvas // 2}), got {self.min_size} {self.max_size}"),
            (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 0.9,
             "--val-fraction and --test-fraction must be positive and leave at least 10% of the digits for train"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class DrawnDigit:
    source: int  # index into load_digits
    cls: int
    x: int  # top-left corner of the upscaled patch on the canvas
    y: int
    w: int  # patch size
    h: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the pixels its ink touches


def split_sources(targets: np.ndarray, settings: Settings) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified groups of source-digit indices for train, val and test."""
    index = np.arange(len(targets))
    rest, test = train_test_split(index, test_size=settings.test_fraction, stratify=targets,
                                  random_state=settings.seed)
    val_share = settings.val_fraction / (1 - settings.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=targets[rest], random_state=settings.seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def ink_alpha(digit: np.ndarray, w: int, h: int) -> np.ndarray:
    """The digit's coverage in [0, 1] upscaled to w x h (bilinear: smooth strokes, as written)."""
    return cv2.resize(digit.astype(np.float32) / SOURCE_LEVELS, (w, h), interpolation=cv2.INTER_LINEAR)


def background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A noisy HxWx3 float canvas: a grey level with a colour cast, a linear gradient and blurred blotches."""
    level = rng.uniform(40, 215)
    cast = rng.uniform(-20, 20, size=3)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    gx, gy = rng.uniform(-50, 50, size=2)
    ramp = gx * (xx - 0.5) + gy * (yy - 0.5)
    blotches = cv2.GaussianBlur(rng.normal(0, 1, (side, side)).astype(np.float32), (0, 0), sigmaX=side / 16)
    blotches *= rng.uniform(5, 15) / max(float(blotches.std()), 1e-6)
    img = (level + ramp + blotches)[..., None] + cast[None, None, :]
    return img.astype(np.float32)


def add_strokes(rng: np.random.Generator, img: np.ndarray) -> None:
    """0-1 unlabelled line strokes: clutter a detector must learn to ignore."""
    side = img.shape[0]
    for _ in range(int(rng.integers(0, 2))):
        p0, p1 = rng.integers(0, side, size=2), rng.integers(0, side, size=2)
        colour = [float(c) for c in rng.uniform(0, 255, size=3)]
        cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), colour, int(rng.integers(1, 3)))


def place(rng: np.random.Generator, sizes: list[tuple[int, int]], side: int, gap: int = 2,
          tries: int = 200) -> list[tuple[int, int]]:
    """Top-left corners for patches of the given (w, h) that do not overlap (a gap between them); a patch that
    finds no room in `tries` attempts is left out (returned as no corner)."""
    taken: list[tuple[int, int, int, int]] = []
    corners = []
    for w, h in sizes:
        for _ in range(tries):
            x, y = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
            if all(x + w + gap <= a or a + c + gap <= x or y + h + gap <= b or b + d + gap <= y
                   for a, b, c, d in taken):
                taken.append((x, y, w, h))
                corners.append((x, y))
                break
        else:
            corners.append(None)
    return corners


def draw_canvas(rng: np.random.Generator, sources: list[int], images: np.ndarray, targets: np.ndarray,
                settings: Settings) -> tuple[np.ndarray, list[DrawnDigit]]:
    """One uint8 BGR canvas with the given source digits drawn on it, and what was drawn where."""
    side = settings.canvas
    img = background(rng, side)
    add_strokes(rng, img)
    sizes = []
    for _ in sources:
        s = int(rng.integers(settings.min_size, settings.max_size + 1))
        aspect = rng.uniform(0.8, 1.25)  # handwriting is not square
        sizes.append((max(8, min(side // 2, round(s * aspect ** 0.5))), max(8, min(side // 2, round(s / aspect ** 0.5)))))
    drawn = []
    for src, (w, h), corner in zip(sources, sizes, place(rng, sizes, side)):
        if corner is None:
            continue
        x, y = corner
        alpha = ink_alpha(images[src], w, h)
        patch = img[y:y + h, x:x + w]
        # Ink stands out from the local background by a random contrast, darker or lighter; the other way where
        # that side has no room (ink clipped at 0 or 255 would be fainter than drawn).
        local = patch.mean(axis=(0, 1))
        contrast = rng.uniform(80, 160) * (1 if rng.random() < 0.5 else -1)
        if not 0 <= float(local.mean()) + contrast <= 255:
            contrast = -contrast
        ink = np.clip(local + contrast + rng.uniform(-15, 15, size=3), 0, 255)
        patch[:] = patch * (1 - alpha[..., None]) + ink[None, None, :] * alpha[..., None]
        rows, cols = np.nonzero(alpha > 0)
        box = (x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1)
        drawn.append(DrawnDigit(int(src), int(targets[src]), x, y, w, h, box))
    img += rng.normal(0, rng.uniform(2, 8), size=img.shape).astype(np.float32)  # sensor noise over everything
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), drawn


def yolo_rows(drawn: list[DrawnDigit], side: int) -> str:
    lines = []
    for d in drawn:
        x0, y0, x1, y1 = d.box
        lines.append(f"{d.cls} {(x0 + x1) / 2 / side:.6f} {(y0 + y1) / 2 / side:.6f} "
                     f"{(x1 - x0) / side:.6f} {(y1 - y0) / side:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def canvas_sources(rng: np.random.Generator, pool: np.ndarray, count: int, settings: Settings) -> list[list[int]]:
    """Source digits for each canvas: the split's pool in shuffled rounds, so every digit is used about equally."""
    order: list[int] = []
    out = []
    for _ in range(count):
        k = int(rng.integers(settings.min_digits, settings.max_digits + 1))
        while len(order) < k:
            order += [int(i) for i in rng.permutation(pool)]
        out.append(order[:k])
        order = order[k:]
    return out


def write_split(folder: Path, split: str, pool: np.ndarray, images: np.ndarray, targets: np.ndarray,
                settings: Settings) -> list[dict]:
    """images/<split>/*.png and labels/<split>/*.txt; returns the split's manifest entries."""
    rng = np.random.default_rng([settings.seed, SPLITS.index(split)])
    (folder / "images" / split).mkdir(parents=True)
    (folder / "labels" / split).mkdir(parents=True)
    count = getattr(settings, split)
    entries = []
    for i, sources in enumerate(canvas_sources(rng, pool, count, settings)):
        img, drawn = draw_canvas(rng, sources, images, targets, settings)
        name = f"{split}_{i:05d}"
        if not cv2.imwrite(str(folder / "images" / split / f"{name}.png"), img):
            raise OSError(f"could not write {folder / 'images' / split / name}.png")
        (folder / "labels" / split / f"{name}.txt").write_text(yolo_rows(drawn, settings.canvas))
        entries.append({"image": f"images/{split}/{name}.png", "objects": [asdict(d) for d in drawn]})
    return entries


def make(out: Path, settings: Settings) -> Path:
    """Write the dataset to `out` (which must not exist yet), atomically: built in a temporary folder beside it,
    then renamed, so an interrupted run leaves nothing half-written under the dataset's name."""
    settings.check()
    if os.path.lexists(out):
        raise FileExistsError(f"{out} already exists; remove it or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images, targets = digits.images, digits.target
    pools = split_sources(targets, settings)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = {"settings": asdict(settings), "names": [str(i) for i in range(10)],
                    "sources": {s: [int(i) for i in pools[s]] for s in SPLITS}, "images": {}}
        for split in SPLITS:
            manifest["images"][split] = write_split(staging, split, pools[split], images, targets, settings)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def default_out() -> Path:
    """<first writable datasets folder>/digits, the folders data/digits.yaml's relative path is looked up in."""
    for d in dataset_search_dirs():
        if writable_dir(d):
            return d / DATASET_NAME
    raise ValueError("no writable datasets folder among " + ", ".join(str(d) for d in dataset_search_dirs()) +
                     "; pass --out")


def parse_opt(argv=None) -> argparse.Namespace:
    s = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", default=None, help="dataset folder (default: digits/ in the first writable of "
                                               "$DATASETS_DIR, ../datasets, ../shared/datasets)")
    p.add_argument("--seed", type=int, default=s.seed, help="the seed everything is drawn from")
    p.add_argument("--canvas", type=int, default=s.canvas, help="canvas side in pixels")
    p.add_argument("--train", type=int, default=s.train, help="train canvases")
    p.add_argument("--val", type=int, default=s.val, help="val canvases")
    p.add_argument("--test", type=int, default=s.test, help="test canvases")
    p.add_argument("--digits", type=int, nargs=2, default=[s.min_digits, s.max_digits], metavar=("MIN", "MAX"),
                   help="digits per canvas")
    p.add_argument("--sizes", type=int, nargs=2, default=[s.min_size, s.max_size], metavar=("MIN", "MAX"),
                   help="side of a drawn digit in pixels")
    p.add_argument("--val-fraction", type=float, default=s.val_fraction, help="share of the source digits for val")
    p.add_argument("--test-fraction", type=float, default=s.test_fraction, help="share of the source digits for test")
    p.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opt = parse_opt(argv)
    settings = Settings(seed=opt.seed, canvas=opt.canvas, train=opt.train, val=opt.val, test=opt.test,
                        min_digits=opt.digits[0], max_digits=opt.digits[1], min_size=opt.sizes[0],
                        max_size=opt.sizes[1], val_fraction=opt.val_fraction, test_fraction=opt.test_fraction)
    try:
        out = Path(opt.out).expanduser() if opt.out else default_out()
        if opt.force and out.is_dir() and (out / MANIFEST).is_file():
            shutil.rmtree(out)  # only a folder this script made (it holds our manifest)
        elif opt.force and os.path.lexists(out):
            raise ValueError(f"--force replaces only a folder made by this script (with {MANIFEST}); {out} is not one")
        make(out, settings)
    except (ValueError, OSError) as e:
        print(f"make_digits: {e}", file=sys.stderr)
        return 1
    n = {s: getattr(settings, s) for s in SPLITS}
    print(f"Digits dataset written to {shown_path(out)}: " + ", ".join(f"{n[s]} {s}" for s in SPLITS) +
          f" canvases of {settings.canvas} px (seed {settings.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
