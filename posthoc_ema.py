"""Choose the EMA length after training: reconstruct EMAs of other widths from a run's post-hoc snapshots,
validate them, and keep the best (EDM2's post-hoc EMA; see utils/posthoc.py).

    python posthoc_ema.py --run runs/train/exp --sigma-rel 0.02 0.25 --num 15    # sweep, validated by mAP
    python posthoc_ema.py --run runs/train/exp --sigma-rel 0.07                  # synthesize and save one

    python posthoc_ema.py --run runs/train/exp --bn-recal 16                     # sweep the reachable range, with
                                                                                 # BatchNorm statistics recomputed

The run must have trained with hyp ``posthoc_sigma_rels`` (e.g. [0.05, 0.1], or train.py --posthoc), which keeps
snapshots under weights/posthoc/. Two --sigma-rel values with --num N sweep N widths spaced geometrically between
them (more than two values: exactly those); without --sigma-rel the sweep spans the widths the stored EMAs reach.
A width they cannot reach within 10% profile error is skipped, all such widths named in one warning with the
reachable range (a single --sigma-rel width out of reach is an error). The sweep validates every candidate with
val.run beside the run's main EMA and raw model (from last.pt, and best.pt when it differs), one line each,
prints the table, writes posthoc_ema.csv and posthoc_ema.png in the run folder, and saves the candidate of best
fitness (ties: the smaller fit error) as weights/posthoc_best.pt, a finished checkpoint that val.py, detect.py
and train.py --weights take like best.pt, when it is also the best overall; when one of the run's own models has
a higher fitness, that is said and the best width is saved as weights/posthoc_sigma<X>.pt instead (as one
--sigma-rel X is). --bn-recal N recomputes the BatchNorm statistics of every averaged
candidate (the post-hoc ones and the main EMA) on N batches of training images before it is validated.
--data, --img and --single-cls default to the run's (opt.yaml).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from utils.cli import (AT_LEAST_0, AT_LEAST_1, FlagError, HelpFormatter, Range, check_flags,  # noqa: E402
                       exit_process, refuse_bad_flags, shown_path)

FLAG_RANGES = {"sigma_rel": ("--sigma-rel", Range(0, low_open=True)), "num": ("--num", AT_LEAST_1),
               "imgsz": ("--img", AT_LEAST_1), "batch_size": ("--batch-size", AT_LEAST_1),
               "workers": ("--workers", AT_LEAST_0), "bn_recal": ("--bn-recal", AT_LEAST_0)}


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reconstruct, validate and save post-hoc EMAs of a training run",
                                formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="the training run folder, e.g. runs/train/exp")
    p.add_argument("--sigma-rel", type=float, nargs="+", default=None,
                   help="one width (synthesize and save it), two (a sweep from one to the other) or more (those); "
                        "default: a sweep over the widths the stored EMAs reach")
    p.add_argument("--num", type=int, default=15, help="widths in a two-value sweep, spaced geometrically")
    p.add_argument("--data", default=None, help="dataset yaml (default: the run's)")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None, help="validation size (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="validation batch size")
    p.add_argument("--device", default="", help="cpu, cuda, or a GPU index such as 0 (default: the first GPU, else cpu)")
    p.add_argument("--workers", type=int, default=8, help="most dataloader workers")
    p.add_argument("--single-cls", action="store_true", default=None, help="single-class validation (default: the run's)")
    p.add_argument("--bn-recal", type=int, default=0, metavar="N",
                   help="recompute the BatchNorm statistics of each averaged candidate on N training batches before "
                        "validating it (0: off)")
    return p.parse_args(argv)


if __name__ == "__main__":
    CLI_OPT = parse_opt()  # --help and mistyped flags answer here, before the imports below take seconds
    refuse_bad_flags("posthoc_ema", lambda opt: check_flags(opt, FLAG_RANGES), CLI_OPT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import val as validate  # noqa: E402
from models.yolo import check_img_size, size_multiple  # noqa: E402
from utils.bema import ema_from_hyp  # noqa: E402
from utils.bn_recompute import FixedBatches, recompute_bn_stats  # noqa: E402
from utils.checkpoint import (FORMAT, VERSION, CheckpointError, finished_checkpoint, half_state_dict,  # noqa: E402
                              load_checkpoint, model_from_checkpoint, save_checkpoint)
from utils.data_config import DatasetError, check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.posthoc import (MAX_FIT_ERROR, Fit, PosthocError, ProfileFit, Snapshot, check_architecture,  # noqa: E402
                           find_snapshots, synthesize)
from utils.torch_utils import select_device  # noqa: E402

COLUMNS = ("candidate", "sigma_rel", "decay_at_end", "fit_error", "mAP50", "mAP50-95", "fitness")


class PosthocRunError(Exception):
    """A run or an option that posthoc_ema.py cannot work with; one line for the user."""


def target_widths(values: list[float] | None, num: int, reachable: tuple[float, float] | None) -> list[float]:
    """The widths to fit: --sigma-rel's (two: a geometric sweep of num), or without it a sweep of the reachable
    range."""
    if values is None:
        if reachable is None:
            raise PosthocRunError("the stored EMAs reach no width within the fit's error bound")
        values = list(reachable)
    if len(values) == 2:
        if num < 1:
            raise PosthocRunError(f"--num must be at least 1, got {num}")
        if min(values) <= 0:
            raise PosthocRunError(f"--sigma-rel widths must be positive, got {values}")
        return [float(x) for x in np.geomspace(min(values), max(values), num)]
    return [float(x) for x in values]


def run_files(run: Path) -> tuple[dict, dict | None, dict]:
    """(last.pt or best.pt, best.pt when both exist, opt.yaml) of a training run."""
    if not run.is_dir():
        raise PosthocRunError(f"run folder {run} not found")
    weights = run / "weights"
    last, best = weights / "last.pt", weights / "best.pt"
    if not last.exists() and not best.exists():
        raise PosthocRunError(f"{run} has no weights/last.pt or weights/best.pt")
    main = load_checkpoint(last if last.exists() else best)
    other = load_checkpoint(best) if last.exists() and best.exists() else None
    opt_file = run / "opt.yaml"
    try:
        opt = yaml.safe_load(opt_file.read_text()) if opt_file.exists() else main.get("opt") or {}
    except yaml.YAMLError as e:
        raise PosthocRunError(f"{opt_file} is not valid yaml ({type(e).__name__}); pass --data and --img") from None
    return main, other, opt if isinstance(opt, dict) else {}


def ema_run_length(*ckpts: dict | None) -> int | None:
    """The run's length on its EMA's clock as train.py planned it (what 'exp' decays by): optimizer steps, or
    nominal batches with ema_unit 'images'. Read from the first of the checkpoints that records it (last.pt does;
    best.pt, like every finished checkpoint, does not); None when none does (files from before it was recorded)."""
    for ckpt in ckpts:
        if not isinstance(ckpt, dict):
            continue
        total = (ckpt.get("train_state") or {}).get("ema_total_steps")
        if total is None and isinstance(ckpt.get("resume"), dict):
            total = ckpt["resume"].get("ema", {}).get("total_steps")
        if total is not None:
            return int(total)
    return None


def ema_position(ckpt: dict, unit: str, snapshots: list[Snapshot]) -> float | None:
    """Where the checkpoint's EMA stood on its clock: its optimizer steps, or with unit 'images' the images it had
    counted over nbs. A finished checkpoint (best.pt) keeps no image count; the snapshots' (step, position)
    pairs, read between the neighbours of its step, stand in (exact where the images per step were constant)."""
    updates = int(ckpt.get("updates", 0))
    if unit != "images":
        return float(updates)
    nbs = float((ckpt.get("hyp") or {}).get("nbs", 64))
    images = (ckpt.get("train_state") or {}).get("ema_images")
    if images is not None:
        return float(images) / nbs
    pairs = sorted({(s.step, s.position) for s in snapshots if s.unit == "images"})
    if not pairs or updates > pairs[-1][0]:
        return None
    steps, positions = zip((0, 0.0), *pairs)
    return float(np.interp(updates, steps, positions))


def main_ema_decay(ckpt: dict, model: torch.nn.Module, snapshots: list[Snapshot], total_steps: int | None) -> float:
    """The per-step (per nominal batch with ema_unit 'images') decay the run's main EMA applied at the
    checkpoint's own step, in a run of total_steps (ema_run_length); nan where its hyp or position cannot be told."""
    hyp = ckpt.get("hyp") or {}
    updates = int(ckpt.get("updates", 0))
    try:
        ema = ema_from_hyp(model, hyp, updates=updates, total_steps=total_steps, flat=False)
    except (ValueError, TypeError):
        return float("nan")
    position = ema_position(ckpt, ema.unit, snapshots)
    if position is None:
        return float("nan")
    return ema.decay_at(math.ceil(position) - ema.update_after_step)


