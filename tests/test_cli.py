"""The command line as a new user meets it: bad numeric flags, Ctrl-C, a full disk, --help, the run's messages,
finished checkpoints, and val.py's defaults (the latest best.pt, at the size it was trained at)."""
import errno
import logging
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

import train
import val
from tests.train_helpers import (INTERRUPT_HOOK_ENV, ROOT, in_process_args, make_dataset, one_intra_op_thread,
                                 run_train, tiny_model_yaml, tiny_run_args)
from utils.checkpoint import FINISHED_KEYS, load_checkpoint

N_IMAGES, BATCH = 12, 4
NB = N_IMAGES // BATCH


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "data": make_dataset(root / "data", n=N_IMAGES), "cfg": tiny_model_yaml(root)}


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------------------------------------ bad flags
@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--img", "0"], "--img must be a positive number of pixels, got 0"),
    (["--workers", "-2"], "--workers must be 0 or more, got -2"),
    (["--patience", "-5"], "--patience must be 0 (off) or a number of epochs, got -5"),
    (["--save-period", "0"], "--save-period must be -1 (off) or a number of epochs, got 0"),
    (["--save-period", "-3"], "--save-period must be -1 (off) or a number of epochs, got -3"),
    (["--label-smoothing", "1.0"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1), got -0.1"),
    (["--freeze", "-1"], "--freeze takes layer counts or indices of 0 or more, got [-1]"),
    (["--freeze", "26"], "--freeze 26: the model has 25 layers (0-24)"),
    (["--freeze", "3", "25"], "--freeze 3 25: the model has 25 layers (0-24)"),
    (["--freeze", "25"], "--freeze 25 freezes every layer: nothing would train"),
    (["--resume", "x/last.pt", "--epochs", "0"], "--epochs must be at least 1, got 0"),
])
def test_bad_numeric_flags_fail_in_one_line_before_any_folder(tiny, tmp_path, caplog, flags, message):
    project = tmp_path / "runs"
    args = ["--data", str(tiny["data"]), "--cfg", str(tiny["cfg"]), "--device", "cpu", "--project", str(project),
            "--img", "64", "--workers", "0", *flags]
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert train.cli(train.parse_opt(args)) == 1
    assert errors_of(caplog) == [f"train: {message}"]
    assert not project.exists()


