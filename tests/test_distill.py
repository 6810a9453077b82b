"""Distillation (--teacher PATH|ema, utils/distill.py): the loss against hand-computed values, teachers that do not
fit refused in one line before a run folder exists, checkpoints and the EMA holding the student alone, and a
distilled run killed mid-epoch resuming bit-exact (a YOLOv5 .pt teacher and the EMA as teacher)."""
import copy
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml

from models.yolo import Model
from tests.train_helpers import (KILL_HOOK_ENV, ROOT, checkpoint_differences, make_dataset, results_columns, run_train,
                                 refused_run, tensorboard_scalars, tiny_model_yaml, tiny_run_args, train_env)
from train import TrainError, load_hyp, parse_opt
from utils.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, unpacked_state_dict
from utils.distill import Distiller, Teacher, TeacherError, check_teacher_fits, load_teacher, weights_sha256

EPOCHS, NB = 3, 3  # 12 images, batch 4


# ------------------------------------------------------------------------------------------ the loss
def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logit(p):
    return math.log(p / (1 - p))


def kl(q, p):
    """Bernoulli KL(q || p), by its definition."""
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


class _Head(nn.Module):
    def __init__(self, anchor_wh):
        super().__init__()
        self.nl, self.na = 3, 1
        self.register_buffer("anchors", torch.tensor([[anchor_wh]] * 3, dtype=torch.float32))  # (nl, na, 2)


class _Net(nn.Module):
    """What the distiller reads of a model: the Detect head's anchors, and the run's scaled loss gains."""

    def __init__(self, anchor_wh, hyp=None):
        super().__init__()
        self.model = nn.Sequential(_Head(anchor_wh))
        self.hyp = hyp


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_equals_the_hand_computed_value(temperature):
    """Three levels, each a 1 x 2 grid of one anchor, two classes. Cell A: teacher logits 0 (objectness 0.5, class
    0.5, 0.5), student objectness ln 3 and classes (ln 3, 0), the same box logits but the student's anchor is twice
    the teacher's: a box twice as wide and high on the same centre, so CIoU = IoU = 1/4. Cell B: teacher objectness
    1/4, the student equal to the teacher (its box logits compensate the larger anchor): it adds nothing but its
    weight 1/4 in the weighted means."""
    gains = {"box": 0.05, "obj": 1.0, "cls": 0.5}
    student, teacher_net = _Net((2.0, 2.0), gains), _Net((1.0, 1.0)).eval()
    distiller = Distiller(Teacher("t.pt", teacher_net), student, None,
                          {"kd_weight": 2.0, "kd_temperature": temperature})
    wh_b = logit(1 / (2 * math.sqrt(2)))  # (2 * sigmoid * ) ** 2 * 2 == 1: the teacher's box with anchor 1
    t = torch.zeros(1, 1, 1, 2, 7)
    t[0, 0, 0, 1, 4] = logit(0.25)
    s = t.clone()
    s[0, 0, 0, 0, 4], s[0, 0, 0, 0, 5] = math.log(3), math.log(3)
    s[0, 0, 0, 1, 2:4] = wh_b
    kd, item = distiller.loss([s.clone() for _ in range(3)], [t.clone() for _ in range(3)])

    T = temperature
    kl_obj_a = kl(0.5, sigmoid(math.log(3) / T)) * T ** 2
    l_obj = sum([4.0, 1.0, 0.4]) * kl_obj_a / 2  # mean over the 2 cells, YOLOv5's level balance
    l_cls = 3 * (0.5 * (kl_obj_a + 0) / 2) / (0.5 + 0.25)  # classes' mean, weighted by teacher objectness
    l_box = 3 * (0.5 * (1 - 0.25) + 0.25 * 0) / (0.5 + 0.25)
    expected = 2.0 * (1.0 * l_obj + 0.5 * l_cls + 0.05 * l_box)
    assert item.item() == pytest.approx(expected, rel=1e-5)
    assert kd.item() == pytest.approx(expected * 1, rel=1e-5)  # batch of one


