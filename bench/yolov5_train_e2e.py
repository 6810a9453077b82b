"""End to end over seeds: YOLOv5's train.py beside ours, each trained from scratch per seed and measured by its own val.

    python bench/yolov5_train_e2e.py --yolov5 ../yolov5 --yolov5-python ../yolov5-venv/bin/python \\
        --recipe img16 --seeds 0 1 2 3 4 5 --jobs 1 --threads 1 --out /work/y5data/e2e

Issue 27, item 4: where bench/yolov5_train_parity.py follows both trainers step by step from one start (and finds
that they part under float32 rounding from the first backward pass on), this bench asks the question that is left:
trained the same way, from their own random starts, do the two end as well as each other, seed for seed?

Recipes (--recipe):
  img16         yolov5n from scratch (--weights '' --cfg yolov5n.yaml), the first 16 coco128 train images as both
                train and val, --img 256 --batch-size 8 --epochs 300 --patience 0, YOLOv5's
                data/hyps/hyp.no-augmentation.yaml with nbs 8 (the same file for both sides). Figures: each side's
                own per-epoch val of its EMA (results.csv metrics/mAP_0.5:0.95): the best epoch and the mean of
                the last 50 epochs.
  digits-short  bench/ema_quality.py's REGIMES["short"]: digits (data/make_digits.py; train/val/test), --img 64
                --batch-size 16 --epochs 13, YOLOv5's hyp.scratch-low.yaml values with fliplr 0.0, scale 0.2,
                cls 4.0, nbs 16 (YOLOv5's side: its own hyp.scratch-low.yaml with those keys; ours: our
                hyp/hyp.scratch-low.yaml, which holds the same values, with the same keys; both keep YOLOv5's
                EMA, tau 2000). Figures: the best val epoch (results.csv), and the final weights (last.pt) on
                the TEST split, measured by each side's own val.py --task test: the EMA (what last.pt's
                loaders pick) and the raw model, each class-aware and with --single-cls (boxes regardless of
                class: the gap between the two shows that the classes are learned).

How: YOLOv5 runs in its own interpreter (--yolov5-python) from a copy of its source (--yolov5) made under --out,
where train.py's hard-coded `nbs = 64` line is rewritten to the recipe's nbs (train_nbs<N>.py; the original is
never touched). Its strip_optimizer is wrapped so that, before last.pt is stripped to its EMA, the raw model is
saved beside it as last_raw.pt. Our side runs train.py and val.py of this checkout in this interpreter; our raw
model is last.pt with its 'ema' entry removed (last_raw.pt: our loaders then take 'model'). Both sides read their
own copies of the data, under --out/data/<side>/ (images and labels copied, never the shared folders: both
trainers write a labels/*.cache of the same name beside the data). Both: the CPU, --workers (default 1), the seed,
deterministic algorithms (YOLOv5 always; ours --deterministic), no plots, OMP_NUM_THREADS = MKL_NUM_THREADS =
--threads and torch.set_num_threads(--threads) on YOLOv5's side (its utils/general.py sets OMP_NUM_THREADS after
torch has started). Autoanchor is on for both (the default of both trainers).

Runs finished in --out are reused (a run folder holds bench.json once its training ended with status 0 and the
expected number of results.csv rows); an unfinished one is trained again from the start. --no-train only
summarises what is finished. --sides trains one side only (e.g. a second run of a seed into another --out, to see
how much the same seed moves between runs).

Output: a markdown table (printed, and written to --out/<recipe>.md; the numbers to <recipe>.json): per seed
both sides' figures; per figure each side's mean and sample sd over its finished seeds, the difference of means
(ours - YOLOv5) over the seeds both sides finished with its standard error (paired by seed: the sample sd of the
per-seed differences / sqrt(n)), and whether ours >= YOLOv5's minus one SE. summarise() and markdown() are pure
(tests/test_yolov5_train_e2e.py). --quick: a few epochs (2), for a smoke test (into <recipe>-quick folders).
Results: docs/training.md, "End to end over seeds".
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.yolov5_checkout import provide_font, train_source_with_nbs  # noqa: E402

SIDES = ("yolov5", "ours")
MAP_COLUMN = "metrics/mAP_0.5:0.95"
LAST_N = 50

RECIPES = {
    "img16": {"img": 256, "batch": 8, "epochs": 300, "nbs": 8, "data": "img16", "hyp_file": "hyp.no-augmentation.yaml",
              "hyp": {}, "test": False},
    "digits-short": {"img": 64, "batch": 16, "epochs": 13, "nbs": 16, "data": "digits", "hyp_file": "hyp.scratch-low.yaml",
                     "hyp": {"fliplr": 0.0, "scale": 0.2, "cls": 4.0, "ema_tau": 2000}, "test": True},
}
QUICK_EPOCHS = 2

# Figures per recipe: (key, label). Per-seed values live in dicts under these keys.
FIGURES = {
    "img16": [("best", "val mAP50-95, best epoch"), ("last50", f"val mAP50-95, mean of the last {LAST_N} epochs")],
    "digits-short": [("best", "val mAP50-95, best epoch"),
                     ("test_ema", "test mAP50-95, last.pt EMA"),
                     ("test_raw", "test mAP50-95, last.pt raw"),
                     ("test_ema_1cls", "test mAP50-95 --single-cls, EMA"),
                     ("test_raw_1cls", "test mAP50-95 --single-cls, raw")],
}

# Run in YOLOv5's interpreter, in the copy of its source: threads, the raw-weights hook, then the patched train.py.
YOLOV5_DRIVER = r"""
import sys, runpy, torch
from pathlib import Path
torch.set_num_threads({threads})
print(f"yolov5_train_e2e: torch threads {{torch.get_num_threads()}}", flush=True)
sys.path.insert(0, '.')
import utils.general as general
real = general.strip_optimizer
def strip_optimizer(f='best.pt', s=''):
    f = Path(f)
    if f.name == 'last.pt':  # keep the raw model before last.pt is stripped to its EMA
        x = torch.load(f, map_location='cpu', weights_only=False)
        torch.save(dict(model=x['model'], ema=None, updates=None, optimizer=None, epoch=-1, best_fitness=None,
                        opt=x.get('opt')), f.with_name('last_raw.pt'))
    return real(f, s)
