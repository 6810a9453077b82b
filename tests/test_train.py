"""train.py: option handling, helpers with hand-computed values, a full tiny run's files, and the rule that
the EMA is updated once per optimizer step actually taken (never after a skipped, non-finite step)."""
import argparse
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import train
from tests.train_helpers import (in_process_args, make_dataset, one_intra_op_thread, run_train, tiny_model_yaml,
                                 tiny_run_args)
from utils.checkpoint import load_checkpoint, save_checkpoint, unpacked_tree
from utils.ema import ModelEMA
from utils.loss import ComputeLoss

ROOT = train.ROOT


# ------------------------------------------------------------------------------------------ options and hyp
# YOLOv5's data/hyps/hyp.scratch-low.yaml, value by value, and what -med and -high change.
YOLOV5_SCRATCH_LOW = dict(
    lr0=0.01, lrf=0.01, momentum=0.937, weight_decay=0.0005, warmup_epochs=3.0, warmup_momentum=0.8,
    warmup_bias_lr=0.1, box=0.05, cls=0.5, cls_pw=1.0, obj=1.0, obj_pw=1.0, iou_t=0.20, anchor_t=4.0, fl_gamma=0.0,
    hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0, flipud=0.0,
    fliplr=0.5, mosaic=1.0, mixup=0.0, copy_paste=0.0)
YOLOV5_MED_CHANGES = dict(lrf=0.1, cls=0.3, obj=0.7, scale=0.9, mixup=0.1)
YOLOV5_HIGH_CHANGES = dict(YOLOV5_MED_CHANGES, copy_paste=0.1)
# torch.amp.GradScaler's own defaults, spelled out (a changed torch default must not change our runs silently)
AMP_KEYS = dict(amp_init_scale=2.0 ** 16, amp_growth_factor=2.0, amp_backoff_factor=0.5, amp_growth_interval=2000)
OUR_KEYS = dict(nbs=64, ema_decay=0.9999, ema_tau=2000, ema_schedule="ramp", ema_update_every=1, **AMP_KEYS,
                ema_unit="steps", posthoc_sigma_rels=[], posthoc_snapshots=32, ema_switch=False, ema_bn_recompute=0,
                ema_companion_taus=[], ema_bema=False, ema_bema_power=0.5, ema_bema_bias_power=0.2, ema_bema_lag=10,
                ema_bema_multiplier=1.0, kd_weight=1.0, kd_temperature=1.0)
# Keys the modules that read them default when a hyp file lacks them (load_hyp does not fill them in).
MODULE_DEFAULTED = ("ema_unit", "posthoc_sigma_rels", "posthoc_snapshots", "ema_switch", "ema_bn_recompute",
                    "ema_companion_taus", "ema_bema",
                    "ema_bema_power", "ema_bema_bias_power", "ema_bema_lag", "ema_bema_multiplier")


def test_hyp_files_hold_yolov5_values_and_our_keys(tmp_path):
    low, med, high = (train.load_hyp(ROOT / "hyp" / f"hyp.scratch-{k}.yaml") for k in ("low", "med", "high"))
    assert low == {**YOLOV5_SCRATCH_LOW, **OUR_KEYS}
    assert med == {**YOLOV5_SCRATCH_LOW, **YOLOV5_MED_CHANGES, **OUR_KEYS}
    assert high == {**YOLOV5_SCRATCH_LOW, **YOLOV5_HIGH_CHANGES, **OUR_KEYS}
    # A YOLOv5 hyp file has no nbs (YOLOv5 hard-codes 64), EMA or distillation keys: YOLOv5's values (and
    # distillation's defaults) fill them in, YOLOv5's tau 2000 among them, the value ours ship.
    yolov5 = {k: v for k, v in low.items() if k != "nbs" and not k.startswith(("ema_", "amp_", "posthoc_", "kd_"))}
    (tmp_path / "yolov5.yaml").write_text(yaml.safe_dump(yolov5))
    assert train.load_hyp(tmp_path / "yolov5.yaml") == {k: v for k, v in low.items() if k not in MODULE_DEFAULTED}
    broken = dict(low)
    del broken["lr0"], broken["obj"]
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(train.TrainError, match=r"h.yaml: missing hyperparameters lr0, obj$"):
        train.load_hyp(tmp_path / "h.yaml")