def test_loss_is_zero_for_a_student_equal_to_its_teacher_and_scales_with_the_batch():
    torch.manual_seed(0)
    gains = {"box": 0.05, "obj": 1.0, "cls": 0.5}
    net = _Net((1.5, 2.0), gains)
    distiller = Distiller(Teacher("t.pt", copy.deepcopy(net)), net, None, {"kd_weight": 1.0, "kd_temperature": 1.0})
    raw = [torch.randn(3, 1, 2, 2, 9) for _ in range(3)]
    assert distiller.loss(raw, [r.clone() for r in raw])[1].item() == pytest.approx(0.0, abs=1e-6)
    other = [torch.randn(3, 1, 2, 2, 9) for _ in range(3)]
    kd, item = distiller.loss(raw, other)
    assert item.item() > 0 and kd.item() == pytest.approx(3 * item.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ teachers
def tiny_cfg(root, width=0.125, nc=2):
    cfg = yaml.safe_load(tiny_model_yaml(root).read_text())
    cfg.update(width_multiple=width, nc=nc)
    return cfg


def yolov5_teacher_file(path, cfg, names, seed=0):
    """An original-YOLOv5-style .pt: a whole pickled model (our layers carry YOLOv5's module paths), FP16."""
    torch.manual_seed(seed)
    model = Model(copy.deepcopy(cfg), ch=3, verbose=False)
    model.names = list(names)
    torch.save({"epoch": -1, "model": model.half(), "ema": None, "best_fitness": None, "date": "2026-12-03"}, path)
    return path


def named_model(cfg, names=("c0", "c1")):
    model = Model(cfg, ch=3, verbose=False)
    model.names = list(names)
    return model


def test_teacher_that_does_not_fit_is_named(tmp_path):
    student, names = named_model(tiny_cfg(tmp_path)), ["c0", "c1"]
    check_teacher_fits(named_model(tiny_cfg(tmp_path, width=0.25)), student, names, tmp_path)  # wider: fits
    strided = named_model(tiny_cfg(tmp_path))
    strided.model[-1].stride = [16, 32, 64]
    two_anchors = tiny_cfg(tmp_path)
    two_anchors["anchors"] = [a[:4] for a in two_anchors["anchors"]]
    cases = [(named_model(tiny_cfg(tmp_path, nc=3), ["c0", "c1", "c2"]), "predicts 3 classes, the student 2"),
             (named_model(tiny_cfg(tmp_path), ["c0", "x"]), "class 1 is 'x' for the teacher, 'c1' for the student"),
             (strided, r"output strides \[16, 32, 64\], the student \[8, 16, 32\]"),
             (named_model(two_anchors), "2 anchors per cell, the student 3")]
    for teacher, message in cases:
        with pytest.raises(TeacherError, match=message):
            check_teacher_fits(teacher, student, names, tmp_path / "t.pt")


def test_kd_hyp_keys_checked_and_zero_weight_turns_distillation_off(tmp_path):
    base = load_hyp(parse_opt([]).hyp)
    assert base["kd_weight"] == 1.0 and base["kd_temperature"] == 1.0
    for bad, message in [({"kd_weight": -1}, "kd_weight must be >= 0"), ({"kd_temperature": 0}, "kd_temperature must"),
                         ({"kd_tmp": 2}, "unknown distillation hyperparameter")]:
        with pytest.raises(TrainError, match=message):
            load_hyp({**base, **bad})
    student = Model(tiny_cfg(tmp_path), ch=3, verbose=False)
    teacher = yolov5_teacher_file(tmp_path / "t.pt", tiny_cfg(tmp_path, width=0.25), ["c0", "c1"])
    off = load_teacher(str(teacher), {**base, "kd_weight": 0.0}, student, ["c0", "c1"], torch.device("cpu"))
    assert off is None
    on = load_teacher(str(teacher), base, student, ["c0", "c1"], torch.device("cpu"))
    assert not on.model.training and not any(p.requires_grad for p in on.model.parameters())
    assert on.sha256 == weights_sha256(on.model.state_dict()) and on.source == str(teacher.resolve())


def test_teacher_runs_frozen_without_gradients_under_the_runs_autocast(tmp_path):
    base = load_hyp(parse_opt([]).hyp)
    student = named_model(tiny_cfg(tmp_path))
    student.hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5}
    path = yolov5_teacher_file(tmp_path / "t.pt", tiny_cfg(tmp_path, width=0.25), ["c0", "c1"])
    teacher = load_teacher(str(path), base, student, ["c0", "c1"], torch.device("cpu"))
    distiller = Distiller(teacher, student, None, base)
    imgs = torch.rand(2, 3, 64, 64, requires_grad=True)
    for amp_dtype, dtype in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        raw = distiller.teacher_outputs(imgs, amp_dtype)
        assert [r.shape for r in raw] == [(2, 3, 8, 8, 7), (2, 3, 4, 4, 7), (2, 3, 2, 2, 7)]
        assert all(r.dtype == dtype and not r.requires_grad for r in raw), amp_dtype
    assert not distiller.teacher_model.training