general.strip_optimizer = strip_optimizer
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name='__main__')
"""

YOLOV5_VAL = r"""
import sys, runpy, torch
torch.set_num_threads({threads})
sys.path.insert(0, '.')
sys.argv = ['val.py', *{args!r}]
runpy.run_path('val.py', run_name='__main__')
"""

# the line both val.py print: Class Images Instances P R mAP50 mAP50-95
ALL_LINE = re.compile(r"^\s*all\s+(\d+)\s+(\d+)\s+([-\d.eE+]+)\s+([-\d.eE+]+)\s+([-\d.eE+]+)\s+([-\d.eE+]+)\s*$")


# ---------------------------------------------------------------- pure summary (tests/test_yolov5_train_e2e.py)

def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); sd is nan for fewer than 2 values, both nan for none."""
    n = len(values)
    if not n:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def curve_figures(maps: list[float], last_n: int = LAST_N) -> dict:
    """best and mean of the last `last_n` epochs (all epochs when fewer) of a per-epoch mAP curve."""
    tail = maps[-last_n:]
    return {"best": max(maps), "last50": sum(tail) / len(tail)}


def summarise(per_seed: dict, figures: list[str]) -> dict:
    """per_seed: {seed: {"yolov5": {figure: value}, "ours": {...}}} (a side missing or empty: not finished).
    Returns {figure: {"yolov5": (mean, sd, n), "ours": (mean, sd, n), "diff": mean of ours - YOLOv5 over the seeds
    both sides have, "se": sd of those differences / sqrt(n), "n_paired": n, "ok": diff >= -se (None when the SE
    is undefined, fewer than 2 paired seeds)}}."""
    out = {}
    for fig in figures:
        entry = {}
        for side in SIDES:
            vals = [per_seed[s][side][fig] for s in sorted(per_seed) if fig in (per_seed[s].get(side) or {})]
            m, sd = mean_sd(vals)
            entry[side] = (m, sd, len(vals))
        diffs = [per_seed[s]["ours"][fig] - per_seed[s]["yolov5"][fig] for s in sorted(per_seed)
                 if fig in (per_seed[s].get("ours") or {}) and fig in (per_seed[s].get("yolov5") or {})]
        d, dsd = mean_sd(diffs)
        se = dsd / math.sqrt(len(diffs)) if len(diffs) >= 2 else math.nan
        entry.update(diff=d, se=se, n_paired=len(diffs), ok=None if math.isnan(se) else bool(d >= -se))
        out[fig] = entry
    return out