@pytest.mark.parametrize("script, flags, message", [
    ("val", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("val", ["--img", "0"], "--img must be at least 1, got 0"),
    ("val", ["--conf-thres", "1.5"], "--conf-thres must be in [0, 1], got 1.5"),
    ("val", ["--iou-thres", "-0.1"], "--iou-thres must be in [0, 1], got -0.1"),
    ("val", ["--max-det", "0"], "--max-det must be at least 1, got 0"),
    ("val", ["--workers", "-1"], "--workers must be at least 0, got -1"),
    ("detect", ["--source", "x.jpg", "--img", "0"], "--img must be one positive number or two (h w), got 0"),
    ("detect", ["--source", "x.jpg", "--img", "64", "48", "32"], "--img must be one positive number or two (h w), got 64 48 32"),
    ("detect", ["--source", "x.jpg", "--conf-thres", "2"], "--conf-thres must be in [0, 1], got 2.0"),
    ("detect", ["--source", "x.jpg", "--iou-thres", "1.01"], "--iou-thres must be in [0, 1], got 1.01"),
    ("detect", ["--source", "x.jpg", "--max-det", "0"], "--max-det must be at least 1, got 0"),
    ("export", ["--img", "64", "-1"], "--img must be one positive number or two (h w), got 64 -1"),
    ("export", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("export", ["--opset", "0"], "--opset must be at least 1, got 0"),
    ("posthoc_ema", ["--run", "r", "--sigma-rel", "0.05", "0"], "--sigma-rel must be above 0, got 0.05 0.0"),
    ("posthoc_ema", ["--run", "r", "--num", "0"], "--num must be at least 1, got 0"),
    ("posthoc_ema", ["--run", "r", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("posthoc_ema", ["--run", "r", "--img", "-32"], "--img must be at least 1, got -32"),
    ("posthoc_ema", ["--run", "r", "--bn-recal", "-1"], "--bn-recal must be at least 0, got -1"),
])
def test_numeric_flags_out_of_range_are_refused_in_one_line(script, flags, message, tmp_path, caplog):
    """Each command's numbers are refused in one line naming the flag and its range, before anything is read or
    made: in the process (main(), as the hub and tests call it) as from the command line, there before torch is
    even imported (seconds saved: bad flags cost nothing)."""
    module = __import__(script)
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert module.main(flags) == 1
    assert errors_of(caplog) == [f"{script}: {message}"]
    assert refused_before_torch_is_imported(script, flags, tmp_path) == f"{script}: {message}"


@pytest.mark.parametrize("flags, message", [(["--epochs", "0"], "--epochs must be at least 1, got 0"),
                                            (["--label-smoothing", "1.0"], "--label-smoothing must be in [0, 1), got 1.0")])
def test_train_refuses_bad_numbers_before_torch_is_imported(flags, message, tmp_path):
    assert refused_before_torch_is_imported("train", flags, tmp_path) == f"train: {message}"


def refused_before_torch_is_imported(script: str, flags: list[str], cwd) -> str:
    """`python SCRIPT.py *flags` run in a fresh interpreter that reports, once it exits, its status and whether
    torch was imported: it must exit 1 without torch (no seconds of imports for a typo). Returns its one line."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script + '.py'!r}, *{flags!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / (script + '.py'))!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.stdout.splitlines() == ["exit 1 False"], out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_help_lists_every_flag_with_help_and_default_without_importing_torch():
    def squeezed(x) -> str:  # argparse wraps long lines, also inside a path at its hyphens
        return "".join(str(x).split())

    for parser in (train.build_parser(), val.build_parser()):
        text = squeezed(parser.format_help())
        for action in parser._actions:
            if action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help, action.dest
            if action.default not in (None, ""):
                assert squeezed(f"(default: {action.default})") in text, action.dest
    # --help answers before the heavy imports: torch is never imported (python -X importtime lists every import)
    for script in ("train.py", "val.py"):
        out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], capture_output=True,
                             text=True, timeout=60, cwd=str(ROOT))
        assert out.returncode == 0 and "usage:" in out.stdout
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "numpy" not in imported, script


# ------------------------------------------------------------------------------------------ Ctrl-C and a full disk
def test_ctrl_c_prints_one_line_with_the_resume_command(tiny, tmp_path):
    args = tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "stopped", 3)
    out = run_train(args, **{INTERRUPT_HOOK_ENV: NB + 1})  # Ctrl-C in epoch 1, at its second batch
    assert out.returncode == 130, out.stdout[-3000:]
    assert "Traceback" not in out.stdout and "KeyboardInterrupt" not in out.stdout
    last = tmp_path / "stopped" / "weights" / "last.pt"
    lines = [ln for ln in out.stdout.splitlines() if "interrupted" in ln]
    assert lines == [f"train: interrupted in epoch 1 at batch 2 of {NB}; {last} holds epoch 0; "
                     f"continue with: python train.py --resume {last}"]
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 0 and "resume" in ckpt  # epoch 0's checkpoint, untouched by the interruption
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left

    command = lines[0].split("continue with: python train.py ")[1].split()
    assert command == ["--resume", str(last)]
    # The exact command works; a session switch (--no-tensorboard) is taken, a training setting (--cos-lr) is named
    # and ignored
    events_before = sorted((tmp_path / "stopped").glob("events.out.tfevents.*"))
    assert len(events_before) == 1
    resumed = run_train(command + ["--no-tensorboard", "--cos-lr"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert load_checkpoint(last)["epoch"] == 2
    assert ("--resume continues the run with the settings it was started with; ignoring --cos-lr"
            in resumed.stdout)
    assert sorted((tmp_path / "stopped").glob("events.out.tfevents.*")) == events_before  # no new writer opened
    assert load_checkpoint(last)["opt"]["cos_lr"] is False
    # The log says what the run does after warm-up, and where warm-up stands (100 iterations; 3 done)
    assert f"Accumulating 16 x {BATCH} = 64 images per optimizer step (nominal batch 64)" in resumed.stdout
    assert "warm-up: 97 of 100 iterations left, accumulating 1 batch per step now" in resumed.stdout
    assert "(1 x 4)" not in resumed.stdout


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tiny, tmp_path):
    out = run_train(tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "early", 2), **{INTERRUPT_HOOK_ENV: 1})
    assert out.returncode == 130 and "Traceback" not in out.stdout
    assert [ln for ln in out.stdout.splitlines() if "interrupted" in ln] == [
        f"train: interrupted in epoch 0 at batch 2 of {NB}; no epoch has been saved yet, so there is nothing to "
        "resume: start the run again"]


def test_ctrl_c_while_finishing_says_the_weights_are_trained(tiny, tmp_path):
    out = run_train(tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "late", 1), **{INTERRUPT_HOOK_ENV: "finish"})
    assert out.returncode == 130 and "Traceback" not in out.stdout
    weights = tmp_path / "late" / "weights"
    assert [ln for ln in out.stdout.splitlines() if "interrupted" in ln] == [
        "train: interrupted after the last epoch, while validating best.pt and plotting; the trained weights are in "
        f"{weights / 'best.pt'} and {weights / 'last.pt'}; finish with: python train.py --resume {weights / 'last.pt'}"]
    assert load_checkpoint(weights / "last.pt")["epoch"] == 0


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt  # what Ctrl-C raises wherever the run is


@pytest.mark.parametrize("stage, where", [
    ("check_anchors", "interrupted before training began"),  # set-up, once hyp.yaml, opt.yaml and labels.jpg exist
    ("train_epoch", "interrupted in epoch 0 before its first batch"),  # as while the loader's workers start
])
def test_ctrl_c_before_the_first_batch_removes_the_run_folder_it_made(tiny, tmp_path, caplog, monkeypatch, stage, where):
    monkeypatch.setattr(train, stage, ctrl_c)
    args = [str(a) for a in tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "exp", 1)]
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert train.cli(train.parse_opt(args)) == 130
    assert errors_of(caplog) == [f"train: {where}; nothing was saved; removed {tmp_path / 'exp'}, which held only the "
                                 "run's settings and label plots"]
    assert list(tmp_path.iterdir()) == []  # the next run is exp again, not exp2


def test_ctrl_c_before_the_first_batch_keeps_a_folder_that_existed(tiny, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(train, "check_anchors", ctrl_c)
    kept = tmp_path / "exp"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    args = [str(a) for a in tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "exp", 1, "--exist-ok")]
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert train.cli(train.parse_opt(args)) == 130
    assert errors_of(caplog) == [f"train: interrupted before training began; nothing was saved; {kept} existed "
                                 "before this run (--exist-ok) and is left in place"]
    assert (kept / "notes.txt").read_text() == "mine"


def test_a_batch_larger_than_the_dataset_is_clamped_and_accumulation_follows(tiny, tmp_path, caplog, monkeypatch):
    """--batch-size 24 on 12 images trains batches of 12: accumulation round(64 / 12) = 5, so 60 images per step,
    and the weight decay is hyp's 0.0005 scaled by 60 / 64, not by 24 * 3 / 64 (what a batch of 24 would get)."""
    decays = []
    real_build = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda *a: decays.append(a[4]) or real_build(*a))
    monkeypatch.setattr(train, "train_epoch", ctrl_c)  # set-up is all this test needs
    args = in_process_args(tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "big", 1, "--batch-size", 24))
    with caplog.at_level(logging.INFO, logger="yolo"), one_intra_op_thread():
        assert train.cli(train.parse_opt(args)) == 130
    assert f"--batch-size 24 is more than the {N_IMAGES} training images: training with batches of 12" in caplog.text
    assert "Accumulating 5 x 12 = 60 images per optimizer step (nominal batch 64)" in caplog.text
    assert decays == [pytest.approx(0.0005 * 60 / 64)]
    # One batch, one epoch: the first iteration steps (accumulation starts at 1), so the shipped ramp (tau 2000)
    # ends at 0.9999 * (1 - exp(-1 / 2000)), far from averaging, and the run says so at its start.
    assert (f"EMA: ramp schedule, decay 0.9999, tau 2000; at the last of the run's 1 optimizer steps its decay will "
            f"be {0.9999 * (1 - math.exp(-1 / 2000)):.4f}") in caplog.text
    assert "EMA: the ramp reaches only 0% of its ceiling in 1 optimizer steps" in caplog.text


def test_every_command_says_results_saved_to_the_same_way(tiny, tmp_path, caplog, monkeypatch):
    """train.py, val.py, detect.py and export.py name their results folder alike: relative to the working folder
    when it lies inside it (as YOLOv5 prints runs/train/exp), absolute otherwise."""
    import detect
    import export

    monkeypatch.chdir(tmp_path)
    args = in_process_args(tiny_run_args(tiny["data"], tiny["cfg"], "runs", "exp", 1, "--noval", "--no-tensorboard"))
    image = next((tiny["data"].parent / "images" / "train").glob("*.jpg"))
    weights = ["--weights", "runs/exp/weights/best.pt"]
    commands = [(train.cli, lambda: train.parse_opt(args), "runs/exp"),
                (val.main, lambda: weights + ["--workers", "0", "--project", str(tmp_path / "v")], "v/exp"),
                (detect.main, lambda: weights + ["--source", str(image), "--project", "d"], "d/exp"),
                (export.main, lambda: weights, "runs/exp/weights")]
    with one_intra_op_thread():
        for command, argv, folder in commands:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="yolo"):
                assert command(argv()) == 0
            said = [ln for r in caplog.records for ln in r.getMessage().splitlines() if ln.startswith("Results saved")]
            assert said == [f"Results saved to {folder}"], command
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", str(tmp_path / "runs/exp/weights/best.pt"), "--workers", "0", "--project",
                         str(tmp_path / "v")]) == 0
    assert f"Results saved to {tmp_path / 'v' / 'exp2'}" in caplog.text


