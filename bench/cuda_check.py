"""The GPU check: everything the CPU-only CI cannot run, in one command sized for 8 minutes on one GPU.

    python bench/cuda_check.py [--device 0|cuda|0,1] [--data coco128] [--budget 480] [--wheels DIR] [--out DIR]
    python bench/cuda_check.py --plan --budget 300     # what would run and what the budget skips; runs nothing

Uses the python and torch already installed (torch 2.11 or newer with CUDA); of the project's other requirements it
installs only what is missing, from wheels in --wheels (pip --no-index). Nothing is downloaded: --data names a
dataset folder (coco128's layout), a dataset yaml, or a name looked up in $DATASETS_DIR, <repo>/datasets,
<repo>/shared/datasets, ../datasets and ../shared/datasets (bring coco128 along as <repo>/shared/datasets/coco128,
a folder inside the working tree that git does not track).

The steps, in order (STEPS; "optional" ones are the first the budget skips, --compile first of all):
pytest -m cuda; fp16 training with --deterministic; SIGKILL in epoch 1 and --resume, bit-identical to the run left
alone; bf16 training; --multi-scale; a TorchScript file exported on the CPU validated on the GPU; TorchScript and
ONNX exported on the GPU, then val.py and detect.py of both there; last.pt read by a bare torch.load(weights_only=True)
with no GPU visible; torchrun --nproc_per_node 1 --sync-bn under NCCL; GPU memory the checkpoint takes at the epoch
boundary and host synchronisations per EMA update and per training step; bench/ema.py's GPU targets; then,
optional, Switch EMA, BEMA, BatchNorm recompute, post-hoc EMA, --teacher ema and --compile; last, a grep of every
log for torch's "does not have a deterministic implementation" warnings (--deterministic runs in warn_only mode).

Prints one table (step, result, seconds, figure). Exit status 0 only when every step that ran passed and no
required step was skipped; 1 otherwise; 2 for bad arguments or no dataset.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"yaml": "pyyaml", "tqdm": "tqdm", "cv2": "opencv-python-headless", "matplotlib": "matplotlib",
          "pycocotools": "pycocotools", "pytest": "pytest", "tensorboard": "tensorboard", "onnx": "onnx",
          "onnxscript": "onnxscript", "onnxruntime": "onnxruntime-gpu"}
DEFAULT_BUDGET = 480.0  # seconds: the 8 minutes of one data-centre GPU
# torch's warning when --deterministic (use_deterministic_algorithms(warn_only=True)) meets a kernel without one
DETERMINISM_WARNING = "does not have a deterministic implementation"


class CheckError(Exception):
    """Bad arguments or a dataset not found; the message is one line."""


# ------------------------------------------------------------------------------------------------ arguments
def parse_devices(text: str) -> list[int]:
    """CUDA device indices of --device: 'cuda' (or 'cuda:N'), 'N' or 'N,M,...'."""
    t = str(text).strip().lower().replace(" ", "")
    if t == "cuda":
        return [0]
    t = t.removeprefix("cuda:")
    parts = t.split(",")
    if not t or not all(p.isdigit() for p in parts):
        raise CheckError(f"--device {text!r}: give cuda, a GPU index such as 0, or indices such as 0,1")
    indices = [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise CheckError(f"--device {text!r}: a GPU is named twice")
    return indices


def dataset_dirs(env: dict | None = None) -> list[Path]:
    """Where a dataset named by --data is looked for, in order."""
    env = os.environ if env is None else env
    dirs = [Path(env["DATASETS_DIR"])] if env.get("DATASETS_DIR") else []
    return dirs + [ROOT / "datasets", ROOT / "shared" / "datasets", ROOT.parent / "datasets",
                   ROOT.parent / "shared" / "datasets"]


def find_dataset(data: str, env: dict | None = None) -> tuple[Path, dict]:
    """(dataset folder, the yaml's contents) for --data: a folder, a yaml file, or a name ('coco128',
    'coco128.yaml', looked up as data/<name>.yaml for the class names and in dataset_dirs() for the images).
    A folder counts when it holds images/. CheckError names every place searched."""
    import yaml

    given = Path(data)
    spec: dict = {}
    if given.is_dir():  # the class names from data/<folder name>.yaml when the project has it (coco128)
        candidates, name = [given], given.name
        known = ROOT / "data" / f"{name}.yaml"
        spec = (yaml.safe_load(known.read_text()) or {}) if known.is_file() else {}
    else:
        file = given if given.suffix in (".yaml", ".yml") and given.is_file() else None
        name = given.stem if given.suffix in (".yaml", ".yml") else given.name
        if file is None and (ROOT / "data" / f"{name}.yaml").is_file():
            file = ROOT / "data" / f"{name}.yaml"
        if file is not None:
            spec = yaml.safe_load(file.read_text()) or {}
            if not isinstance(spec, dict):
                raise CheckError(f"--data {data}: {file} is not a dataset yaml")
        path = Path(str(spec.get("path") or name))
        candidates = [path] if path.is_absolute() else [d / path for d in dataset_dirs(env)]
    for c in candidates:
        if (c / "images").is_dir():
            return c.resolve(), spec
    searched = ", ".join(map(str, candidates))
    raise CheckError(f"--data {data}: no dataset folder with images/ found (searched {searched}); nothing is "
                     f"downloaded: put {name} in {ROOT / 'shared' / 'datasets' / name} or pass its folder")


def write_data_yaml(folder: Path, spec: dict, out: Path) -> Path:
    """A dataset yaml with the folder's absolute path (no download entry), for every command of the check."""
    import yaml

    images = folder / "images"
    split = next((f"images/{d.name}" for d in sorted(images.iterdir()) if d.is_dir()), "images")
    data = {"path": str(folder), "train": spec.get("train", split), "val": spec.get("val", spec.get("train", split))}
    data["names"] = spec.get("names") or {0: "object"}
    file = out / "data.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="0", help="cuda, a GPU index such as 0, or indices such as 0,1")
    p.add_argument("--data", default="coco128", help="dataset folder, yaml, or name (looked up, never downloaded)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="seconds: steps whose estimates do not fit are skipped, the optional ones first")
    p.add_argument("--wheels", default=None, help="folder of wheels for packages missing here (pip --no-index)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "cuda_check")))
    p.add_argument("--plan", action="store_true", help="print the steps the budget allows and exit; runs nothing")
    return p


# --------------------------------------------------------------------------------------------- steps, plan
@dataclass
class Step:
    name: str
    estimate: float  # seconds on one data-centre GPU; guesses until the first GPU run's table replaces them
    required: bool
    run: Callable | None = None  # run(ctx) -> (ok, figure)


@dataclass
class Row:
    step: str
    required: bool
    status: str  # 'ok', 'MISS', 'skipped' or (--plan) 'planned'
    seconds: float = 0.0
    figure: str = ""


def plan(steps: list[Step], budget: float) -> list[tuple[Step, bool]]:
    """(step, runs) for each step, in order: while the estimates add up to more than the budget, the last optional
    step left is dropped, then the last required one (steps estimated at 0 s always run)."""
    runs = {id(s): True for s in steps}
    total = sum(s.estimate for s in steps)
    for wanted in (False, True):
        for s in reversed(steps):
            if total <= budget:
                break
            if s.required == wanted and runs[id(s)] and s.estimate > 0:  # dropping a free step gains nothing
                runs[id(s)] = False
                total -= s.estimate
    return [(s, runs[id(s)]) for s in steps]


def exit_status(rows: list[Row]) -> int:
    """0 when every step ran and passed (or, for --plan, is planned), or was optional and skipped; 1 otherwise."""
    return 0 if rows and all(r.status in ("ok", "planned") or (r.status == "skipped" and not r.required)
                             for r in rows) else 1


def table(rows: list[Row]) -> str:
    lines = ["| step | result | s | figure |", "|---|---|---:|---|"]
    for r in rows:
        result = r.status if r.status != "skipped" else ("skipped (budget), REQUIRED" if r.required
                                                         else "skipped (budget), optional")
        lines.append(f"| {r.step} | {result} | {r.seconds:.0f} | {r.figure} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- running steps
@dataclass
class Context:
    out: Path
    data: Path
    devices: list[int]
    py: str = sys.executable

    @property
    def device(self) -> str:  # training's --device: every GPU given
        return ",".join(map(str, self.devices))

    @property
    def first(self) -> str:  # one GPU: val, detect, export, torchrun's single process, the in-process checks
        return str(self.devices[0])

    def run(self, name: str, cmd: list, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
        """(return code, log text) of a command run from the repository root; its output goes to <out>/<name>.log."""
        log = self.out / f"{name}.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        return rc, log.read_text(errors="replace")

    def train(self, name: str, *extra, epochs: int = 1, env: dict | None = None, timeout: float = 300):
        cmd = [self.py, "train.py", "--data", self.data, "--cfg", "yolov5n.yaml", "--weights", "", "--img", 320,
               "--epochs", epochs, "--batch-size", 16, "--device", self.device, "--workers", 4,
               "--project", self.out / "runs", "--name", name, "--exist-ok", "--noplots", "--no-tensorboard", *extra]
        return self.run(f"train_{name}", cmd, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", **(env or {})}, timeout)

    def weights(self, name: str, file: str = "best.pt") -> Path:
        return self.out / "runs" / name / "weights" / file


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160].replace("|", "/") if lines else ""


def _map(text: str) -> str:
    """mAP50 and mAP50-95 of a log's last 'all' row of val's table."""
    rows = [ln.split() for ln in text.splitlines() if ln.strip().startswith("all ")]
    return f"mAP50 {rows[-1][-2]}, mAP50-95 {rows[-1][-1]}" if rows and len(rows[-1]) >= 3 else ""


def _trained(ctx: Context, name: str, *extra, epochs: int = 1) -> tuple[bool, str]:
    rc, log = ctx.train(name, *extra, epochs=epochs)
    return rc == 0, _map(log) if rc == 0 else f"rc={rc}: {_tail(log)}"


def step_pytest(ctx: Context):
    rc, log = ctx.run("pytest_cuda", [ctx.py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q",
                                      "-p", "no:cacheprovider"], timeout=300)
    return rc == 0, _tail(log)


def step_fp16(ctx: Context):
    return _trained(ctx, "ref", "--amp", "fp16", "--deterministic", epochs=3)


def kill_iteration(data_yaml: Path, batch_size: int = 16) -> int:
    """The global training iteration in the middle of epoch 1 (0-based) for the yaml's train split: 12 for coco128
    (128 images, 8 batches of 16 per epoch)."""
    import yaml

    spec = yaml.safe_load(Path(data_yaml).read_text())
    images = Path(spec["path"]) / spec["train"]
    n = sum(1 for f in images.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    batches = max(1, -(-n // batch_size))
    return batches + batches // 2


def step_resume(ctx: Context):
    import torch

    from tests.train_helpers import checkpoint_differences
    from train import KILL_HOOK_ENV

    kill_at = kill_iteration(ctx.data)
    rc_kill, _ = ctx.train("killed", "--amp", "fp16", "--deterministic", epochs=3, env={KILL_HOOK_ENV: str(kill_at)})
    rc_res, log = ctx.run("train_resumed", [ctx.py, "train.py", "--resume", ctx.weights("killed", "last.pt")],
                          {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    if rc_kill != -9 or rc_res != 0:
        return False, f"kill rc={rc_kill}, resume rc={rc_res}: {_tail(log)}"
    diffs = []
    for f in ("last.pt", "best.pt"):
        diffs += checkpoint_differences(torch.load(ctx.weights("ref", f), weights_only=True),
                                        torch.load(ctx.weights("killed", f), weights_only=True))
    return not diffs, "bit-identical (last.pt, best.pt)" if not diffs else f"differs at {diffs[:3]}"


def step_bf16(ctx: Context):
    return _trained(ctx, "bf16", "--amp", "bf16")


def step_multiscale(ctx: Context):
    return _trained(ctx, "multiscale", "--multi-scale")


def step_cpu_export(ctx: Context):
    """Item 1 of issue 28: a TorchScript file traced on the CPU, validated on the GPU."""
    best = ctx.out / "cpu_export" / "best.pt"
    best.parent.mkdir(exist_ok=True)
    best.write_bytes(ctx.weights("ref").read_bytes())
    rc, log = ctx.run("export_cpu", [ctx.py, "export.py", "--weights", best, "--include", "torchscript",
                                     "--device", "cpu"])
    if rc != 0:
        return False, f"export rc={rc}: {_tail(log)}"
    rc, log = ctx.run("val_cpu_torchscript", [ctx.py, "val.py", "--weights", best.with_suffix(".torchscript"),
                                              "--data", ctx.data, "--img", 320, "--device", ctx.first,
                                              "--project", ctx.out / "val", "--name", "cpu_ts", "--exist-ok"])
    return rc == 0, _map(log) if rc == 0 else f"val rc={rc}: {_tail(log)}"


def step_gpu_export(ctx: Context):
    best = ctx.weights("ref")
    rc, log = ctx.run("export_gpu", [ctx.py, "export.py", "--weights", best, "--include", "torchscript", "onnx",
                                     "--device", ctx.first])
    if rc != 0:
        return False, f"export rc={rc}: {_tail(log)}"
    figures = []
    for suffix in (".torchscript", ".onnx"):
        file = best.with_suffix(suffix)
        rc, log = ctx.run(f"val{suffix}", [ctx.py, "val.py", "--weights", file, "--data", ctx.data, "--img", 320,
                                           "--device", ctx.first, "--project", ctx.out / "val", "--name", suffix[1:],
                                           "--exist-ok"])
        if rc != 0 or "no CUDAExecutionProvider" in log:
            return False, f"val {file.name} rc={rc}: {_tail(log)}"
        figures.append(f"{suffix[1:]} {_map(log)}")
        rc, log = ctx.run(f"detect{suffix}", [ctx.py, "detect.py", "--weights", file, "--source",
                                              ctx.data.parent / "det_images", "--device", ctx.first, "--img", 320,
                                              "--project", ctx.out / "detect", "--name", suffix[1:], "--exist-ok"])
        if rc != 0:
            return False, f"detect {file.name} rc={rc}: {_tail(log)}"
    return True, "; ".join(figures)


def step_cpu_load(ctx: Context):
    """Item 2: last.pt read with a bare torch.load(weights_only=True) by a process that sees no GPU."""
    code = ("import sys, torch\n"
            "ck = torch.load(sys.argv[1], weights_only=True)\n"
            "seen = []\n"
            "def walk(x):\n"
            "    if isinstance(x, torch.Tensor): seen.append(x.device.type)\n"
            "    elif isinstance(x, dict): [walk(v) for v in x.values()]\n"
            "    elif isinstance(x, (list, tuple)): [walk(v) for v in x]\n"
            "walk(ck)\n"
            "print(len(seen), 'tensors on', sorted(set(seen)))\n"
            "sys.exit(0 if seen and set(seen) == {'cpu'} else 1)\n")
    rc, log = ctx.run("load_on_cpu", [ctx.py, "-c", code, ctx.weights("ref", "last.pt")],
                      {"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    return rc == 0, _tail(log)


def step_torchrun(ctx: Context):
    cmd = [ctx.py, "-m", "torch.distributed.run", "--nproc_per_node", 1, "--standalone", "train.py", "--data",
           ctx.data, "--cfg", "yolov5n.yaml", "--weights", "", "--img", 320, "--epochs", 1, "--batch-size", 16,
           "--device", ctx.first, "--workers", 4, "--sync-bn", "--project", ctx.out / "runs", "--name", "ddp",
           "--exist-ok", "--noplots", "--no-tensorboard"]
    rc, log = ctx.run("torchrun_sync_bn", cmd)
    ok = rc == 0 and "Using SyncBatchNorm" in log
    return ok, "SyncBatchNorm under NCCL" if ok else f"rc={rc}: {_tail(log)}"


def step_memory_and_syncs(ctx: Context):
    """GPU memory the epoch-end checkpoint takes (item 2: expected about none, the copies go straight to the
    CPU) and host synchronisations per EMA update (expected 0) and per training step (reported)."""
    import warnings

    import torch

    import train
    from models.yolo import Model
    from utils.checkpoint import pack_state_dict, pack_tree
    from utils.ema import ModelEMA
    from utils.loss import ComputeLoss

    device = torch.device(f"cuda:{ctx.first}")
    model = Model("yolov5s.yaml", nc=80, verbose=False).to(device).to(memory_format=torch.channels_last)
    model.hyp = train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = ModelEMA(model)
    scaler = train.make_scaler("fp16", device, model.hyp)
    step = train.TrainStep(model, ComputeLoss(model, model.hyp), optimizer, scaler, ema, torch.float16)
    imgs = torch.rand(8, 3, 320, 320, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[i, 0, 0.5, 0.5, 0.2, 0.2] for i in range(8)])  # on the CPU, as the loader gives them
    for ni in range(3):  # warm: momenta exist, kernels chosen
        step(imgs, targets, ni, 1)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    pack_state_dict(model.state_dict()), pack_state_dict(ema.ema.state_dict())
    pack_tree(optimizer.state_dict()), ema.state_dict(weights=False)
    extra = torch.cuda.max_memory_allocated(device) - base
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    counts = []
    for call in (lambda: ema.update(model), lambda: step(imgs, targets, 3, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    ok = extra <= 2 * largest and counts[0] == 0
    return ok, (f"checkpoint +{extra / 2**20:.1f} MiB on the GPU (limit {2 * largest / 2**20:.1f}); "
                f"host syncs: EMA update {counts[0]}, training step {counts[1]}")


def step_bench_ema(ctx: Context):
    rc, log = ctx.run("bench_ema", [ctx.py, "bench/ema.py", "--device", ctx.first, "--models", "s", "l"])
    targets = [ln.strip() for ln in log.splitlines() if ln.startswith("target ")]
    return rc == 0, "; ".join(targets) if targets else _tail(log)


def _with_hyp(ctx: Context, name: str, **keys) -> Path:
    import yaml

    hyp = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-low.yaml").read_text()) | keys
    file = ctx.out / f"hyp.{name}.yaml"
    file.write_text(yaml.safe_dump(hyp, sort_keys=False))
    return file


def step_switch_ema(ctx: Context):
    return _trained(ctx, "switch", "--hyp", _with_hyp(ctx, "switch", ema_switch=True))


def step_bema(ctx: Context):
    return _trained(ctx, "bema", "--hyp", _with_hyp(ctx, "bema", ema_bema=True))


def step_bn_recompute(ctx: Context):
    return _trained(ctx, "bn_recompute", "--hyp", _with_hyp(ctx, "bn", ema_bn_recompute=4))


def step_posthoc(ctx: Context):
    return _trained(ctx, "posthoc", "--posthoc")


def step_teacher(ctx: Context):
    return _trained(ctx, "teacher", "--teacher", "ema")


def step_compile(ctx: Context):
    return _trained(ctx, "compile", "--compile")


def step_determinism(ctx: Context):
    hits = [(log.name, ln.strip()) for log in sorted(ctx.out.glob("*.log"))
            for ln in log.read_text(errors="replace").splitlines() if DETERMINISM_WARNING in ln]
    return not hits, f"{len(hits)} warnings" + (f", first in {hits[0][0]}: {hits[0][1][:120]}" if hits else "")


STEPS = [
    Step("pytest -m cuda", 45, True, step_pytest),
    Step("train fp16 --deterministic, 3 epochs", 35, True, step_fp16),
    Step("SIGKILL in epoch 1, --resume: bit-identical", 50, True, step_resume),
    Step("train bf16, 1 epoch", 20, True, step_bf16),
    Step("train --multi-scale, 1 epoch", 20, True, step_multiscale),
    Step("TorchScript exported on the CPU, val on the GPU", 25, True, step_cpu_export),
    Step("TorchScript + ONNX exported on the GPU, val + detect there", 50, True, step_gpu_export),
    Step("last.pt by a bare torch.load with no GPU visible", 5, True, step_cpu_load),
    Step("torchrun --nproc_per_node 1 --sync-bn (NCCL)", 30, True, step_torchrun),
    Step("GPU memory at the epoch boundary, host syncs", 20, True, step_memory_and_syncs),
    Step("bench/ema.py --models s l (GPU targets)", 25, True, step_bench_ema),
    Step("Switch EMA, 1 epoch", 20, False, step_switch_ema),
    Step("BEMA, 1 epoch", 20, False, step_bema),
    Step("BatchNorm recompute, 1 epoch", 20, False, step_bn_recompute),
    Step("post-hoc EMA, 1 epoch", 20, False, step_posthoc),
    Step("--teacher ema, 1 epoch", 20, False, step_teacher),
    Step("--compile (Inductor), 1 epoch", 75, False, step_compile),
    Step("'deterministic implementation' warnings in the logs", 0, True, step_determinism),
]


def install_missing(wheels: str | None) -> list[str]:
    missing = []
    for module, package in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        if not wheels:
            raise CheckError(f"missing {', '.join(missing)}; pass --wheels DIR holding their wheels")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing],
                       check=True)
    return missing


def main(argv=None) -> int:
    opt = build_parser().parse_args(argv)
    try:
        devices = parse_devices(opt.device)
        folder, spec = find_dataset(opt.data)
    except CheckError as e:
        print(f"cuda_check: {e}")
        return 2
    planned = plan(STEPS, opt.budget)
    skipped = [Row(s.name, s.required, "skipped") for s, runs in planned if not runs]
    if opt.plan:
        rows = [Row(s.name, s.required, "planned" if runs else "skipped", s.estimate) for s, runs in planned]
        print(f"Plan for a budget of {opt.budget:.0f} s, dataset {folder} (seconds: estimates):")
        print(table(rows))
        return exit_status(rows)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        installed = install_missing(opt.wheels)
    except CheckError as e:
        print(f"cuda_check: {e}")
        return 2
    import torch  # after the installs

    if not torch.cuda.is_available() or max(devices) >= torch.cuda.device_count():
        print(f"cuda_check: --device {opt.device}: {torch.cuda.device_count()} CUDA GPUs visible; nothing checked")
        return 1
    sys.path.insert(0, str(ROOT))
    ctx = Context(out, write_data_yaml(folder, spec, out), devices)
    det = out / "det_images"  # detect.py's source: a few of the dataset's images
    det.mkdir(exist_ok=True)
    for f in sorted((folder / "images").rglob("*.jpg"))[:8]:
        (det / f.name).write_bytes(f.read_bytes())
    if skipped:
        print("Skipped to fit the budget of {:.0f} s: {}".format(opt.budget, ", ".join(r.step for r in skipped)))
    rows, t_start = [], time.time()
    for s, runs in planned:
        if not runs:
            rows.append(Row(s.name, s.required, "skipped"))
            continue
        t0 = time.time()
        try:
            ok, figure = s.run(ctx)
        except Exception as e:  # a step's own failure is its row's result, and the others still run
            ok, figure = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(Row(s.name, s.required, "ok" if ok else "MISS", time.time() - t0, figure))
        print(f"{s.name}: {rows[-1].status} ({rows[-1].seconds:.0f} s) {figure}", flush=True)
    print(f"\nGPU check: {torch.cuda.get_device_name(devices[0])}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, {time.time() - t_start:.0f} s"
          + (f"; installed {', '.join(installed)}" if installed else ""))
    print(table(rows))
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