def _f(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(per_seed: dict, figures: list[tuple[str, str]]) -> str:
    """Two tables: per seed both sides' figures, then per figure the means, sds and the paired difference."""
    keys = [k for k, _ in figures]
    lines = ["| seed | " + " | ".join(f"YOLOv5 {k} | ours {k}" for k in keys) + " |",
             "|---|" + "---|---|" * len(keys)]
    for s in sorted(per_seed):
        cells = []
        for k in keys:
            for side in SIDES:
                cells.append(_f((per_seed[s].get(side) or {}).get(k, math.nan)))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    summary = summarise(per_seed, keys)
    lines += ["", "| figure | YOLOv5 mean (sd) | ours mean (sd) | ours - YOLOv5 (SE) | seeds (YOLOv5, ours, paired) "
                  "| ours >= YOLOv5 - SE |", "|---|---|---|---|---|---|"]
    for k, label in figures:
        e = summary[k]
        (ym, ysd, yn), (om, osd, on) = e["yolov5"], e["ours"]
        ok = "-" if e["ok"] is None else ("yes" if e["ok"] else "no")
        lines.append(f"| {label} | {_f(ym)} ({_f(ysd)}) | {_f(om)} ({_f(osd)}) | {_f(e['diff'], 4)} ({_f(e['se'])}) "
                     f"| {yn}, {on}, {e['n_paired']} | {ok} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- runs

def read_map_curve(results_csv: Path) -> list[float]:
    with open(results_csv, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]]
    i = header.index(MAP_COLUMN)
    return [float(r[i]) for r in rows[1:] if len(r) > i and r[i].strip()]


def thread_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra or {}))
    env.pop("PYTHONPATH", None)
    return env