@pytest.mark.parametrize("flag", ["--data", "--hyp", "--cfg"])
def test_a_binary_file_or_folder_given_as_a_yaml_fails_in_one_line(tiny, tmp_path, caplog, flag):
    binary = tmp_path / "best.pt"
    binary.write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8
    project = tmp_path / "runs"
    base = {"--data": str(tiny["data"]), "--cfg": str(tiny["cfg"])}
    for given, expected in [
        (binary, {"--data": f"--data {binary} is not a yaml file: it holds binary data, not text",
                  "--hyp": f"--hyp {binary} is not a yaml file: it holds binary data, not text",
                  "--cfg": f"--cfg {binary}: model config {binary} is not a yaml file: it holds binary data, not text"}),
        (tmp_path, {"--data": f"--data {tmp_path} is a folder; give the dataset's yaml file (e.g. data/coco128.yaml)",
                    "--hyp": f"--hyp {tmp_path} is a folder, not a yaml file", "--cfg": None}),
    ]:
        if expected[flag] is None:  # a folder as --cfg is not a model config file: "not found", as before
            continue
        args = [*sum(([k, v] for k, v in {**base, flag: str(given)}.items()), []), "--device", "cpu", "--img", "64",
                "--project", str(project), "--workers", "0"]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="yolo"):
            assert train.cli(train.parse_opt(args)) == 1
        assert errors_of(caplog) == [f"train: {expected[flag]}"]
    assert not project.exists()


