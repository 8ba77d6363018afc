"""ANN index builders, snapshots, publish/rollback and the snapshot client (see issue 3)."""

__all__: list[str] = []
