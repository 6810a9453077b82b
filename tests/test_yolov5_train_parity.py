"""bench/yolov5_train_parity.py's instruments: its float64 mode reaches every float32 our trainer names on purpose,
and its comparison reads relative differences as it says (YOLOv5 itself is not needed)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("yolov5_train_parity", ROOT / "bench" / "yolov5_train_parity.py")
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)

# In a process of its own: the float64 mode changes torch's global state.
FLOAT64_PROBE = """
import sys
sys.path.insert(0, {root!r})
exec({float64!r})
import torch, models.yolo, utils.loss, utils.ema
float64_torch_for(utils.loss, utils.ema, models.yolo)
model = models.yolo.Model('yolov5n.yaml', nc=3, verbose=False).float()
model.hyp = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0)
imgs = torch.zeros(2, 3, 64, 64, dtype=torch.uint8).float() / 255
preds = model(imgs)
targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]], dtype=torch.float32)
loss, items = utils.loss.ComputeLoss(model)(preds, targets)
ema = utils.ema.ModelEMA(model)
print(imgs.dtype, preds[0].dtype, model.model[-1].anchors.dtype, loss.dtype, items.dtype,
      ema.ema.model[0].conv.weight.dtype, torch.zeros(1).dtype)
"""


def test_float64_mode_leaves_no_float32_in_our_model_loss_and_ema():
    script = FLOAT64_PROBE.format(root=str(ROOT), float64=parity.FLOAT64)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.float64"] * 7


def test_rel_diff_of_fingerprints_and_lists():
    theirs = {"a": [3.0, 4.0], "b": [0.0, 0.0]}
    ours = {"a": [3.0, 4.0], "b": [0.3, 0.4]}
    d, where = parity.rel_diff(ours, theirs)
    assert d == pytest.approx(0.5 / 5.0)  # ||(0, 0, .3, .4)|| / ||(3, 4, 0, 0)||
    assert "b" in where
    assert parity.rel_diff([1.0, 2.0], [1.0, 2.5])[0] == pytest.approx(0.2)


def test_growth_table_puts_both_comparisons_side_by_side_every_fifth_iteration():
    def record(x):
        return {"loss": [x], "grads": {"g": [x]}, "weights": {"w": [x]}, "ema": {"e": [x]}}
    theirs = [record(1.0) for _ in range(11)]
    ours = [record(1.0 + 10.0 ** (i - 12)) for i in range(11)]
    other = [record(1.0 + 2 * 10.0 ** (i - 12)) for i in range(11)]
    rows = parity.growth_table(ours, theirs, other)[3:]
    assert [r.split(" | ")[0] for r in rows] == ["0", "5", "10"]
    cells = rows[2].split(" | ")[1:]
    assert [float(c) for c in cells[:2]] == pytest.approx([1e-2, 1e-2 / (1 + 2e-2)], rel=0.05)
