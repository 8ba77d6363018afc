import pytest

from training import TrainConfig


@pytest.fixture
def train_config(demo_catalog, tiny_model, tmp_path):
    """Seconds per run: 100 items at 64 px, 16 pairs a batch, no worker processes."""

    def make(**overrides) -> TrainConfig:
        options = dict(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path / "train"),
                       epochs=2, batch_size=16, lr=1e-3, val_fraction=0.15, checkpoint_every=3, log_every=1,
                       workers=0, warmup_fraction=0.2)  # fmt: skip
        return TrainConfig(**{**options, **overrides})

    return make