def evaluate(model: torch.nn.Module, opt: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    """(mAP50, mAP50-95, fitness) of a model from val.run on the run's data (opt.data_dict), on the validation
    loader made once for the sweep (opt.val_loader); val.run's own lines are left out of the log."""
    with quiet_log():
        results, _, _ = validate.run(opt.data_dict, batch_size=opt.batch_size, imgsz=opt.imgsz, workers=opt.workers,
                                     single_cls=opt.single_cls, model=model.to(device), dataloader=opt.val_loader,
                                     plots=False)
    return float(results[2]), float(results[3]), float(fitness(np.array(results[:4]).reshape(1, -1))[0])


@contextlib.contextmanager
def quiet_log():
    """Only warnings and errors from the project's logger inside the block."""
    level = LOGGER.level
    LOGGER.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def prepare_data(opt: argparse.Namespace, run_opt: dict, run_hyp: dict | None, run_dir: Path, stride: int) -> None:
    """Resolve --data, --img, --single-cls from the run's options, then make what every candidate shares: the
    dataset dict, the validation loader and, with --bn-recal, the training batches (set on opt), augmented with
    the run's hyp as its training was."""
    opt.data = opt.data or run_opt.get("data")
    opt.imgsz = check_img_size(opt.imgsz or run_opt.get("imgsz") or 640, stride)
    opt.single_cls = bool(run_opt.get("single_cls", False)) if opt.single_cls is None else opt.single_cls
    if not opt.data:
        raise PosthocRunError(f"{run_dir} does not say which data it trained on; pass --data")
    if opt.bn_recal < 0:
        raise PosthocRunError(f"--bn-recal must be 0 (off) or a number of training batches, got {opt.bn_recal}")
    opt.data_dict = check_dataset(opt.data)
    if not opt.data_dict.get("val"):
        raise DatasetError(f"{opt.data_dict.get('yaml_file', opt.data)} has no 'val' split")
    opt.val_loader, _ = create_dataloader(opt.data_dict["val"], opt.imgsz, opt.batch_size, stride,
                                          single_cls=opt.single_cls, pad=0.5, rect=True, workers=opt.workers,
                                          nc=opt.data_dict["nc"], prefix="val: ")
    opt.bn_batches = None
    if opt.bn_recal:
        opt.bn_batches = FixedBatches.from_data(opt.data_dict["train"], opt.imgsz, opt.batch_size, stride,
                                                opt.bn_recal, run_hyp, single_cls=opt.single_cls)


def averaged_model(ckpt: dict, state: dict | None, opt: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The checkpoint's model holding ``state`` (None: its own EMA) on the device, its BatchNorm statistics
    recomputed on opt.bn_batches when --bn-recal asks for it."""
    model = model_from_checkpoint(ckpt if state is None else {**ckpt, "ema": state}, use_ema=True).to(device)
    if getattr(opt, "bn_batches", None) is not None:
        recompute_bn_stats(model, opt.bn_batches, device)
    return model


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def fit_widths(fitter: ProfileFit, widths: list[float]) -> list[Fit]:
    """The fits of the widths the stored EMAs reach; the others named in one warning with the reachable range,
    or, when none is in reach, a PosthocRunError."""
    fits, skipped = [], []
    for width in widths:
        try:
            fits.append(fitter.fit(width))
        except PosthocError:
            skipped.append(width)
    if skipped:
        reach = fitter.reachable()
        where = f"they reach about {reach[0]:.3g}-{reach[1]:.3g}" if reach else "they reach none"
        message = (f"sigma_rel {', '.join(f'{w:.4g}' for w in skipped)}: beyond what the stored EMAs "
                   f"({fitter.describe()}) reconstruct within {MAX_FIT_ERROR:.0%} profile error; {where}")
        if not fits:
            raise PosthocRunError(f"no width to validate: {message}")
        LOGGER.warning(f"Skipping {len(skipped)} of {len(widths)} widths, {message}")
    return fits


def save_best(ckpt: dict, state: dict, fit: Fit, fi: float, path: Path) -> Path:
    """posthoc_best.pt: the run's checkpoint with the synthesized weights as its EMA, as a finished checkpoint."""
    built = {**ckpt, "format": FORMAT, "version": VERSION, "best_fitness": float(fi),
             "ema": half_state_dict(state), "date": datetime.now(timezone.utc).isoformat()}
    saved = save_checkpoint(finished_checkpoint(built), path)
    LOGGER.info(f"Saved sigma_rel {fit.sigma_rel:.4g} (fit error {fit.error:.2%}) to {shown_path(saved)}")
    return saved


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """mAP50-95 and mAP50 of the candidates against sigma_rel, the reference models as horizontal lines."""
    sweep = [r for r in rows if r["candidate"] == "posthoc"]
    x = [r["sigma_rel"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5), tight_layout=True)
    for key, colour in (("mAP50-95", "tab:blue"), ("mAP50", "tab:orange")):
        ax.plot(x, [r[key] for r in sweep], "o-", color=colour, label=f"post-hoc EMA {key}")
        for r, style in zip((r for r in rows if r["candidate"] != "posthoc"), ("--", ":", "-.")):
            ax.axhline(r[key], color=colour, linestyle=style, linewidth=1, label=f"{r['candidate']} {key}")
    top = max(sweep, key=lambda r: r["fitness"])
    ax.plot([top["sigma_rel"]], [top["mAP50-95"]], "*", color="black", markersize=12, label="best fitness")
    ax.set_xscale("log")
    ax.set_xticks([v for v in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3) if min(x) <= v <= max(x)] or x)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks would overlap
    ax.set_xlabel("sigma_rel (EMA length relative to the run)")
    ax.set_ylabel("mAP")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def width_file(weights_dir: Path, sigma_rel: float) -> Path:
    """Where one post-hoc width is saved when it is not the sweep's winner overall: named for what it is."""
    return weights_dir / f"posthoc_sigma{sigma_rel:.4g}.pt"


def overall_winner(rows: list[dict]) -> dict:
    """The row of highest fitness among every candidate, the run's own models included; a post-hoc width wins
    ties (it is then no worse than the weights the run already has)."""
    return max(rows, key=lambda r: (r["fitness"], r["candidate"] == "posthoc"))


def table(rows: list[dict]) -> str:
    lines = [("%12s" + "%13s" * 6) % COLUMNS]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) and not math.isnan(r[c]) else "-" for c in COLUMNS[1:]]
        if isinstance(r["fit_error"], float):
            cells[2] = f"{r['fit_error']:.2%}"
        lines.append(("%12s" + "%13s" * 6) % (r["candidate"], *cells))
    return "\n".join(lines)


