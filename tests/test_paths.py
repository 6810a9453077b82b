"""Run-folder numbering and image-size rounding shared by train.py and val.py."""
from models.yolo import check_img_size
from utils.paths import increment_path


def test_increment_path_numbers_above_the_highest_in_use(tmp_path):
    assert increment_path(tmp_path / "exp") == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    assert increment_path(tmp_path / "exp") == tmp_path / "exp2"
    (tmp_path / "exp2").mkdir()
    (tmp_path / "exp7").mkdir()
    (tmp_path / "experiment").mkdir()  # shares the prefix but is not a numbered run
    assert increment_path(tmp_path / "exp") == tmp_path / "exp8"
    assert increment_path(tmp_path / "exp", exist_ok=True) == tmp_path / "exp"


def test_check_img_size_rounds_up_to_the_stride(caplog):
    assert check_img_size(640, 32) == 640
    assert not caplog.records
    assert check_img_size(650, 32) == 672
    assert check_img_size(8, 32) == 32
    assert "650 must be a multiple of the max stride 32; using 672" in caplog.text
