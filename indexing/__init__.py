"""ANN index snapshots: builders (FAISS, ScaNN), measured recall, publish/rollback, the client, the HTTP service."""

from indexing.client import Neighbor, SnapshotClient, UnknownItem
from indexing.embeddings import EmbeddingsError, open_embeddings
from indexing.publish import list_snapshots, publish, read_latest, retain, rollback
from indexing.snapshot import SnapshotError, build_snapshot, verify_snapshot
from indexing.spec import IndexConfig, choose_index, parse_size

__all__ = [
    "EmbeddingsError",
    "IndexConfig",
    "Neighbor",
    "SnapshotClient",
    "SnapshotError",
    "UnknownItem",
    "build_snapshot",
    "choose_index",
    "list_snapshots",
    "open_embeddings",
    "parse_size",
    "publish",
    "read_latest",
    "retain",
    "rollback",
    "verify_snapshot",
]