def test_bad_ema_settings_in_hyp_are_one_line_errors():
    hyp = train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert train.make_ema(net, hyp).updates == 0
    with pytest.raises(train.TrainError, match=r"^hyp: unknown EMA schedule 'cosine'"):
        train.make_ema(net, {**hyp, "ema_schedule": "cosine"})
    with pytest.raises(train.TrainError, match=r"^hyp: EMA decay must be in \[0, 1\], got 1.5"):
        train.make_ema(net, {**hyp, "ema_decay": 1.5})


def test_extending_an_unfinished_run_keeps_the_longer_plan_of_ema_steps():
    """The saved EMA state holds the planned optimizer steps of the original length ('exp' decays by them);
    an --epochs extension must keep the EMA's new, longer plan."""
    hyp = {**train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml"), "ema_schedule": "exp"}
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    saved = train.make_ema(net, hyp, total_steps=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scheduler, lf = train.build_scheduler(optimizer, 6, 0.01)  # built for the extended length, as train() does
    ckpt = {"epoch": 1, "best_fitness": 0.0, "updates": 0, "optimizer": None, "opt": {"epochs": 3}, "train_state": {},
            "resume": {"ema": saved.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None, "rng": None}}
    ema = train.make_ema(net, hyp, total_steps=20)
    opt = argparse.Namespace(epochs=6, resume="last.pt")
    train.restore_training_state(ckpt, opt, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                                 train.EarlyStopping(), ema, lf, 1)
    assert ema.total_steps == 20
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lf(1))  # the stretched schedule: epoch 2 at lf(1)


def test_parse_opt_defaults_and_resume_forms():
    opt = train.parse_opt([])
    assert opt.imgsz == 640 and opt.batch_size == 16 and opt.hyp.endswith("hyp.scratch-low.yaml")
    assert opt.epochs is None and opt.resume is False and opt.freeze == [0] and opt.optimizer == "SGD"
    assert train.parse_opt(["--resume"]).resume is True
    assert train.parse_opt(["--resume", "x/last.pt", "--img", "320"]).resume == "x/last.pt"
    with pytest.raises(SystemExit):
        train.parse_opt(["--optimizer", "RMSprop"])


def test_without_cfg_or_weights_the_model_is_yolov5s_from_scratch():
    opt = train.parse_opt([])  # as `python train.py --data coco128.yaml`
    model, pretrained = train.build_model(opt, {}, 80, None, torch.device("cpu"))
    assert pretrained is None and opt.cfg == "yolov5s.yaml"
    assert sum(p.numel() for p in model.parameters()) == 7_235_389  # YOLOv5's yolov5s at 80 classes


def test_multi_scale_size_is_a_seeded_multiple_of_stride():
    sizes = [train.multi_scale_size(320, 32, 0, 3, i) for i in range(200)]
    assert all(s % 32 == 0 and 160 <= s <= 480 for s in sizes) and len(set(sizes)) > 5
    assert sizes == [train.multi_scale_size(320, 32, 0, 3, i) for i in range(200)]  # pure function
    assert sizes != [train.multi_scale_size(320, 32, 0, 4, i) for i in range(200)]  # varies with the epoch


def test_class_weights_and_loss_gains():
    labels = [np.array([[0, .5, .5, .1, .1], [0, .2, .2, .1, .1]]), np.array([[2, .5, .5, .2, .2]]), np.zeros((0, 5))]
    w = train.class_weights_from_labels(labels, 3)
    # counts 2, 0 -> 1, 1; inverse 0.5, 1, 1 normalised to sum 3
    assert torch.allclose(w, torch.tensor([0.6, 1.2, 1.2]))
    g = train.loss_gains({"box": 0.05, "cls": 0.5, "obj": 1.0}, nc=20, nl=3, imgsz=320, label_smoothing=0.1)
    assert g["box"] == pytest.approx(0.05) and g["cls"] == pytest.approx(0.125) and g["obj"] == pytest.approx(0.25)
    assert g["label_smoothing"] == 0.1


def test_results_rows_are_fixed_format_and_truncate_on_resume(tmp_path):
    csv = tmp_path / "results.csv"
    for epoch in range(3):
        train.append_results_row(csv, [epoch] + [0.123456789 * (epoch + 1)] * 13, val_raw=False)
    lines = csv.read_text().splitlines()
    assert len(lines) == 4 and all(len(ln.split(",")) == 14 for ln in lines)
    assert lines[2].split(",")[1] == f"{0.246913578:20.5g}"
    train.truncate_results(csv, 1)  # a resume at epoch 1 retrains epochs 1 and 2
    assert csv.read_text().splitlines() == lines[:2]
    with pytest.raises(AssertionError):
        train.append_results_row(csv, [0] * 14, val_raw=True)  # --val-raw has 4 more columns


def test_optimizer_step_with_grad_scaler_skips_overflow_and_lowers_the_scale():
    """The AMP path (a CPU GradScaler stands in for CUDA's): an overflowing step is skipped, the scale halves,
    and the next step applies the unscaled gradient."""
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    bias = net.bias.detach().clone()
    (scaler.scale(net(torch.ones(1, 3)).sum()) * float("inf")).backward()
    assert train.optimizer_step(net, opt, scaler) is False
    assert scaler.get_scale() == 512.0 and torch.equal(net.bias, bias)
    scaler.scale(net(torch.ones(1, 3)).sum()).backward()
    assert train.optimizer_step(net, opt, scaler) is True
    assert scaler.get_scale() == 512.0 and torch.allclose(net.bias, bias - 0.1)


def test_optimizer_step_skips_non_finite_gradients():
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = [p.detach().clone() for p in net.parameters()]
    (net(torch.ones(1, 3)).sum() * float("inf")).backward()
    assert train.optimizer_step(net, opt, scaler) is False
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())  # the bad gradients are dropped
    net(torch.ones(1, 3)).sum().backward()
    assert train.optimizer_step(net, opt, scaler) is True
    assert torch.allclose(net.bias, before[1] - 0.1)  # d(sum)/d(bias) = 1 per output


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "data": make_dataset(root / "data", n=12), "cfg": tiny_model_yaml(root)}


