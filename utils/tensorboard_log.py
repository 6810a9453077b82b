"""A training run's TensorBoard record: per-epoch scalars and the first training mosaics, in the run folder.

`tensorboard --logdir runs/train` shows every run. The global step of every scalar is the epoch, so a resumed
run opens its writer with ``purge_step`` at the epoch it restarts from: TensorBoard then discards what the
interrupted process wrote for that epoch and later ones, and the curves continue without duplicates.
"""
from __future__ import annotations

from pathlib import Path

import cv2

from utils.log import LOGGER

IMAGE_SIDE = 640  # longest side of an image summary, in pixels


class TensorBoardLog:
    """Write scalars and images for one run (rank 0 only); each epoch's record is flushed at once."""

    def __init__(self, log_dir: str | Path, start_epoch: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package: only when used
        except ImportError as e:
            raise ImportError(f"TensorBoard logging needs the tensorboard package ({e}); pip install tensorboard, "
                              "or train with --no-tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_epoch if start_epoch > 0 else None)
        LOGGER.info(f"TensorBoard: tensorboard --logdir {Path(log_dir).parent} (then http://localhost:6006/)")

    def scalars(self, epoch: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()

    def image(self, tag: str, file: str | Path, epoch: int = 0) -> None:
        """A saved JPEG picture (e.g. train_batch0.jpg) as an image summary, written out with the next scalars().

        The summary holds JPEG bytes, which TensorBoard shows as it shows PNG: the file's own bytes when it is small
        enough, else a re-encoded smaller copy. add_image() would encode a PNG, which took 0.1 s a mosaic here."""
        from tensorboard.compat.proto.summary_pb2 import Summary  # loaded with the writer already

        im = cv2.imread(str(file))
        if im is None:
            LOGGER.warning(f"TensorBoard: {file} could not be read; not logged")
            return
        height, width = im.shape[:2]
        scale = IMAGE_SIDE / max(height, width)
        if scale < 1:
            width, height = round(width * scale), round(height * scale)
            im = cv2.resize(im, (width, height), interpolation=cv2.INTER_AREA)
            encoded = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        else:
            encoded = Path(file).read_bytes()
        picture = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encoded)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=picture)]), epoch)

    def close(self) -> None:
        self.writer.close()