def test_a_yolov5_weights_name_says_it_cannot_be_downloaded(tiny, tmp_path, caplog):
    args = ["--data", str(tiny["data"]), "--weights", "yolov5n.pt", "--device", "cpu", "--project", str(tmp_path)]
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert train.cli(train.parse_opt(args)) == 1
    assert errors_of(caplog) == ["train: --weights: checkpoint yolov5n.pt not found: pretrained weights cannot be "
                                 "downloaded here; train from scratch with python train.py --cfg yolov5n.yaml "
                                 "--weights '', or give the path of a local .pt file"]


def test_a_full_disk_ends_the_run_in_one_line_with_the_resume_command(tiny, tmp_path, caplog, monkeypatch):
    real_save = torch.save
    writes = []

    def save(obj, f, *args, **kwargs):
        writes.append(os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")))  # the temporary file's name
        if writes[-1].startswith(".last.pt.") and sum(w.startswith(".last.pt.") for w in writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = in_process_args(tiny_run_args(tiny["data"], tiny["cfg"], tmp_path, "full", 3))
    with one_intra_op_thread(), caplog.at_level(logging.INFO, logger="yolo"):
        assert train.cli(train.parse_opt(args)) == 1
    last = tmp_path / "full" / "weights" / "last.pt"
    [line] = errors_of(caplog)
    assert line.startswith(f"train: could not write checkpoint {last}: OSError: [Errno 28] No space left on device; ")
    assert line.endswith(f"{last} holds epoch 0; continue with: python train.py --resume {last}")
    monkeypatch.undo()
    assert load_checkpoint(last)["epoch"] == 0  # the previous last.pt, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]


# ------------------------------------------------------------------------------------------ a finished run
@pytest.fixture(scope="module")
def finished(tiny):
    project = tiny["root"] / "runs"
    out = run_train(tiny_run_args(tiny["data"], tiny["cfg"], project, "done", 2, "--workers", 8, "--save-period", 1))
    assert out.returncode == 0, out.stdout[-3000:]
    return {"out": out.stdout, "run": project / "done", "project": project}


def test_finished_checkpoints_keep_what_evaluation_and_fine_tuning_need(finished, tiny):
    weights = finished["run"] / "weights"
    best = torch.load(weights / "best.pt", weights_only=True)
    last = torch.load(weights / "last.pt", weights_only=True)
    assert set(best) == set(FINISHED_KEYS)  # no optimizer momenta, no resume state
    assert set(torch.load(weights / "epoch1.pt", weights_only=True)) == set(FINISHED_KEYS)
    assert set(last) == set(FINISHED_KEYS) | {"optimizer", "train_state"}  # --resume --epochs N extends it
    assert all(v.dtype == torch.float16 for k in ("model", "ema") for v in best[k].values() if v.is_floating_point())
    sizes = f"best.pt {(weights / 'best.pt').stat().st_size / 1e6:.1f} MB, last.pt {(weights / 'last.pt').stat().st_size / 1e6:.1f} MB"
    assert f"Checkpoints: {sizes}" in finished["out"]
    assert (weights / "best.pt").stat().st_size < 0.75 * (weights / "last.pt").stat().st_size

    # the stripped best.pt still validates and fine-tunes
    results = val.run(str(tiny["data"]), weights=weights / "best.pt", batch_size=4, workers=0, plots=False,
                      project=tiny["root"] / "val")[0]
    assert len(results) == 7
    out = run_train(tiny_run_args(tiny["data"], "", tiny["root"] / "runs", "tuned", 1, "--weights", weights / "best.pt",
                                  "--noval"))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Transferred 349/349 items" in out.stdout


def test_a_run_starts_with_its_arguments_and_versions(finished, tiny):
    """The two lines users paste into bug reports: every option as YOLOv5 prints them, then project commit,
    Python, torch and device."""
    lines = finished["out"].splitlines()
    args = next(line for line in lines if line.startswith("train: "))
    assert args.startswith(f"train: weights=, cfg={tiny['cfg']}, data={tiny['data']}, hyp=")
    assert ", epochs=2, batch_size=4, imgsz=64, " in args and args.endswith(", local_rank=-1")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    version = lines[lines.index(args) + 1:][:3]
    expected = (f"yolo-ema commit {commit.stdout.strip()}, Python-{platform.python_version()} "
                f"torch-{torch.__version__} CPU")
    assert expected in version


def test_the_log_gives_the_workers_really_used(finished):
    used = min(os.cpu_count() or 1, BATCH, 8)  # create_dataloader's rule: cores, batch and --workers 8
    assert f"; {used} dataloader workers;" in finished["out"]
    assert "8 dataloader workers" not in finished["out"] or used == 8


def test_val_without_weights_or_img_takes_the_latest_best_at_its_trained_size(finished, tiny, caplog, monkeypatch):
    monkeypatch.setattr(val, "TRAIN_RUNS", finished["project"])
    best = finished["project"] / "tuned" / "weights" / "best.pt"
    latest = max(finished["project"].glob("*/weights/best.pt"), key=lambda f: f.stat().st_mtime)
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--data", str(tiny["data"]), "--workers", "0", "--project", str(tiny["root"] / "v")]) == 0
    text = caplog.text
    assert f"No --weights given: validating the latest run's {latest}" in text
    assert "Validating at --img 64, the size the weights were trained at" in text
    assert "per image at shape (32, 3, 64, 64)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):  # --img still wins
        assert val.main(["--data", str(tiny["data"]), "--weights", str(best), "--img", "96", "--workers", "0",
                         "--project", str(tiny["root"] / "v")]) == 0
    assert "Validating at" not in caplog.text and "per image at shape (32, 3, 96, 96)" in caplog.text

    monkeypatch.setattr(val, "TRAIN_RUNS", tiny["root"] / "nothing")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--data", str(tiny["data"]), "--project", str(tiny["root"] / "v")]) == 1
    assert errors_of(caplog) == [f"val: no --weights given and no trained weights found under "
                                 f"{tiny['root'] / 'nothing'}; pass --weights path/to/best.pt"]
