"""Model zoo: YOLOv5 parameter counts and state-dict layout, Detect decoding, fuse, bias priors, configs."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import yaml

from models.common import Conv
from models.yolo import Detect, Model, resolve_cfg, size_multiple
from utils.torch_utils import count_parameters

YOLOV5_PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}
YAML_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


@pytest.fixture(scope="module")
def yolov5n():
    torch.manual_seed(0)
    return Model("yolov5n.yaml", nc=80, verbose=False).eval()


@pytest.mark.parametrize("size", list(YOLOV5_PARAMS))
def test_parameter_count_equals_yolov5(size):
    model = Model(f"models/yolov5{size}.yaml", ch=3, nc=80, verbose=False)
    assert count_parameters(model) == YOLOV5_PARAMS[size]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_yolov5s_640_eval_and_train_shapes():
    model = Model("yolov5s", verbose=False).eval()
    with torch.no_grad():
        pred, raw = model(torch.zeros(1, 3, 640, 640))
    assert pred.shape == (1, 25200, 85)  # 3 anchors x (80^2 + 40^2 + 20^2) cells
    assert [tuple(r.shape) for r in raw] == [(1, 3, 80, 80, 85), (1, 3, 40, 40, 85), (1, 3, 20, 20, 85)]
    model.train()
    out = model(torch.zeros(2, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 3, 8, 12, 85), (2, 3, 4, 6, 85), (2, 3, 2, 3, 85)]


def test_state_dict_uses_yolov5_names_and_shapes():
    sd = Model("yolov5s.yaml", verbose=False).state_dict()
    # Keys and shapes as in the published yolov5s.pt (v6+).
    expected = {
        "model.0.conv.weight": (32, 3, 6, 6),
        "model.0.bn.running_var": (32,),
        "model.2.m.0.cv1.conv.weight": (32, 32, 1, 1),
        "model.4.m.1.cv2.conv.weight": (64, 64, 3, 3),
        "model.6.m.2.cv2.bn.running_mean": (128,),
        "model.8.cv3.conv.weight": (512, 512, 1, 1),
        "model.9.cv1.conv.weight": (256, 512, 1, 1),
        "model.9.cv2.conv.weight": (512, 1024, 1, 1),
        "model.13.cv1.conv.weight": (128, 512, 1, 1),
        "model.23.m.0.cv2.conv.weight": (256, 256, 3, 3),
        "model.24.anchors": (3, 3, 2),
        "model.24.m.0.weight": (255, 128, 1, 1),
        "model.24.m.1.bias": (255,),
        "model.24.m.2.weight": (255, 512, 1, 1),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any("grid" in k for k in sd), "grid caches must not be saved"
    # anchors are stored in grid units: pixels / stride
    want = torch.tensor(YAML_ANCHORS, dtype=torch.float32).view(3, 3, 2) / torch.tensor([8.0, 16, 32]).view(3, 1, 1)
    assert torch.equal(sd["model.24.anchors"], want)


def test_state_dict_round_trip_reproduces_outputs(yolov5n):
    other = Model("yolov5n.yaml", verbose=False).eval()
    other.load_state_dict(yolov5n.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(other(x)[0], yolov5n(x)[0])


def test_decode_with_zero_weights_gives_cell_centres_and_anchor_sizes():
    """All-zero head logits decode to each cell's centre with the anchor's size and 0.5 scores."""
    model = Model("yolov5n.yaml", nc=2, verbose=False).eval()
    detect = model.model[-1]
    with torch.no_grad():
        for conv in detect.m:
            conv.weight.zero_()
            conv.bias.zero_()
        h, w = 64, 96
        pred, _ = model(torch.rand(1, 3, h, w))
    rows = []
    for level, s in enumerate((8, 16, 32)):
        for a in range(3):
            aw, ah = YAML_ANCHORS[level][2 * a], YAML_ANCHORS[level][2 * a + 1]
            for gy in range(h // s):
                for gx in range(w // s):
                    rows.append([(gx + 0.5) * s, (gy + 0.5) * s, aw, ah, 0.5, 0.5, 0.5])
    assert torch.allclose(pred[0], torch.tensor(rows), atol=1e-4)


def test_decode_writes_the_same_values_as_the_exporters_concatenation(yolov5n):
    """decode() writes the boxes into the sigmoid's output (no autograd) or into its copy (autograd); exporters get
    the plain concatenation. All three give the same values bit for bit, and the two differentiable ones the same
    gradients; the raw maps are left untouched."""
    detect = yolov5n.model[-1]
    torch.manual_seed(0)
    raw = [torch.randn(2, detect.na, s, s, detect.no) for s in (8, 4, 2)]
    kept = [r.clone() for r in raw]
    with torch.no_grad():
        in_place = detect.decode(raw)
    leaves = {mode: [r.clone().requires_grad_() for r in raw] for mode in ("copy", "export")}
    detect.export = True
    try:
        exported = detect.decode(leaves["export"])
    finally:
        detect.export = False
    copied = detect.decode(leaves["copy"])
    assert torch.equal(in_place, exported.detach()) and torch.equal(copied.detach(), exported.detach())
    assert all(torch.equal(r, k) for r, k in zip(raw, kept))
    weights = torch.rand_like(copied)
    (copied * weights).sum().backward()
    (exported * weights).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(leaves["copy"], leaves["export"]))


def test_grid_cache_rebuilds_on_new_shape(yolov5n):
    x_small, x_big = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        a = yolov5n(x_small)[0]
        b = yolov5n(x_big)[0]
        a2 = yolov5n(x_small)[0]
        fresh = copy.deepcopy(yolov5n)
        fresh.model[-1]._grids.clear()
        b2 = fresh(x_big)[0]
    assert b.shape[1] == 3 * (12 * 16 + 6 * 8 + 3 * 4)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert b[0, :, 0].max() > 64  # x centres reach beyond the small image: the grid was rebuilt
    # a device change rebuilds the cached grid on the new device ('meta' stands in for a GPU here)
    on_meta = copy.deepcopy(yolov5n).to("meta")
    with torch.no_grad():
        assert on_meta(x_small.to("meta"))[0].device.type == "meta"
    assert on_meta.model[-1]._grids[0][1].device.type == "meta"


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_fuse_keeps_eval_output_and_removes_batchnorm():
    model = Model("yolov5n.yaml", verbose=False).eval()
    with torch.no_grad():
        _randomise_bn(model)
        x = torch.rand(1, 3, 64, 64)
        ref = model(x)[0]
        fused = copy.deepcopy(model).fuse()
        out = fused(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "fuse of a copy touched the original"
    assert count_parameters(fused) < count_parameters(model)
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3)


def test_fused_summary_counts_the_fused_layers_and_no_gradients(caplog):
    """After fusing, the summary describes the fused model, as YOLOv5's does: each BatchNorm folded away is one
    layer fewer, and an inference model has no parameter that needs a gradient (yolov5n: 1,867,405 parameters,
    YOLOv5's own fused figure)."""
    model = Model("yolov5n.yaml", nc=80, verbose=False).eval()
    layers = len(list(model.modules()))
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert batchnorms == 57
    with caplog.at_level("INFO", logger="yolo"):
        model.fuse()
    summary = next(r.getMessage() for r in caplog.records if "summary:" in r.getMessage())
    assert summary.startswith(f"yolov5n summary: {layers - batchnorms} layers, 1,867,405 parameters, 0 gradients, ")


def test_conv_fuse_closed_form():
    conv = Conv(2, 1, 1, 1).eval()
    with torch.no_grad():
        conv.conv.weight.fill_(2.0)
        conv.bn.running_mean.fill_(1.0)
        conv.bn.running_var.fill_(4.0 - conv.bn.eps)  # std exactly 2
        conv.bn.weight.fill_(3.0)
        conv.bn.bias.fill_(0.5)
        conv.fuse()
    # y = 3 * (2*x0 + 2*x1 - 1) / 2 + 0.5 = 3*x0 + 3*x1 - 1
    assert torch.allclose(conv.conv.weight.flatten(), torch.tensor([3.0, 3.0]))
    assert torch.allclose(conv.conv.bias, torch.tensor([-1.0]))


def test_channels_last_half_and_autocast(yolov5n):
    x = torch.rand(1, 3, 32, 32)  # half-precision convs are slow on CPU: keep it tiny
    with torch.no_grad():
        ref = yolov5n(x)[0]
        cl = copy.deepcopy(yolov5n).to(memory_format=torch.channels_last)
        out_cl = cl(x.contiguous(memory_format=torch.channels_last))[0]
        out_half = copy.deepcopy(yolov5n).half()(x.half())[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ac = yolov5n(x)[0]
    assert torch.allclose(out_cl, ref, atol=1e-3)
    # decoded boxes stay float32 whatever the compute precision; coordinates within a pixel or two
    assert out_half.dtype == torch.float32 and out_ac.dtype == torch.float32
    assert (out_half - ref)[..., :4].abs().max() < 1.0
    assert (out_ac - ref)[..., :4].abs().max() < 2.0


def test_bias_priors_closed_form():
    model = Model("yolov5n.yaml", nc=4, verbose=False)
    detect = model.model[-1]
    for conv, s in zip(detect.m, (8, 16, 32)):
        b = conv.bias.detach().view(3, 9)
        assert torch.allclose(b[:, 4], torch.full((3,), math.log(8 / (640 / s) ** 2)))
        assert torch.allclose(b[:, 5:], torch.full((3, 4), math.log(0.6 / (4 - 0.99999))))
    box_before = [conv.bias.detach().view(3, 9)[:, :4].clone() for conv in detect.m]
    cf = torch.tensor([10.0, 30.0, 60.0, 0.0])  # unseen class counts as 1
    model._initialize_biases(cf)
    want = torch.log(torch.tensor([10.0, 30.0, 60.0, 1.0]) / 101.0)
    for conv, s, box in zip(detect.m, (8, 16, 32), box_before):
        b = conv.bias.detach().view(3, 9)
        assert torch.allclose(b[:, 5:], want.expand(3, 4))
        assert torch.allclose(b[:, 4], torch.full((3,), math.log(8 / (640 / s) ** 2)))
        assert torch.equal(b[:, :4], box)  # box biases keep their init
    with pytest.raises(ValueError, match="nc=4"):
        model._initialize_biases(torch.ones(3))


def test_overrides_attributes_and_placeholder_anchors(caplog):
    with caplog.at_level("INFO", logger="yolo"):
        model = Model("yolov5n.yaml", nc=3, anchors=2, verbose=False)
    assert "nc=80 with nc=3" in caplog.text
    detect = model.model[-1]
    assert isinstance(detect, Detect) and detect.na == 2 and detect.nc == 3 and detect.no == 8
    assert detect.m[0].weight.shape[0] == 2 * 8
    assert model.nc == 3 and model.names == ["0", "1", "2"] and model.yaml["nc"] == 3
    assert model.hyp == {} and model.class_weights is None


def test_user_yaml_path_and_resolution(tmp_path):
    cfg = yaml.safe_load(resolve_cfg("yolov5n").read_text())
    assert resolve_cfg("yolov5n") == resolve_cfg("yolov5n.yaml") == resolve_cfg("models/yolov5n.yaml")
    cfg["nc"], cfg["width_multiple"] = 5, 0.125
    user = tmp_path / "my-net.yaml"
    user.write_text(yaml.safe_dump(cfg))
    model = Model(str(user), verbose=False)
    assert model.nc == 5 and model.yaml_file == "my-net.yaml"
    assert model.model[0].conv.weight.shape == (8, 3, 6, 6)  # 64 * 0.125
    dict_model = Model(cfg, verbose=False)
    assert count_parameters(dict_model) == count_parameters(model)
    assert cfg["nc"] == 5 and "ch" not in cfg, "the caller's dict must not be modified"

    with pytest.raises(FileNotFoundError, match="searched"):
        resolve_cfg(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="searched"):  # a mistyped folder never falls back to the zoo
        resolve_cfg("no-such-folder/yolov5n.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "head"}))
    with pytest.raises(ValueError, match="missing key 'head'"):
        Model(str(bad), verbose=False)
    cfg["backbone"][0][2] = "NoSuchModule"
    with pytest.raises(ValueError, match="unknown module 'NoSuchModule'"):
        Model(cfg, verbose=False)


def test_test_time_augmentation_count(yolov5n):
    with torch.no_grad():
        pred, _ = yolov5n(torch.rand(1, 3, 64, 64), augment=True)
    # full size without P5 (3*(64+16)); 0.83x -> padded back to 64 (all 3*84); 0.67x -> 43 px padded to 64,
    # without P3 (3*(16+4))
    assert pred.shape == (1, 3 * 80 + 3 * 84 + 3 * 20, 85)


def test_test_time_augmentation_maps_boxes_back_to_the_input():
    """With all-zero head logits every pass predicts its cells' centres at anchor size; TTA must divide by
    each pass's scale and mirror x for the flipped pass."""
    model = Model("yolov5n.yaml", nc=1, verbose=False).eval()
    with torch.no_grad():
        for conv in model.model[-1].m:
            conv.weight.zero_()
            conv.bias.zero_()
        pred, _ = model(torch.rand(1, 3, 64, 64), augment=True)
    want = []
    for scale, flip, levels in ((1.0, False, (0, 1)), (0.83, True, (0, 1, 2)), (0.67, False, (1, 2))):
        for level in levels:
            s = (8, 16, 32)[level]
            for a in range(3):
                aw, ah = YAML_ANCHORS[level][2 * a:2 * a + 2]
                for gy in range(64 // s):
                    for gx in range(64 // s):
                        x, y = (gx + 0.5) * s / scale, (gy + 0.5) * s / scale
                        want.append([64 - x if flip else x, y, aw / scale, ah / scale])
    assert torch.allclose(pred[0, :, :4], torch.tensor(want), atol=1e-3)


def test_batchnorm_layer_passes_on_the_channels_of_its_input():
    cfg = {"nc": 1, "anchors": [[10, 13, 16, 30, 33, 23]],
           "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                        [0, 1, "nn.BatchNorm2d", []],  # normalises layer 0's 16 channels, not layer 1's 32
                        [-1, 1, "Conv", [24, 3, 2]]],
           "head": [[[-1], 1, "Detect", ["nc", "anchors"]]]}
    model = Model(cfg, verbose=False)
    assert model.model[3].conv.weight.shape == (24, 16, 3, 3)
    assert model.stride.tolist() == [4.0]


def _strided_cfg(levels: int, detect_from: list[int]) -> dict:
    """A tiny model: `levels` stride-2 convs, detecting on the outputs of the layers listed."""
    return {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
            "anchors": [[10, 13, 16, 30, 33, 23]] * len(detect_from),
            "backbone": [[-1, 1, "Conv", [8, 3, 2]] for _ in range(levels)],
            "head": [[detect_from, 1, "Detect", ["nc", "anchors"]]]}


@pytest.mark.parametrize("levels, detect_from, strides, multiple", [
    (3, [2], [8], 32),  # a P3-only model still gets YOLOv5's floor of 32
    (6, [4, 5], [32, 64], 64),  # a P6 level raises it
])
def test_size_multiple_is_the_largest_stride_but_at_least_32(levels, detect_from, strides, multiple):
    model = Model(_strided_cfg(levels, detect_from), verbose=False)
    assert model.stride.tolist() == strides
    assert size_multiple(model) == multiple
