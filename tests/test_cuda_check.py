"""bench/cuda_check.py's parts that need no GPU: --device parsing, the dataset lookup (never a download), the budget's
plan (optional steps dropped first, --compile first of all) and the exit status (non-zero when a step missed or a
required one was skipped)."""
import pytest
import yaml

from bench import cuda_check
from bench.cuda_check import STEPS, CheckError, Row, exit_status, find_dataset, parse_devices, plan, write_data_yaml


def test_device_strings():
    assert parse_devices("cuda") == [0] and parse_devices("0") == [0] and parse_devices("cuda:1") == [1]
    assert parse_devices("0,1") == [0, 1] and parse_devices(" 1, 0 ") == [1, 0]
    for bad in ("cpu", "", "gpu", "-1", "0,", "0,0", "cuda:x"):
        with pytest.raises(CheckError):
            parse_devices(bad)


def _coco_like(folder):
    (folder / "images" / "train2017").mkdir(parents=True)
    (folder / "labels" / "train2017").mkdir(parents=True)
    return folder


def test_dataset_lookup_by_name_folder_and_yaml_and_the_yaml_written(tmp_path):
    found = _coco_like(tmp_path / "sets" / "coco128")
    env = {"DATASETS_DIR": str(tmp_path / "sets")}
    folder, spec = find_dataset("coco128", env)  # the name: data/coco128.yaml's names, the images from DATASETS_DIR
    assert folder == found.resolve() and len(spec["names"]) == 80
    assert find_dataset("coco128.yaml", env)[0] == found.resolve()
    assert find_dataset(str(found), env) == (found.resolve(), spec)  # a folder as it is, the names by its name
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"path": str(found), "train": "images/train2017", "names": {0: "a"}}))
    assert find_dataset(str(own), {}) == (found.resolve(), yaml.safe_load(own.read_text()))
    written = yaml.safe_load(write_data_yaml(folder, spec, tmp_path).read_text())
    assert written["path"] == str(found.resolve()) and written["train"] == written["val"] == "images/train2017"
    assert len(written["names"]) == 80 and "download" not in written


def test_a_dataset_not_found_is_one_line_naming_the_places_searched(tmp_path):
    env = {"DATASETS_DIR": str(tmp_path / "empty")}
    with pytest.raises(CheckError) as e:
        find_dataset("nosuchset", env)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "empty" / "nosuchset") in message
    assert "nothing is downloaded" in message and str(cuda_check.ROOT / "shared" / "datasets" / "nosuchset") in message


def test_the_budget_drops_optional_steps_from_the_end_then_required_ones():
    total = sum(s.estimate for s in STEPS)
    required = sum(s.estimate for s in STEPS if s.required)
    compile_step = next(s for s in STEPS if s.name.startswith("--compile"))
    assert not compile_step.required and STEPS.index(compile_step) == len(STEPS) - 2  # last but the log grep
    assert all(runs for _, runs in plan(STEPS, total))
    dropped = [s for s, runs in plan(STEPS, total - 1) if not runs]
    assert dropped == [compile_step]  # the most expensive optional step goes first
    fitted = plan(STEPS, required)
    assert all(runs == s.required for s, runs in fitted)  # every optional one skipped, every required one kept
    short = plan(STEPS, required - 1)  # then the last required step that costs anything: bench/ema.py
    assert all(not runs for s, runs in short if not s.required)
    assert [s.name for s, runs in short if s.required and not runs] == ["bench/ema.py --models s l (GPU targets)"]
    assert short[-1][1]  # the log grep, estimated at 0 s, always runs


def test_exit_status():
    ok, miss = Row("a", True, "ok"), Row("b", True, "MISS")
    assert exit_status([ok, Row("c", False, "skipped")]) == 0  # an optional step skipped: fine, and said so
    assert exit_status([ok, miss]) == 1
    assert exit_status([ok, Row("c", True, "skipped")]) == 1  # a required step skipped
    assert exit_status([ok, Row("c", False, "MISS")]) == 1  # an optional step that ran and missed
    assert exit_status([]) == 1


def test_plan_command_exit_status_and_bad_arguments(tmp_path, monkeypatch, capsys):
    found = _coco_like(tmp_path / "coco128")
    required = sum(s.estimate for s in STEPS if s.required)
    assert cuda_check.main(["--plan", "--data", str(found), "--budget", str(required)]) == 0
    text = capsys.readouterr().out
    assert "| --compile (Inductor), 1 epoch | skipped (budget), optional |" in text
    assert cuda_check.main(["--plan", "--data", str(found), "--budget", str(required - 1)]) == 1
    assert "skipped (budget), REQUIRED" in capsys.readouterr().out
    assert cuda_check.main(["--plan", "--data", str(found), "--device", "cpu"]) == 2
    assert capsys.readouterr().out.startswith("cuda_check: --device 'cpu':")
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "none"))
    assert cuda_check.main(["--plan", "--data", "nosuchset"]) == 2


def _context(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return cuda_check.Context(out, out / "data.yaml", [0])


def test_the_log_grep_counts_torchs_determinism_warnings(tmp_path):
    ctx = _context(tmp_path)
    (ctx.out / "train_ref.log").write_text("Epoch 0\nall 128 929 0.5 0.4 0.45 0.3\n")
    assert cuda_check.step_determinism(ctx) == (True, "0 warnings")
    (ctx.out / "train_bf16.log").write_text(
        "UserWarning: upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you "
        "set 'torch.use_deterministic_algorithms(True, warn_only=True)'.\n")
    ok, figure = cuda_check.step_determinism(ctx)
    assert not ok and figure.startswith("1 warnings, first in train_bf16.log: UserWarning: upsample_bilinear2d")


def test_the_cpu_load_step_reads_last_pt_with_no_gpu_visible(tmp_path):
    """The step's own subprocess, run here on a checkpoint of CPU tensors (what build_checkpoint now writes) and on
    a file that holds a tensor of another device (the meta device, which no process can load to the CPU)."""
    import torch

    from utils.checkpoint import save_checkpoint

    ctx = _context(tmp_path)
    last = ctx.weights("ref", "last.pt")
    save_checkpoint({"format": "yolo-ema", "model": {"w": torch.ones(3)}, "resume": {"m": [torch.zeros(2)]}}, last)
    assert cuda_check.step_cpu_load(ctx) == (True, "2 tensors on ['cpu']")
    torch.save({"w": torch.ones(3, device="meta")}, last)
    assert not cuda_check.step_cpu_load(ctx)[0]


def test_the_kill_falls_in_the_middle_of_epoch_1(tmp_path):
    """SIGKILL at global iteration batches + batches // 2: 12 for coco128's 128 images (8 batches of 16 per epoch),
    1 for a split of one batch."""
    for n, expected in ((128, 12), (8, 1), (33, 4)):
        images = tmp_path / str(n) / "images" / "train"
        images.mkdir(parents=True)
        for i in range(n):
            (images / f"{i}.jpg").write_bytes(b"")
        data = tmp_path / f"{n}.yaml"
        data.write_text(yaml.safe_dump({"path": str(tmp_path / str(n)), "train": "images/train"}))
        assert cuda_check.kill_iteration(data) == expected