# ------------------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data, cfg = make_dataset(root / "data", n=12), tiny_model_yaml(root)
    # A wider teacher (every tensor of another shape than the student's), as an original YOLOv5 file
    teacher = yolov5_teacher_file(root / "yolov5_teacher.pt", tiny_cfg(root, width=0.25), ["c0", "c1"])
    project = root / "runs"
    refs = {}
    for name, spec in (("ref_file", teacher), ("ref_ema", "ema")):
        out = run_train(tiny_run_args(data, cfg, project, name, EPOCHS, "--teacher", spec))
        assert out.returncode == 0, out.stdout[-3000:]
        refs[name] = project / name
        refs[f"{name}_out"] = out.stdout
    return {"root": root, "data": data, "cfg": cfg, "teacher": teacher, "project": project, **refs}


def test_checkpoints_and_ema_hold_the_student_only(setup):
    student = Model(str(setup["cfg"]), ch=3, nc=2, verbose=False).state_dict()
    shapes = {k: tuple(v.shape) for k, v in student.items()}
    for name in ("ref_file", "ref_ema"):
        for f in ("last.pt", "best.pt"):
            ckpt = load_checkpoint(setup[name] / "weights" / f)
            for key in ("model", "ema"):
                assert {k: tuple(v.shape) for k, v in ckpt[key].items()} == shapes, (name, f, key)
    ckpt = load_checkpoint(setup["ref_file"] / "weights" / "last.pt")
    teacher_weights = model_from_checkpoint(load_checkpoint(setup["teacher"])).state_dict()
    assert ckpt["train_state"]["teacher"] == {"path": str(setup["teacher"].resolve()),
                                              "sha256": weights_sha256(teacher_weights)}
    ema_ckpt = load_checkpoint(setup["ref_ema"] / "weights" / "last.pt")
    assert ema_ckpt["train_state"]["teacher"] == {"path": "ema", "sha256": None}
    for name in ("ref_file", "ref_ema"):
        columns = results_columns(setup[name] / "results.csv")
        assert len(columns["train/kd_loss"]) == EPOCHS and all(v > 0 for v in columns["train/kd_loss"])


def test_a_distilled_run_says_so_at_its_start(setup):
    """One line before the first epoch, as --posthoc's: the teacher (its file and weights' digest, or the EMA),
    kd_weight and kd_temperature (the hyp defaults, 1 and 1, here)."""
    digest = weights_sha256(model_from_checkpoint(load_checkpoint(setup["teacher"])).state_dict())
    for name, who in (("ref_file", f"{setup['teacher'].resolve()} (sha256 {digest[:12]}...)"),
                      ("ref_ema", "the run's own EMA")):
        out = setup[f"{name}_out"]
        lines = [ln for ln in out.splitlines() if ln.startswith("Distillation: ")]
        assert lines == [f"Distillation: teacher {who}, kd_weight 1, kd_temperature 1; results.csv gains a "
                         "train/kd_loss column"]
        assert out.index(lines[0]) < out.index("epochs completed")