class Bench:
    def __init__(self, opt):
        self.opt = opt
        self.recipe = dict(RECIPES[opt.recipe])
        if opt.quick:
            self.recipe["epochs"] = QUICK_EPOCHS
        self.name = opt.recipe + ("-quick" if opt.quick else "")
        self.out = Path(opt.out).resolve()
        self.runs = self.out / self.name
        self.y5src = self.out / "yolov5_src"
        self.y5config = self.out / "yolov5_config"

    # ---- data: each side its own copy
    def data_yaml(self, side: str) -> Path:
        import yaml
        from utils.data_config import find_data_yaml, resolve_dataset_root
        from utils.dataloaders import list_image_files
        kind = self.recipe["data"]
        root = self.out / "data" / side / kind
        yaml_path = self.out / "data" / side / f"{kind}.yaml"
        if yaml_path.exists():
            return yaml_path
        src_yaml = find_data_yaml("coco128.yaml" if kind == "img16" else "digits.yaml")
        cfg = yaml.safe_load(src_yaml.read_text(encoding="utf-8"))
        src = resolve_dataset_root(cfg.get("path"), src_yaml, download=None, autodownload=False)
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if kind == "img16":
            images = list_image_files(src / "images" / "train2017")[:16]
            (tmp / "images" / "train2017").mkdir(parents=True)
            (tmp / "labels" / "train2017").mkdir(parents=True)
            for im in images:
                im = Path(im)
                shutil.copy2(im, tmp / "images" / "train2017" / im.name)
                lab = src / "labels" / "train2017" / (im.stem + ".txt")
                if lab.exists():
                    shutil.copy2(lab, tmp / "labels" / "train2017" / lab.name)
            splits = {"train": "images/train2017", "val": "images/train2017"}
        else:
            shutil.copytree(src / "images", tmp / "images")
            shutil.copytree(src / "labels", tmp / "labels", ignore=shutil.ignore_patterns("*.cache", "*.npy"))
            splits = {k: cfg[k] for k in ("train", "val", "test")}
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        yaml_path.write_text(yaml.safe_dump({"path": str(root), **splits, "names": cfg["names"]}, sort_keys=False))
        return yaml_path

    def hyp_file(self, side: str) -> Path:
        import yaml
        path = self.runs / f"hyp.{side}.yaml"
        base = (Path(self.opt.yolov5) / "data" / "hyps" / self.recipe["hyp_file"]) if side == "yolov5" or \
            self.opt.recipe == "img16" else ROOT / "hyp" / self.recipe["hyp_file"]
        hyp = yaml.safe_load(base.read_text())
        hyp.update(self.recipe["hyp"], nbs=self.recipe["nbs"])
        if side == "yolov5":
            hyp.pop("ema_tau", None)  # YOLOv5's ModelEMA has tau 2000 built in
        self.runs.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(hyp, sort_keys=False))
        return path

    def yolov5_source(self) -> str:
        """A copy of YOLOv5's source with train.py's nbs line rewritten (train_nbs<N>.py); the original untouched."""
        script = f"train_nbs{self.recipe['nbs']}.py"
        if not (self.y5src / script).exists():
            if not self.y5src.exists():
                shutil.copytree(Path(self.opt.yolov5), self.y5src, symlinks=True,
                                ignore=shutil.ignore_patterns("runs", "*.pt", ".git", "__pycache__"))
            src = (self.y5src / "train.py").read_text()
            try:
                patched = train_source_with_nbs(src, self.recipe["nbs"], "bench/yolov5_train_e2e.py")
            except ValueError as e:
                raise SystemExit(f"yolov5_train_e2e: {e}") from None
            (self.y5src / script).write_text(patched)
        provide_font(self.y5config, self.opt.yolov5_python)
        return script

    def folder(self, side: str, seed: int) -> Path:
        return self.runs / f"{side}-s{seed}"

    def finished(self, side: str, seed: int) -> dict | None:
        stamp = self.folder(side, seed) / "bench.json"
        if not stamp.exists():
            return None
        info = json.loads(stamp.read_text())
        return info if info.get("recipe") == self.recipe else None

    def train(self, side: str, seed: int) -> dict | None:
        info = self.finished(side, seed)
        if info:
            print(f"{self.name} {side} seed {seed}: reusing {self.folder(side, seed)}", flush=True)
            return info
        if self.opt.no_train:
            return None
        folder, r = self.folder(side, seed), self.recipe
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        common = ["--data", str(self.data_yaml(side)), "--weights", "", "--cfg", "yolov5n.yaml",
                  "--hyp", str(self.hyp_file(side)), "--img", str(r["img"]), "--batch-size", str(r["batch"]),
                  "--epochs", str(r["epochs"]), "--patience", "0", "--seed", str(seed), "--workers",
                  str(self.opt.workers), "--device", "cpu", "--project", str(self.runs), "--name", folder.name,
                  "--exist-ok", "--noplots"]
        if side == "yolov5":
            script = self.yolov5_source()
            cmd = [self.opt.yolov5_python, "-c", YOLOV5_DRIVER.format(threads=self.opt.threads, script=script,
                                                                      args=common)]
            cwd, env = self.y5src, thread_env(self.opt.threads, {"YOLOV5_CONFIG_DIR": str(self.y5config)})
        else:
            cmd = [sys.executable, str(ROOT / "train.py"), *common, "--deterministic", "--no-tensorboard"]
            cwd, env = ROOT, thread_env(self.opt.threads)
        print(f"{self.name} {side} seed {seed}: training into {folder}", flush=True)
        t0 = time.time()
        with open(folder / "train.log", "w") as log:
            status = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - t0
        rows = len(read_map_curve(folder / "results.csv")) if (folder / "results.csv").exists() else 0
        if status != 0 or rows != r["epochs"] or not (folder / "weights" / "last.pt").exists():
            print(f"{self.name} {side} seed {seed}: FAILED (status {status}, {rows} epochs); see "
                  f"{folder / 'train.log'}", flush=True)
            return None
        if side == "ours":
            from utils.checkpoint import load_checkpoint, save_checkpoint
            ckpt = load_checkpoint(folder / "weights" / "last.pt")
            ckpt["ema"] = None
            save_checkpoint(ckpt, folder / "weights" / "last_raw.pt")
        info = {"recipe": r, "seconds": round(seconds, 1), "threads": self.opt.threads, "workers": self.opt.workers}
        (folder / "bench.json").write_text(json.dumps(info, indent=1))
        print(f"{self.name} {side} seed {seed}: done in {seconds / 60:.1f} min", flush=True)
        return info

    # ---- test split, each side's own val.py
    def test(self, side: str, seed: int) -> dict:
        folder = self.folder(side, seed)
        cache = folder / "test.json"
        if cache.exists():
            return json.loads(cache.read_text())
        out = {}
        for weights, key in (("last.pt", "test_ema"), ("last_raw.pt", "test_raw")):
            for single, suffix in ((False, ""), (True, "_1cls")):
                args = ["--data", str(self.data_yaml(side)), "--weights", str(folder / "weights" / weights),
                        "--img", str(self.recipe["img"]), "--batch-size", "32", "--task", "test", "--device", "cpu",
                        "--workers", str(self.opt.workers), "--project", str(folder / "test"),
                        "--name", key + suffix, "--exist-ok", *(["--single-cls"] if single else [])]
                if side == "yolov5":
                    self.yolov5_source()
                    cmd = [self.opt.yolov5_python, "-c", YOLOV5_VAL.format(threads=self.opt.threads, args=args)]
                    cwd, env = self.y5src, thread_env(self.opt.threads, {"YOLOV5_CONFIG_DIR": str(self.y5config)})
                else:
                    cmd, cwd, env = [sys.executable, str(ROOT / "val.py"), *args], ROOT, thread_env(self.opt.threads)
                done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
                text = done.stdout + done.stderr
                (folder / "test" / f"{key + suffix}.log").parent.mkdir(parents=True, exist_ok=True)
                (folder / "test" / f"{key + suffix}.log").write_text(text)
                found = [ALL_LINE.match(ln) for ln in text.splitlines()]
                found = [m for m in found if m]
                if done.returncode or not found:
                    raise SystemExit(f"yolov5_train_e2e: {side} val.py failed on {weights} (status {done.returncode}):"
                                     f"\n{text[-3000:]}")
                m = found[-1]
                out[key + suffix] = float(m.group(6))
                out[key + suffix + "_map50"] = float(m.group(5))
        cache.write_text(json.dumps(out, indent=1))
        return out

    def figures_of(self, side: str, seed: int) -> dict:
        maps = read_map_curve(self.folder(side, seed) / "results.csv")
        fig = curve_figures(maps)
        if self.recipe["test"]:
            fig = {"best": fig["best"], **self.test(side, seed)}
        return fig


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--yolov5", required=True, help="a checkout of the YOLOv5 repository (copied, never modified)")
    p.add_argument("--yolov5-python", required=True, help="python with YOLOv5's requirements installed")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="img16")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="train only these sides")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (both sides)")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per run (both sides)")
    p.add_argument("--out", default="/work/y5data/e2e", help="runs, data copies and the YOLOv5 source copy")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per run: a smoke test")
    p.add_argument("--no-train", action="store_true", help="only summarise the runs already finished")
    return p.parse_args(argv)


