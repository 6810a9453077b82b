"""SWA for detectors (swa.py, utils/swa.py): the cyclical learning rate of every iteration, the uniform average of
the extra epochs' checkpoints, and BatchNorm statistics measured again for the average."""
import csv
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml

import swa
from tests.train_helpers import ROOT, make_dataset, run_train, tiny_model_yaml, tiny_run_args, train_env
from utils.bn_recompute import FixedBatches, recompute_bn_stats
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.swa import UniformAverage, cyclic_lr_factor

N_IMAGES, BATCH, SWA_EPOCHS = 12, 4, 3
NB = N_IMAGES // BATCH


def test_cyclic_lr_starts_each_epoch_at_the_base_and_ends_at_the_ratio():
    # cos: ratio + (1 - ratio) (1 + cos(pi t)) / 2 with t = i / (nb - 1); by hand for nb = 5, ratio 0.01
    cos = [cyclic_lr_factor(i, 5, 0.01, "cos") for i in range(5)]
    h = math.sqrt(0.5)
    assert cos == pytest.approx([1.0, 0.01 + 0.99 * (1 + h) / 2, 0.505, 0.01 + 0.99 * (1 - h) / 2, 0.01], abs=1e-12)
    assert [cyclic_lr_factor(i, 5, 0.01, "linear") for i in range(5)] == pytest.approx(
        [1.0, 0.7525, 0.505, 0.2575, 0.01], abs=1e-12)
    assert cyclic_lr_factor(0, 1) == 1.0  # an epoch of one iteration stays at the base
    with pytest.raises(ValueError, match="SWA iteration 5 outside an epoch of 5"):
        cyclic_lr_factor(5, 5)
    with pytest.raises(ValueError, match="SWA anneal must be one of"):
        cyclic_lr_factor(0, 5, anneal="step")


def test_uniform_average_is_the_mean_of_the_models():
    nets = []
    for seed in range(4):
        torch.manual_seed(seed)
        nets.append(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    average = UniformAverage()
    for net in nets:
        average.add(net)
    assert average.count == 4
    for name, p in average.module.named_parameters():
        mean = torch.stack([dict(n.named_parameters())[name].detach() for n in nets]).mean(0)
        assert torch.allclose(p, mean, rtol=1e-6, atol=1e-7), name


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("swa")
    data, cfg = make_dataset(root / "data", n=N_IMAGES), tiny_model_yaml(root)
    hyp = root / "hyp.yaml"  # nbs = batch: one optimizer step per batch, as the bench's recipes; companions kept
    base = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-low.yaml").read_text())
    hyp.write_text(yaml.safe_dump({**base, "nbs": BATCH, "ema_companion_taus": [200]}))
    out = run_train(tiny_run_args(data, cfg, root / "runs", "run", 2, "--hyp", hyp))
    assert out.returncode == 0, out.stdout[-3000:]
    last = root / "runs" / "run" / "weights" / "last.pt"
    cmd = [sys.executable, str(ROOT / "swa.py"), "--weights", str(last), "--epochs", str(SWA_EPOCHS), "--lr0", "0.02",
           "--bn-batches", "2", "--project", str(root / "runs"), "--name", "swa", "--device", "cpu"]
    out = subprocess.run(cmd, env=train_env(), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    return {"root": root, "data": data, "last": last, "swa": root / "runs" / "swa", "stdout": out.stdout}


def test_every_iteration_follows_the_cyclical_rule(swa_run):
    rows = list(csv.DictReader(open(swa_run["swa"] / "swa_lr.csv")))
    assert [(int(r["epoch"]), int(r["iteration"])) for r in rows] == [(k, i) for k in range(SWA_EPOCHS)
                                                                     for i in range(NB)]
    expected = [0.02 * (0.01 + 0.99 * (1 + math.cos(math.pi * i / (NB - 1))) / 2) for _ in range(SWA_EPOCHS)
                for i in range(NB)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-12)
    assert [float(r["lr"]) for r in rows[:NB]] == pytest.approx([0.02, 0.0101, 0.0002])


def test_swa_is_the_mean_of_the_epoch_checkpoints_with_batchnorm_recomputed(swa_run):
    weights = swa_run["swa"] / "weights"
    epochs = [load_checkpoint(weights / f"epoch{k}.pt") for k in range(SWA_EPOCHS)]
    averaged = load_checkpoint(weights / "swa.pt")
    run = load_checkpoint(swa_run["last"])
    assert averaged["swa"]["averaged"] == SWA_EPOCHS and averaged["swa"]["run_epochs"] == 2
    assert averaged["updates"] == SWA_EPOCHS * NB  # nbs = batch: a step per batch
    assert [c["epoch"] for c in epochs] == [2, 3, 4] and all(c["ema"] is None for c in epochs)
    # The extra epochs trained: each checkpoint differs from the run's raw model and from the one before.
    w = "model.0.conv.weight"
    assert not torch.equal(epochs[0]["model"][w], run["model"][w])
    assert not torch.equal(epochs[1]["model"][w], epochs[0]["model"][w])
    bn_names = {k for k in averaged["model"] if k.endswith(("running_mean", "running_var"))}
    assert bn_names
    for name, value in averaged["model"].items():
        if not value.is_floating_point() or name in bn_names or name.endswith("anchors"):
            continue
        mean = torch.stack([c["model"][name].float() for c in epochs]).mean(0)
        # the FP32 average of the FP32 weights, stored in FP16; each FP16 checkpoint is off by half an ulp at most
        tol = (mean.abs() * 2.0 ** -10 + 2.0 ** -24).max().item()
        assert (value.float() - mean).abs().max().item() <= tol, name
    assert torch.equal(averaged["ema"][w], averaged["model"][w])  # val.py and the bench read 'ema'
    # BatchNorm statistics: those the averaged weights give on the training batches, not the average of the
    # checkpoints' statistics.
    model = model_from_checkpoint(averaged)
    batches = FixedBatches.from_data(str(swa_run["data"].parent / "images" / "train"), 64, BATCH, 32, 2,
                                     run["hyp"], seed=0)
    recompute_bn_stats(model, batches)
    rm = "model.0.bn.running_mean"
    averaged_stats = torch.stack([c["model"][rm].float() for c in epochs]).mean(0)
    assert torch.allclose(averaged["model"][rm].float(), model.state_dict()[rm], rtol=2e-3, atol=1e-3)
    assert not torch.allclose(averaged["model"][rm].float(), averaged_stats, rtol=2e-3, atol=1e-3)


def test_bad_input_is_one_line_before_anything_is_written(swa_run, tmp_path, caplog):
    assert swa.main(["--weights", str(swa_run["last"]), "--epochs", "0", "--project", str(tmp_path)]) == 1
    assert "swa: --epochs must be at least 1, got 0" in caplog.text
    (tmp_path / "x.pt").write_text("no checkpoint")
    assert swa.main(["--weights", str(tmp_path / "x.pt"), "--project", str(tmp_path)]) == 1
    assert "swa: " in caplog.text and "x.pt" in caplog.text and "Traceback" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
