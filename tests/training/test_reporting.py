import math

import numpy as np
import pytest
from PIL import Image

from training.config import TrainConfig
from training.plot import draw_loss_curve
from training.validate import pair_metrics


def test_recall_counts_an_identical_title_as_right():
    images = np.eye(3, dtype=np.float32)
    texts = np.eye(3, dtype=np.float32)[[0, 2, 1]]  # items 1 and 2 retrieve each other's title
    assert pair_metrics(images, texts, ["a", "b", "c"], math.log(10), -10)["val_recall_at_1"] == pytest.approx(1 / 3)
    assert pair_metrics(images, texts, ["a", "b", "b"], math.log(10), -10)["val_recall_at_1"] == 1.0


def test_loss_curve_is_a_png_and_ignores_non_finite_points(tmp_path):
    path = draw_loss_curve([(1, 5.0), (2, 4.0), (3, float("nan")), (4, 3.0)], [(2, 4.5)], tmp_path / "c.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (900, 500)
    assert len(set(image.getdata())) > 3  # axes, the line, the dots — not a blank canvas
    draw_loss_curve([], [], tmp_path / "empty.png")  # a run killed before its first log still gets a chart


@pytest.mark.parametrize(
    "field, value, message",
    [("batch_size", 1, "batch_size must be >= 2"), ("val_fraction", 1.0, "val_fraction must be in"),
     ("precision", "fp8", "precision must be auto, fp32 or bf16"), ("device", "tpu", "device must be")],
)  # fmt: skip
def test_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(catalog="c.parquet", model="m", out="o", **{field: value})