def test_two_epoch_run_writes_every_file(tiny):
    project = tiny["root"] / "runs"
    args = tiny_run_args(tiny["data"], tiny["cfg"], project, "full", 2, "--val-raw", "--cos-lr", "--multi-scale",
                         "--label-smoothing", "0.1", "--save-period", "1", "--bf16")
    args.remove("--noplots")
    out = run_train(args)
    assert out.returncode == 0, out.stdout[-3000:]
    d = project / "full"
    for f in ("labels.jpg", "train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg", "results.png", "results.csv",
              "opt.yaml", "hyp.yaml", "weights/last.pt", "weights/best.pt", "weights/epoch0.pt", "weights/epoch1.pt"):
        assert (d / f).is_file(), f
    opt = yaml.safe_load((d / "opt.yaml").read_text())
    assert opt["cos_lr"] and opt["multi_scale"] and opt["label_smoothing"] == 0.1 and opt["epochs"] == 2
    assert yaml.safe_load((d / "hyp.yaml").read_text()) == train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    header = [h.strip() for h in (d / "results.csv").read_text().splitlines()[0].split(",")]
    assert header == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision",
                      "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss",
                      "val/cls_loss", "x/lr0", "x/lr1", "x/lr2", "raw/precision", "raw/recall", "raw/mAP_0.5",
                      "raw/mAP_0.5:0.95"]
    ckpt = torch.load(d / "weights" / "last.pt", weights_only=True)
    assert ckpt["format"] == "yolo-ema" and ckpt["names"] == ["c0", "c1"] and ckpt["nc"] == 2
    assert "resume" not in ckpt and "resume" not in torch.load(d / "weights" / "epoch0.pt", weights_only=True)
    assert ckpt["updates"] == 5  # accumulate 1 for ni 0-3, 2 at ni 4-5: steps at 0, 1, 2, 3, 5
    assert ckpt["train_state"]["ema_total_steps"] == 5  # the plan the EMA was given: these same steps
    assert "Validating" in out.stdout and "0G" in out.stdout  # final best.pt validation; CPU memory column
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(d), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["train_batch0", "train_batch1", "train_batch2"]
    first = events.Images("train_batch0")[0]
    assert first.encoded_image_string.startswith(b"\xff\xd8")  # JPEG, which TensorBoard serves as image/jpeg
    shown = cv2.imdecode(np.frombuffer(first.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert shown.shape[:2] == (first.height, first.width) and max(first.width, first.height) <= 640
    assert {"raw/mAP_0.5:0.95", "ema/updates", "ema/decay", "x/lr0"} <= set(events.Tags()["scalars"])


def test_tensorboard_ema_decay_counts_from_the_end_of_the_copies():
    """The logged decay is the ramp's at the steps averaged so far: the update_after_step copies do not count, in
    optimizer steps or (ema_unit images) in nominal batches of nbs images."""
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.9999, tau=2000, update_after_step=2)
    for _ in range(5):
        ema.update(model)
    assert train.ema_decay_now(ema) == pytest.approx(0.9999 * (1 - math.exp(-3 / 2000)), rel=1e-12)
    by_images = ModelEMA(model, decay=0.9, tau=10, update_after_step=1, unit="images", nbs=64)
    for _ in range(5):
        by_images.update(model, images=32)  # 160 images: 2.5 nominal batches, the third one begun
    assert train.ema_decay_now(by_images) == pytest.approx(0.9 * (1 - math.exp(-2 / 10)), rel=1e-12)


class InfAtCall(ComputeLoss):
    """ComputeLoss whose loss is infinite on the training calls listed in `bad` (counted from 0)."""
    bad: tuple = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, preds, targets):
        loss, items = super().__call__(preds, targets)
        if self.calls in self.bad:
            loss = loss * float("inf")
        self.calls += 1
        return loss, items


