"""Google Cloud Storage access for library code (no Beam): a client and directory copies."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["download_gcs_dir", "gcs_client", "is_gcs", "split_gcs_uri"]

log = logging.getLogger(__name__)


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b` → (`bucket`, `a/b`)."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, path = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URI without a bucket: {uri!r}")
    return bucket, path


def gcs_client():
    """A storage client; anonymous against an emulator (`STORAGE_EMULATOR_HOST`)."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client.create_anonymous_client()
    return storage.Client()


def download_gcs_dir(uri: str, cache_root: str | Path) -> Path:
    """Copy every object under a gs:// prefix into a local cache directory.

    The cache key covers each object's name and generation, so a re-uploaded
    checkpoint under the same URI is fetched again; an unchanged one is not.
    The copy lands in a temporary directory and is renamed into place whole.

    Raises:
        FileNotFoundError: nothing under the prefix.
    """
    bucket_name, prefix = split_gcs_uri(uri.rstrip("/"))
    prefix = f"{prefix}/" if prefix else ""
    client = gcs_client()
    blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
    if not blobs:
        raise FileNotFoundError(f"no objects under {uri}")
    key = hashlib.sha256()
    for blob in sorted(blobs, key=lambda b: b.name):
        key.update(f"{blob.name}\0{blob.generation}\0".encode())
    target = Path(cache_root) / key.hexdigest()[:24]
    if target.is_dir():
        log.info("using cached copy of %s at %s", uri, target)
        return target
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".download-"))
    try:
        for blob in blobs:
            relative = blob.name[len(prefix) :]
            local = (staging / relative).resolve()
            if staging.resolve() not in local.parents:
                raise ValueError(f"object name escapes its directory: {blob.name!r}")
            local.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(local))
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # a concurrent download may have won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("copied %d objects from %s to %s", len(blobs), uri, target)
    return target
