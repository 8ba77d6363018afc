import pytest

from training import TrainConfig


def _config(demo_catalog, tiny_model, out, **overrides) -> TrainConfig:
    """Seconds per run: 100 items at 64 px, 16 pairs a batch, no worker processes."""
    options = dict(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(out), epochs=2, batch_size=16,
                   lr=1e-3, val_fraction=0.15, checkpoint_every=3, log_every=1, workers=0,
                   warmup_fraction=0.2)  # fmt: skip
    return TrainConfig(**{**options, **overrides})


@pytest.fixture
def train_config(demo_catalog, tiny_model, tmp_path):
    def make(**overrides) -> TrainConfig:
        return _config(demo_catalog, tiny_model, **{"out": tmp_path / "train", **overrides})

    return make


@pytest.fixture(scope="session")
def uninterrupted(demo_catalog, tiny_model, tmp_path_factory):
    """`train_config()`'s run from start to end, which stopped and resumed runs must equal bit for bit."""
    from training import train

    return train(_config(demo_catalog, tiny_model, tmp_path_factory.mktemp("whole")))