def test_ema_updates_equal_optimizer_steps_taken_with_a_bad_step(tiny, monkeypatch):
    """One epoch of 3 batches takes 3 steps (accumulate 1); an infinite loss at batch 1 must skip that
    optimizer step and its EMA update. Adam counts its steps per parameter: the independent witness.
    Also --weights, --freeze, --single-cls and --cache."""
    init = train.Model(str(tiny["cfg"]), nc=1, verbose=False)
    weights = tiny["root"] / "init.pt"
    sd = {k: v.detach().half() if v.is_floating_point() else v for k, v in init.state_dict().items()}
    save_checkpoint({"format": "yolo-ema", "version": 1, "yaml": init.yaml, "nc": 1, "names": ["item"],
                     "model": sd, "ema": None, "epoch": -1, "best_fitness": 0.0}, weights)
    monkeypatch.setattr(InfAtCall, "bad", (1,))
    monkeypatch.setattr(train, "ComputeLoss", InfAtCall)
    args = tiny_run_args(tiny["data"], "", tiny["root"] / "runs", "bad", 1, "--optimizer", "Adam", "--weights",
                         weights, "--freeze", "2", "--single-cls", "--cache", "ram", "--noval")
    with one_intra_op_thread():
        train.main(train.parse_opt(in_process_args(args)))
    ckpt = load_checkpoint(tiny["root"] / "runs" / "bad" / "weights" / "last.pt")
    adam_steps = {int(s["step"]) for s in unpacked_tree(ckpt["optimizer"])["state"].values()}
    assert adam_steps == {2} and ckpt["updates"] == 2  # 3 accumulation boundaries, 1 skipped
    assert all(torch.isfinite(v.float()).all() for v in ckpt["ema"].values())
    assert ckpt["nc"] == 1 and ckpt["names"] == ["item"]
    for k in ("model.0.conv.weight", "model.1.conv.weight", "model.1.bn.bias"):  # frozen: unchanged
        assert torch.equal(ckpt["model"][k], sd[k]), k
    assert not torch.equal(ckpt["model"]["model.2.cv1.conv.weight"], sd["model.2.cv1.conv.weight"])