@pytest.mark.parametrize("teacher", ["file", "ema"])
def test_distilled_run_killed_mid_epoch_resumes_bit_exact(setup, teacher):
    spec, name = (setup["teacher"] if teacher == "file" else "ema"), f"killed_{teacher}"
    args = tiny_run_args(setup["data"], setup["cfg"], setup["project"], name, EPOCHS, "--teacher", spec)
    killed = run_train(args, **{KILL_HOOK_ENV: 4})
    assert killed.returncode == -9, killed.stdout[-3000:]
    last = setup["project"] / name / "weights" / "last.pt"
    interrupted = load_checkpoint(last)
    assert interrupted["epoch"] == 0 and "resume" in interrupted
    student = Model(str(setup["cfg"]), ch=3, nc=2, verbose=False).state_dict()
    # the resume state's FP32 EMA is the student's, tensor for tensor
    assert [(k, v.shape) for k, v in unpacked_state_dict(interrupted["resume"]["ema"]["ema"]).items()] == \
           [(k, v.shape) for k, v in student.items()]
    resumed = run_train(["--resume", last])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    ref = setup[f"ref_{teacher}"]
    for f in ("last.pt", "best.pt"):
        a = torch.load(ref / "weights" / f, weights_only=True)
        b = torch.load(setup["project"] / name / "weights" / f, weights_only=True)
        assert checkpoint_differences(a, b) == [], f
    assert (setup["project"] / name / "results.csv").read_text() == (ref / "results.csv").read_text()
    scalars = tensorboard_scalars(setup["project"] / name)
    kd = results_columns(ref / "results.csv")["train/kd_loss"]
    assert [v for _, v in scalars["train/kd_loss"]] == pytest.approx(kd, rel=1e-4)



def test_mismatched_teacher_refused_before_a_run_folder_exists(setup, tmp_path):
    wrong = yolov5_teacher_file(tmp_path / "nc3.pt", tiny_cfg(tmp_path, nc=3), ["c0", "c1", "c2"])
    project = tmp_path / "runs"
    project.mkdir()
    line = refused_run(tiny_run_args(setup["data"], setup["cfg"], project, "kd", 1, "--teacher", wrong), project)
    assert "--teacher" in line and "nc3.pt" in line and "3 classes, the student 2" in line
    assert not any(project.iterdir())
    line = refused_run(tiny_run_args(setup["data"], setup["cfg"], project, "kd", 1, "--teacher", tmp_path / "no.pt"),
                    project)
    assert "no.pt" in line and "not found" in line


def test_resume_refuses_a_teacher_file_changed_since(setup, tmp_path):
    """--resume --epochs 4 of a finished distilled run (an extension reloads the teacher as any resume does),
    pointed at a copy of its teacher that then gets other weights."""
    run = tmp_path / "run"
    shutil.copytree(setup["ref_file"], run)
    teacher = shutil.copy(setup["teacher"], tmp_path / "teacher.pt")
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    ckpt["train_state"]["teacher"]["path"] = str(teacher)
    save_checkpoint(ckpt, run / "weights" / "last.pt")
    yolov5_teacher_file(teacher, tiny_cfg(tmp_path, width=0.25), ["c0", "c1"], seed=1)  # other weights, same path
    line = refused_run(["--resume", run / "weights" / "last.pt", "--epochs", EPOCHS + 1], tmp_path)
    assert "teacher" in line and "teacher.pt" in line and "changed since the run started" in line


def test_torchrun_each_process_distils_from_its_own_ema(setup, tmp_path):
    """--teacher ema under DDP: the EMA is the teacher, so every process keeps one (not rank 0 alone)."""
    args = tiny_run_args(setup["data"], setup["cfg"], tmp_path / "runs", "ddp", 1, "--device", "cpu",
                         "--teacher", "ema")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *map(str, args)]
    out = subprocess.run(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stdout[-4000:]
    ckpt = load_checkpoint(tmp_path / "runs" / "ddp" / "weights" / "last.pt")
    assert ckpt["train_state"]["teacher"] == {"path": "ema", "sha256": None} and ckpt["updates"] == 3
    assert results_columns(tmp_path / "runs" / "ddp" / "results.csv")["train/kd_loss"][0] > 0