def run(opt: argparse.Namespace) -> Path:
    """Fit, synthesize, validate and save; returns the file saved: posthoc_best.pt when a post-hoc width wins the
    sweep overall, else posthoc_sigma<X>.pt for the best width X (and for one --sigma-rel X)."""
    check_flags(opt, FLAG_RANGES)
    run_dir = Path(opt.run)
    ckpt, best_ckpt, run_opt = run_files(run_dir)
    snapshots = find_snapshots(run_dir / "weights" / "posthoc")
    reference = model_from_checkpoint(ckpt, use_ema=True)
    check_architecture(snapshots, reference.state_dict(), f"the run's model ({shown_path(run_dir)})")
    stride = size_multiple(reference)
    fitter = ProfileFit(snapshots)
    LOGGER.info(f"{len(snapshots)} snapshots ({fitter.describe()}), end of run at {snapshots[0].unit} "
                f"{fitter.position:g}")
    out = run_dir / "weights" / "posthoc_best.pt"
    try:
        device = select_device(opt.device, opt.batch_size)
    except ValueError as e:
        raise PosthocRunError(str(e)) from None
    if opt.sigma_rel is not None and len(opt.sigma_rel) == 1:
        # Not validated: its fitness is unknown, and the run's best belongs to other weights.
        fit = fitter.fit(opt.sigma_rel[0])
        state = synthesize(snapshots, fit.coeffs)
        if opt.bn_recal:
            prepare_data(opt, run_opt, ckpt.get("hyp"), run_dir, stride)
            state = cpu_state(averaged_model(ckpt, state, opt, device))
        # its own name: a width chosen by hand is no sweep's best, and must not replace the file of one
        return save_best(ckpt, state, fit, float("nan"), width_file(run_dir / "weights", fit.sigma_rel))

    fits = fit_widths(fitter, target_widths(opt.sigma_rel, opt.num, fitter.reachable()))
    prepare_data(opt, run_opt, ckpt.get("hyp"), run_dir, stride)
    if opt.bn_batches is not None:
        LOGGER.info(f"BatchNorm statistics of every averaged candidate recomputed on {len(opt.bn_batches)} batches of "
                    f"{opt.batch_size} training images, augmented as in training (the raw model keeps its own)")
    rows, best = [], None
    for f in fits:
        state = synthesize(snapshots, f.coeffs)
        model = averaged_model(ckpt, state, opt, device)
        m50, m, fi = evaluate(model, opt, device)
        LOGGER.info(f"post-hoc sigma_rel {f.sigma_rel:.4g} (gamma {f.gamma:.3f}, relative profile error {f.error:.2%}): "
                    f"mAP50 {m50:.4g}, mAP50-95 {m:.4g}, fitness {fi:.4g}")
        rows.append({"candidate": "posthoc", "sigma_rel": f.sigma_rel, "decay_at_end": f.end_decay,
                     "fit_error": f.error, "mAP50": m50, "mAP50-95": m, "fitness": fi})
        if best is None or (fi, -f.error) > (best[2], -best[0].error):  # ties: the closer fit
            best = (f, cpu_state(model) if opt.bn_batches is not None else state, fi)
    references = [("EMA last", ckpt, True), ("raw last", ckpt, False)]
    if best_ckpt is not None and best_ckpt.get("epoch") != ckpt.get("epoch"):
        references.insert(1, ("EMA best", best_ckpt, True))
    for name, source, use_ema in references:
        model = averaged_model(source, None, opt, device) if use_ema else \
            model_from_checkpoint(source, use_ema=False).to(device)
        with quiet_log():  # building the EMA that tells the decay says which path it takes
            decay = main_ema_decay(source, model, snapshots, ema_run_length(ckpt, best_ckpt)) if use_ema else math.nan
        m50, m, fi = evaluate(model, opt, device)
        LOGGER.info(f"{name}: mAP50 {m50:.4g}, mAP50-95 {m:.4g}, fitness {fi:.4g}")
        rows.append({"candidate": name, "sigma_rel": float("nan"), "decay_at_end": decay, "fit_error": "",
                     "mAP50": m50, "mAP50-95": m, "fitness": fi})

    LOGGER.info("\nPost-hoc EMA sweep\n" + table(rows))
    with open(run_dir / "posthoc_ema.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot = plot_sweep(rows, run_dir / "posthoc_ema.png")
    LOGGER.info(f"Table in {shown_path(run_dir / 'posthoc_ema.csv')}, plot in {shown_path(plot)}")
    winner = overall_winner(rows)
    if winner["candidate"] == "posthoc":
        LOGGER.info(f"Best overall: post-hoc sigma_rel {winner['sigma_rel']:.4g} (fitness {winner['fitness']:.4g})")
        return save_best(ckpt, best[1], best[0], best[2], out)
    held = {"EMA last": "weights/last.pt", "EMA best": "weights/best.pt",
            "raw last": "the raw weights of weights/last.pt"}[winner["candidate"]]
    stale = f"; the {shown_path(out)} of an earlier sweep is left as it was" if out.exists() else ""
    LOGGER.info(f"Best overall: {winner['candidate']} (fitness {winner['fitness']:.4g}), in {held}; no post-hoc width "
                f"beats it, so none is saved as posthoc_best.pt (the best width, sigma_rel {best[0].sigma_rel:.4g} at "
                f"fitness {best[2]:.4g}, is saved under its own name){stale}")
    return save_best(ckpt, best[1], best[0], best[2], width_file(run_dir / "weights", best[0].sigma_rel))


def main(argv=None) -> int:
    """posthoc_ema.py's exit status: 0, or 1 after a one-line error."""
    opt = parse_opt(argv) if not isinstance(argv, argparse.Namespace) else argv
    set_logging()
    try:
        run(opt)
    except (PosthocRunError, PosthocError, CheckpointError, DatasetError, FileNotFoundError, FlagError) as e:
        LOGGER.error(f"posthoc_ema: {e}")
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main(CLI_OPT))