def test_a_run_that_cannot_start_leaves_no_run_folder(tmp_path):
    from utils.data_config import DatasetError

    project = tmp_path / "runs"
    opt = train.parse_opt(["--data", str(tmp_path / "missing.yaml"), "--cfg", "yolov5n.yaml", "--project", str(project),
                           "--device", "cpu"])
    with pytest.raises(DatasetError, match="missing.yaml"):
        train.main(opt)
    assert not project.exists() or not any(project.iterdir())


def test_loaders_pin_memory_only_for_a_cuda_run(tiny, monkeypatch):
    """On a GPU machine, --device cpu must not pin memory (that opens a CUDA context on GPU 0)."""
    from utils.data_config import check_dataset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    opt = train.parse_opt(["--workers", "0", "--cache", "off"])  # not replayed: nothing is collated (pinned) here
    hyp = train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    data = check_dataset(str(tiny["data"]))
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda:0"), True)):
        train_loader, _, val_loader = train.build_loaders(opt, hyp, data, 64, 4, 32, train.Processes(), device)
        assert train_loader.pin_memory is pinned and val_loader.pin_memory is pinned, device


def test_cached_validation_batches_are_collated_at_set_up(tiny, monkeypatch):
    """A validation split cached in RAM is collated while the loaders are built (where workers fork from a still
    small process), so no validation builds a sample again."""
    from utils.data_config import check_dataset
    from utils.dataloaders import LoadImagesAndLabels

    opt = train.parse_opt(["--workers", "0", "--cache", "ram"])  # samples built in this process, where they are counted
    hyp = train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    _, _, val_loader = train.build_loaders(opt, hyp, check_dataset(str(tiny["data"])), 64, 4, 32, train.Processes(),
                                           torch.device("cpu"))
    built = []
    original = LoadImagesAndLabels.__getitem__
    monkeypatch.setattr(LoadImagesAndLabels, "__getitem__", lambda self, i: built.append(i) or original(self, i))
    batches = list(val_loader)
    assert isinstance(val_loader, train.ReplayLoader) and val_loader.loader is None  # its workers let go
    assert len(batches) == len(val_loader) == 2 and sum(len(b.paths) for b in batches) == 12 and not built


def test_an_image_damaged_during_the_run_is_named_once_and_trained_around(tmp_path, monkeypatch, caplog):
    """An image that turns unreadable after the label scan: the run warns once naming it, counts it in each epoch's
    log, trains on a substitute sample, and its validation leaves the image out and says so."""
    data = make_dataset(tmp_path / "data", n=8)
    victim = tmp_path / "data" / "images" / "train" / "im003.jpg"
    real = train.create_dataloader

    def create_then_damage(*args, **kwargs):
        loader = real(*args, **kwargs)
        if kwargs.get("prefix") == "val: ":  # after the training and validation scans accepted it
            victim.write_bytes(b"no longer a jpeg")
        return loader

    monkeypatch.setattr(train, "create_dataloader", create_then_damage)
    # --cache off: a RAM-cached image would never be read again (nothing to warn about)
    args = in_process_args(tiny_run_args(data, tiny_model_yaml(tmp_path), tmp_path / "runs", "damaged", 2,
                                         "--cache", "off"))
    with one_intra_op_thread(), caplog.at_level("INFO", logger="yolo"):
        assert train.cli(train.parse_opt(args)) == 0
    messages = [r.getMessage() for r in caplog.records]
    named = [m for m in messages if str(victim) in m and "substitute sample" in m]
    assert len(named) == 1, named  # once, not once per epoch or per worker
    assert sum(m.startswith("epoch 0: 1 image file(s) could not be read") for m in messages) == 1
    assert any(m.startswith("epoch 1: 1 image file(s) could not be read") for m in messages)
    assert any("metrics exclude 1 image" in m and str(victim) in m for m in messages)
    assert load_checkpoint(tmp_path / "runs" / "damaged" / "weights" / "last.pt")["epoch"] == 1