def main(opt) -> int:
    bench = Bench(opt)
    bench.runs.mkdir(parents=True, exist_ok=True)
    for side in opt.sides:  # copies made before any run starts (parallel runs would race to make them)
        bench.data_yaml(side)
    jobs = [(side, seed) for seed in opt.seeds for side in SIDES if side in opt.sides]
    with ThreadPoolExecutor(max(1, opt.jobs)) as pool:
        list(pool.map(lambda job: bench.train(*job), jobs))
    per_seed, seconds = {}, {}
    for seed in opt.seeds:
        per_seed[seed] = {}
        for side in SIDES:
            info = bench.finished(side, seed)
            if info:
                per_seed[seed][side] = bench.figures_of(side, seed)
                seconds[f"{side}-s{seed}"] = info["seconds"]
    figures = FIGURES[opt.recipe]
    table = markdown(per_seed, figures)
    missing = [f"{side} seed {s}" for s in opt.seeds for side in opt.sides if side not in per_seed[s]]
    note = (f"\n\nnot finished: {', '.join(missing)}" if missing else "") + \
        "\n\ntraining minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items())
    print(table + note)
    (bench.runs / f"{bench.name}.md").write_text(table + note + "\n")
    (bench.runs / f"{bench.name}.json").write_text(json.dumps(
        {"recipe": bench.recipe, "per_seed": per_seed, "summary": summarise(per_seed, [k for k, _ in figures]),
         "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