def test_compile_trains_saves_plain_keys_and_keeps_the_flat_ema(tiny, monkeypatch):
    """train.py --compile, with torch.compile's aot_eager backend standing in for inductor (whose C++ build takes
    minutes here): the run finishes, the checkpoint's keys are the model's own (no '_orig_mod.' prefix) and the EMA
    stayed on its flat path through the compiled wrapper."""
    real_compile = torch.compile
    compiled = []

    def aot_eager(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    emas = []
    real_make_ema = train.make_ema
    monkeypatch.setattr(train, "make_ema", lambda *a, **k: emas.append(real_make_ema(*a, **k)) or emas[-1])
    args = in_process_args(tiny_run_args(tiny["data"], tiny["cfg"], tiny["root"] / "runs", "compiled", 1, "--compile"))
    with one_intra_op_thread():
        assert train.cli(train.parse_opt(args)) == 0
    assert len(compiled) == 1 and emas[0].path == "flat" and emas[0].updates == 3
    ckpt = load_checkpoint(tiny["root"] / "runs" / "compiled" / "weights" / "last.pt")
    assert list(ckpt["model"]) == list(train.Model(str(tiny["cfg"]), nc=2, verbose=False).state_dict())


def test_tensorboard_images_are_the_jpeg_pictures_at_most_640_px(tmp_path):
    """A small picture goes in as its own file's bytes; a large one as a smaller JPEG of the same picture."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utils.tensorboard_log import TensorBoardLog

    rng = np.random.default_rng(0)
    small, large = tmp_path / "small.jpg", tmp_path / "large.jpg"
    cv2.imwrite(str(small), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    gradient = np.broadcast_to(np.linspace(0, 255, 1280, dtype=np.uint8)[None, :, None], (960, 1280, 3))
    cv2.imwrite(str(large), np.ascontiguousarray(gradient))
    log = TensorBoardLog(tmp_path / "tb")
    log.image("small", small)
    log.image("large", large)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    got_small, got_large = events.Images("small")[0], events.Images("large")[0]
    assert got_small.encoded_image_string == small.read_bytes() and (got_small.width, got_small.height) == (64, 48)
    assert (got_large.width, got_large.height) == (640, 480)
    shown = cv2.imdecode(np.frombuffer(got_large.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    expected = cv2.resize(cv2.imread(str(large)), (640, 480), interpolation=cv2.INTER_AREA)
    assert shown.shape == (480, 640, 3) and np.abs(shown.astype(int) - expected).mean() < 2  # the same picture


def test_the_next_epochs_batches_load_while_the_epoch_ends(tiny, monkeypatch):
    """When an epoch's validation and checkpoints begin, the loader's workers have already been started on the
    next epoch (none after the last); its batches are those the epoch would have drawn had it started them itself."""
    started_at_end = []
    real_end_epoch = train.end_epoch

    def end_epoch(run, epoch, mloss):
        started_at_end.append(None if run.started_batches is None else run.started_batches[0])
        if run.started_batches is not None:  # what the next epoch will train on, drawn by a fresh loader
            loader, _ = train.create_dataloader(
                run.data["train"], run.imgsz, run.batch_size, run.gs, hyp=run.hyp, augment=True,
                workers=0, shuffle=True, seed=run.opt.seed, nc=2)
            loader.set_epoch(epoch + 1)
            expected.append([b.imgs.clone() for b in loader])
        return real_end_epoch(run, epoch, mloss)

    expected, trained = [], []
    real_step_call = train.TrainStep.__call__

    def step(self, imgs, targets, ni, accumulate):
        trained.append(imgs.clone())
        return real_step_call(self, imgs, targets, ni, accumulate)

    monkeypatch.setattr(train, "end_epoch", end_epoch)
    monkeypatch.setattr(train.TrainStep, "__call__", step)
    args = tiny_run_args(tiny["data"], tiny["cfg"], tiny["root"] / "runs", "prefetch", 3, "--cache", "ram")
    args[args.index("--workers") + 1] = 2
    with one_intra_op_thread():
        train.main(train.parse_opt(in_process_args(args)))
    assert started_at_end == [1, 2, None]
    nb = len(trained) // 3
    for epoch, batches in enumerate(expected, start=1):
        got = trained[epoch * nb:(epoch + 1) * nb]
        assert len(batches) == nb, epoch
        assert all(torch.equal(g.mul(255).round().byte(), e) for g, e in zip(got, batches)), epoch
