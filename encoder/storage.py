"""Object storage for library code (no Beam): local paths and gs:// behind one small API.

The innermost package owns it so that `encoder` and `indexing` share one
implementation. Transient errors (throttling, 5xx, dropped connections) are
retried with exponential backoff and full jitter within a bounded time;
permanent ones (not found, forbidden) raise at once.

`read_versioned` / `write_if_version` give compare-and-swap on a single object:
on gs:// through generation-match preconditions, locally through a lock file
around the read-modify-write. Whole-object writes are atomic in both places
(local: temp file + rename; gs://: an upload becomes visible only when complete).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import fnmatch
import glob as globbing
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from encoder.throttled import Throttled

__all__ = [
    "arrow_input",
    "cache_dir",
    "ConcurrentUpdate",
    "contained",
    "delete",
    "delete_tree",
    "describe_error",
    "download_file",
    "download_gcs_dir",
    "download_tree",
    "exists",
    "files_under",
    "gcs_client",
    "is_gcs",
    "is_not_found",
    "is_transient",
    "is_web",
    "join",
    "list_children",
    "newest_change",
    "objects_under",
    "local_lock",
    "parent_dir",
    "read_bytes",
    "reads_itself",
    "read_versioned",
    "resolve",
    "resolve_all",
    "sha256_file",
    "split_gcs_uri",
    "upload_file",
    "upload_folder",
    "with_retries",
    "write_bytes",
    "write_if_version",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


CACHE_ENV = "LOOKALIKE_CACHE"  # where the local caches go; default ~/.cache/lookalike


def cache_dir(kind: str) -> str:
    """This machine's cache of one `kind` (`models`: checkpoints from gs:// and their versions; `snapshots`: indexes
    served or checked): under `$LOOKALIKE_CACHE`, else `~/.cache/lookalike`. Read when asked, not at import, so a
    process (or a test session) may point it elsewhere."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lookalike")
    return os.path.join(root, kind)


class ConcurrentUpdate(RuntimeError):
    """Someone else changed the object between our read and our write."""


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def check_location(uri: str, what: str) -> None:
    """lookalike's own files (embed runs, snapshots, reports, checkpoints) are in a local folder or on gs://. Another
    scheme's URI was taken for a local path (`s3://b/x` wrote `./s3:/b/x`) or failed deep inside a run."""
    if "://" in uri and not is_gcs(uri):
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"{what} {uri}: lookalike keeps its files in a local folder or on gs://, not {scheme}://")


def _readable_here(uri: str) -> None:
    """A scheme this module does not read (`s3://`, `hdfs://`) was taken for a local path: "does not exist" for an
    object that may well exist. Said as it is instead (`file://` aside: a path of this machine)."""
    if "://" in uri and not reads_itself(uri) and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"{uri}: lookalike reads local paths, gs:// and http(s):// here, not {scheme}://")


def check_folder(uri: str, what: str) -> None:
    """Refuse a local output folder that a file stands in the way of, before any work rather than at the first write
    after it (an object store has no folders to be in the way), and another scheme's URI. Creates nothing."""
    check_location(uri, what)
    if is_gcs(uri):
        return
    path = os.path.abspath(uri)
    while not os.path.exists(path):  # (ends at the root folder)
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {uri} cannot be a folder: {path} is a file")


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b` → (`bucket`, `a/b`)."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, path = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URI without a bucket: {uri!r}")
    return bucket, path


def parent_dir(uri: str) -> str:
    """The directory holding `uri`: absolute for local paths, the prefix for remote ones."""
    return uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(os.path.abspath(uri))


def resolve(base_dir: str, uri: str | None) -> str:
    """`uri` relative to `base_dir`; absolute URIs and paths stay as they are, a `file://` URI of this machine
    becomes its path; empty stays empty."""
    if not uri or not uri.strip():
        return ""
    uri = uri.strip()
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(uri)
        return unquote(parts.path) if parts.netloc in ("", "localhost") and parts.path.startswith("/") else uri
    if "://" in uri or uri.startswith("/"):
        return uri
    if "://" in base_dir:
        return f"{base_dir.rstrip('/')}/{uri}"
    return os.path.normpath(os.path.join(base_dir, uri))


# What `resolve` keeps as it is: a URI with a scheme (not file://) or an absolute path, ending in a printable ASCII
# character (so there is no whitespace to strip at either end).
_KEPT_AS_IS = r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|/)(?s:.*)[!-~]$"


def resolve_all(base_dir: str, uris):
    """`resolve` over an Arrow column of URIs (nulls as empty), as an Arrow string array. Only the URIs it would
    change go through it one by one: a catalog's are mostly absolute already, and 2M calls took the embed
    launcher 1.1 s (profiled)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    kept = pc.and_(pc.match_substring_regex(uris, _KEPT_AS_IS), pc.invert(pc.starts_with(uris, "file://")))
    redo = pc.invert(pc.fill_null(kept, False))
    if not pc.any(redo).as_py():
        return uris
    redone = [resolve(base_dir, uri) for uri in pc.filter(uris, redo).to_pylist()]
    return pc.replace_with_mask(uris.fill_null(""), redo, pa.array(redone, pa.string()))


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def contained(name: str, *, nested: bool = False) -> str:
    """`name` if, joined to a directory, it stays inside that directory; else ValueError.

    Names from manifests (shard and snapshot file names, snapshot ids) pass through here so a
    hostile or corrupt manifest cannot point a reader or a deleter outside its root. `nested`
    allows sub-directories ("scann/x.npy"); never absolute paths, "..", backslashes or NUL.
    """
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name or name.startswith("/") or "://" in name:
        raise ValueError(f"{name!r} is not a relative name inside its directory")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or (len(parts) > 1 and not nested):
        raise ValueError(f"{name!r} is not a {'relative path' if nested else 'plain name'} inside its directory")
    return name


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LATEST_NAME = "LATEST"  # ROOT/LATEST: the snapshot a root publishes (`indexing.publish`); never an id


def check_id(name: str, what: str) -> str:
    """`name` if it can be a run's or a snapshot's id (a nightly's is both): the name of its folder under any root.
    Letters, digits, `.`, `_` and `-`, up to 128, starting with a letter or digit (hidden and scratch folders start
    with `.` or `_` and are never listed), and not `LATEST` (a snapshot root's pointer to the published one).

    Raises:
        ValueError: it cannot.
    """
    if not isinstance(name, str) or not _ID.fullmatch(name) or name == LATEST_NAME:
        raise ValueError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (up to 128, starting with a letter "
                         f"or digit), not {LATEST_NAME}")  # fmt: skip
    return name


_CLIENT = None

# google-cloud-storage (3.17) starts a thread per bucket per client that GETs the bucket's metadata, only to
# label tracing spans; lookalike emits none. Each costs a request (storage.buckets.get, which a reader's
# role may not grant), and Beam's own clients do the same. Off unless the user sets the variable.
_BUCKET_METADATA_ENV = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"


def no_background_bucket_lookups() -> None:
    """Stop storage clients in this process (and the processes it starts) fetching bucket metadata for traces."""
    os.environ.setdefault(_BUCKET_METADATA_ENV, "true")


CONNECTIONS = 64  # the client's session (writes, listings, whole objects) keeps this many per host; images: object_http


def _keep_connections(client, connections: int) -> None:
    """Keep up to `connections` open to each host. requests keeps 10: with more threads than that reading at once,
    every read past the tenth opened a connection (on GCS a TLS handshake) and closed it after one request."""
    from requests.adapters import HTTPAdapter

    session = client._http  # the client's requests session (google-auth's AuthorizedSession)
    for prefix in ("https://", "http://"):
        session.mount(prefix, HTTPAdapter(pool_connections=4, pool_maxsize=connections))


def gcs_client():
    """A storage client (one per process, shared by its threads); anonymous against an emulator
    (`STORAGE_EMULATOR_HOST`). A forked child makes its own: a parent's pooled connections are not its to use."""
    global _CLIENT
    from google.cloud import storage

    owner = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    if _CLIENT is None or getattr(_CLIENT, "_lookalike_owner", None) != owner:
        no_background_bucket_lookups()
        emulator = owner[1]
        client = storage.Client.create_anonymous_client() if emulator else storage.Client()
        _keep_connections(client, CONNECTIONS)
        client._lookalike_owner = owner
        _CLIENT = client
    return _CLIENT


def _object(uri: str) -> tuple[str, str]:
    """(bucket, object name) of a gs:// URI that names an object."""
    bucket, path = split_gcs_uri(uri)
    if not path:
        raise ValueError(f"gs:// URI without an object name: {uri!r}")
    return bucket, path


def _blob(uri: str):
    bucket, path = _object(uri)
    return gcs_client().bucket(bucket).blob(path)


# ------------------------------------------------------------------ retries


def is_transient(err: BaseException) -> bool:
    """Whether retrying `err` may succeed: throttling, server errors, dropped connections."""
    from google.api_core import exceptions as gexc

    transient = (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway, gexc.ServiceUnavailable,
                 gexc.GatewayTimeout)  # fmt: skip
    if isinstance(err, transient):
        return True
    if isinstance(err, gexc.GoogleAPICallError):
        return False
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    import http.client

    import requests
    import urllib3

    try:
        from google.resumable_media import DataCorruption  # a download whose checksum does not match
    except ImportError:  # pragma: no cover - newer google-cloud-storage vendors it
        from google.cloud.storage.exceptions import DataCorruption

    cut_short = (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError, http.client.IncompleteRead,
                 DataCorruption)  # fmt: skip
    # The last: urllib3's own timeouts, and connections it could not make (image reads go over it directly).
    unreachable = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                   urllib3.exceptions.TimeoutError)  # fmt: skip
    return isinstance(err, (*unreachable, *cut_short))


# An outage retries every read: one line per retry would be hundreds a second from a GPU worker's reader processes.
_RETRIES = Throttled(log, every_s=10.0)


def with_retries(call: Callable[[], T], what: str, *, attempts: int = 5, base_delay_s: float = 0.2,
                 max_total_s: float = 60.0) -> T:  # fmt: skip
    """Run `call`, retrying transient errors with exponential backoff and full jitter."""
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            elapsed = time.monotonic() - start
            if not is_transient(err) or attempt == attempts or elapsed >= max_total_s:
                raise
            delay = min(random.uniform(0, base_delay_s * 2**attempt), max(0.0, max_total_s - elapsed))
            _RETRIES.warning("%s: %s (attempt %d/%d), retrying in %.2fs", what, err, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_error(err: BaseException) -> str:
    """An exception as a dead-letter reason: "Type: message" (every stage's reasons read alike)."""
    return f"{type(err).__name__}: {err}"


def is_not_found(err: BaseException) -> bool:
    """A missing file or object (local or gs://): permanent, never retried."""
    from google.api_core.exceptions import NotFound

    return isinstance(err, (FileNotFoundError, NotFound))


# ------------------------------------------------------------------ whole objects


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; with `max_bytes`, refused if larger (gs:// and http(s): at its headers, or one byte past
    the cap). An http(s) URL is read as an image on a web server or CDN is (`_read_web`).

    Raises:
        FileNotFoundError: no such object.
        ValueError: larger than `max_bytes`.
    """
    if not reads_itself(uri):
        _readable_here(uri)
        if max_bytes is not None and os.path.getsize(uri) > max_bytes:
            raise ValueError(f"object is larger than max_bytes={max_bytes}")
        data = Path(uri).read_bytes()
    else:
        read = _read_web if is_web(uri) else _download
        try:
            data = with_retries(lambda: read(uri, max_bytes), f"read {uri}")
        except Exception as err:
            if is_not_found(err):
                raise FileNotFoundError(f"no such object: {uri}") from err
            raise
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"object is larger than max_bytes={max_bytes}")
    return data


def is_web(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def reads_itself(uri: str) -> bool:
    """Whether this module reads `uri` with its own clients: a gs:// object or an http(s) URL (local paths aside)."""
    return is_gcs(uri) or is_web(uri)


def _read_web(uri: str, max_bytes: int | None) -> bytes:
    """An http(s) URL's body in one GET over libcurl (`encoder.object_http`), redirects followed (to http(s) only),
    refused at its headers past `max_bytes`. 404 and 410: not found; 408, 429 and 5xx: retried (`is_transient`);
    any other status: refused, its body left out (a catalog's URL is not a way to read a server's pages)."""
    from google.api_core.exceptions import NotFound, from_http_status

    response = _web_http().get(uri, {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.8"}, max_bytes)
    if 200 <= response.status < 300:
        return response.body
    if response.status in (404, 410):
        raise NotFound(f"GET {uri}: HTTP {response.status}")
    status = 503 if response.status == 408 else response.status  # the server timed the request out: retried
    raise from_http_status(status, f"GET {uri}: HTTP {response.status}")


USER_AGENT = "lookalike (catalog image reader)"  # CDNs refuse requests without one
_WEB_HTTP = None


def _web_http():
    """The process's reader of http(s) URLs: no credentials (a bucket's token is never sent to a web server)."""
    global _WEB_HTTP
    if _WEB_HTTP is None:
        from encoder.object_http import ObjectHttp

        _WEB_HTTP = ObjectHttp("", None, None)
    return _WEB_HTTP


def _download(uri: str, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return _blob(uri).download_as_bytes(retry=None)
    return _read_capped(uri, max_bytes)


def _read_capped(uri: str, max_bytes: int) -> bytes:
    """A gs:// object in one request, refused at its headers when its Content-Length is past `max_bytes` (a huge
    one is never fetched), its bytes checked against the crc32c GCS sends with a whole object (`x-goog-hash`; a
    ranged read gets none). Raw: a gzip-encoded object is not inflated. Over libcurl (`encoder.object_http`), not
    the client's download, which cost 2.2-2.6x the CPU per read of urllib3, itself 1.8-2.9x libcurl's.
    """
    from google.api_core.exceptions import from_http_status

    http = _image_http()
    response = http.get(_media_url(http, uri), {"Accept-Encoding": "gzip"}, max_bytes)
    if response.status in (200, 206):
        return response.body
    raise from_http_status(response.status, f"GET {uri}: {response.body[:300].decode('utf-8', 'replace')}")


def _media_url(http, uri: str, generation=None) -> str:
    """The download URL of a gs:// object under `http`'s base; with `generation`, of that generation only."""
    bucket, name = _object(uri)
    return f"{http.base}{bucket}/o/{quote(name, safe='~')}?alt=media" + (
        f"&generation={generation}" if generation else ""
    )


_IMAGE_HTTP: tuple | None = None  # (the client it serves, its `ObjectHttp`)


def _image_http():
    """An `ObjectHttp` with the storage client's credentials and download URL, made again with the client: what
    image reads go through. On the emulator (`benchmarks/gcs_reads.py`, 2-core Xeon, 71 KB photos, 1 / 16 threads)
    the client's own download (google-resumable-media over requests) took 1.43 / 2.08 ms of CPU per read, urllib3
    0.57-0.66 / 0.80-1.07, libcurl 0.22-0.29 / 0.24-0.26; a reader process's reads are CPU-bound at that."""
    global _IMAGE_HTTP
    client = gcs_client()
    if _IMAGE_HTTP is None or _IMAGE_HTTP[0] is not client:
        from google.auth.transport.requests import Request
        from google.cloud.storage.blob import _get_host_name

        from encoder.object_http import ObjectHttp

        # Refreshes as the client's own: over requests, each token server (the metadata server, oauth2) by the
        # environment's proxy settings for its own URL, `no_proxy` included.
        base = f"{_get_host_name(client._connection)}/download/storage/v1/b/"
        _IMAGE_HTTP = (client, ObjectHttp(base, client._credentials, Request()))
    return _IMAGE_HTTP[1]


def arrow_input(data: bytes):
    """`data` as an Arrow input stream over Arrow-owned memory, for Parquet, CSV and JSON readers.

    A reader over Python bytes (io.BytesIO, py_buffer) may be released on one of Arrow's own
    threads after the read returns; that needs the GIL, and at interpreter exit taking the GIL
    ends the thread inside a C++ destructor, which aborts the process (SIGABRT in about 1 of 8
    exits right after a read). A copy that Arrow owns is freed without Python.
    """
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    sink.write(data)
    return pa.BufferReader(sink.getvalue())


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old content or all of the new."""
    if is_gcs(uri):
        with_retries(lambda: _blob(uri).upload_from_string(data, retry=None), f"write {uri}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to `uri` (atomically)."""
    if is_gcs(uri):
        with_retries(lambda: _blob(uri).upload_from_filename(str(local), retry=None), f"upload {uri}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
    shutil.copyfile(local, tmp)
    os.replace(tmp, uri)


def upload_folder(local: str | Path, uri: str, *, last: str | None = None) -> None:
    """Copy every file under a local folder to `uri`, the file named `last` (the one a reader takes for the whole,
    a model's `config.json`) after the others."""
    root = Path(local)
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.name == last, p.as_posix()))
    for path in files:
        upload_file(path, join(uri, path.relative_to(root).as_posix()))


def download_file(uri: str, local: str | Path) -> None:
    """Copy one gs:// object to a local file (atomically), streamed: checkpoints are larger than memory allows."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex}"
    try:
        with_retries(lambda: _blob(uri).download_to_filename(tmp, retry=None), f"download {uri}")
        os.replace(tmp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def exists(uri: str) -> bool:
    if not is_gcs(uri):
        _readable_here(uri)
        return os.path.exists(uri)
    return with_retries(lambda: _blob(uri).exists(retry=None), f"stat {uri}")


GLOB_CHARS = ("*", "?", "[")


def files_under(uri: str) -> list[str]:
    """The files a glob matches (`*`, `?`, `[...]`; locally `**` across folders, on gs:// `*` across them too), or
    every file under a folder or prefix, or the one file; sorted, [] for nothing there. For data written as many files
    (logs partitioned by day, `dt=2026-11-29/part-0.parquet`)."""
    if not is_gcs(uri):
        _readable_here(uri)
        if any(c in uri for c in GLOB_CHARS):
            return sorted(p for p in globbing.glob(uri, recursive=True) if os.path.isfile(p))
        if os.path.isdir(uri):
            return sorted(os.path.join(d, f) for d, _, names in os.walk(uri) for f in names)
        return [uri] if os.path.isfile(uri) else []
    bucket, name = split_gcs_uri(uri.rstrip("/"))
    pattern = any(c in name for c in GLOB_CHARS)
    prefix = re.split(r"[*?\[]", name, maxsplit=1)[0] if pattern else name
    names = with_retries(lambda: [b.name for b in gcs_client().list_blobs(bucket, prefix=prefix, retry=None)],
                         f"list {uri}")  # fmt: skip
    if pattern:
        return [f"gs://{bucket}/{n}" for n in sorted(names) if fnmatch.fnmatchcase(n, name)]
    if name in names:
        return [uri]
    return [f"gs://{bucket}/{n}" for n in sorted(names) if n.startswith(f"{name}/") and not n.endswith("/")]


def newest_change(uri: str) -> float | None:
    """When anything under a folder or prefix last changed (seconds since the epoch), None for nothing there."""
    if not is_gcs(uri):
        times = [os.stat(os.path.join(d, f)).st_mtime for d, _, names in os.walk(uri) for f in names]
        return max(times, default=os.stat(uri).st_mtime if os.path.isdir(uri) else None)
    bucket, prefix = split_gcs_uri(uri.rstrip("/"))
    times = with_retries(lambda: [b.updated.timestamp() for b in gcs_client().list_blobs(bucket, prefix=f"{prefix}/",
                                                                                          retry=None)], f"list {uri}")  # fmt: skip
    return max(times, default=None)


def list_children(uri: str) -> list[str]:
    """Names directly under a directory or prefix (files and sub-directories), sorted."""
    if not is_gcs(uri):
        return sorted(os.listdir(uri)) if os.path.isdir(uri) else []
    bucket, prefix = split_gcs_uri(uri.rstrip("/"))
    prefix = f"{prefix}/" if prefix else ""

    def names() -> list[str]:
        blobs = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/", retry=None)
        files = [b.name[len(prefix) :] for b in blobs]
        return files + [p[len(prefix) :].rstrip("/") for p in blobs.prefixes]

    return sorted(set(with_retries(names, f"list {uri}")))


def delete(uri: str) -> None:
    """Remove one object or file; a missing one is not an error."""
    if not is_gcs(uri):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uri)
        return
    from google.api_core.exceptions import NotFound

    with contextlib.suppress(NotFound):
        with_retries(lambda: _blob(uri).delete(retry=None), f"delete {uri}")


def delete_tree(uri: str) -> None:
    """Remove a directory or prefix and everything under it."""
    if not is_gcs(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, prefix = split_gcs_uri(uri.rstrip("/"))
    for blob in with_retries(
        lambda: list(gcs_client().list_blobs(bucket, prefix=f"{prefix}/", retry=None)), f"list {uri}"
    ):
        with_retries(blob.delete, f"delete gs://{bucket}/{blob.name}")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ compare-and-swap


@contextlib.contextmanager
def local_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), across processes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_versioned(uri: str) -> tuple[bytes | None, int]:
    """Content and version of an object; (None, 0) when it does not exist.

    On gs:// the version is the object generation. Locally it is the file's
    nanosecond mtime; callers serialise local read-modify-writes with `local_lock`.
    """
    if not is_gcs(uri):
        try:
            return Path(uri).read_bytes(), os.stat(uri).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):  # (a folder on its path is a file: no such object either)
            return None, 0

    from google.api_core.exceptions import PreconditionFailed

    def read() -> tuple[bytes | None, int]:
        for _ in range(10):  # a writer replacing the object between the two calls: read the new one
            blob = _blob(uri)
            try:
                blob.reload(retry=None)
            except Exception as err:
                if is_not_found(err):
                    return None, 0
                raise
            generation = int(blob.generation)  # before the download, which may reset the blob's properties
            try:
                return blob.download_as_bytes(if_generation_match=generation, retry=None), generation
            except Exception as err:
                if not isinstance(err, PreconditionFailed) and not is_not_found(err):
                    raise
        raise ConcurrentUpdate(f"{uri} kept changing while being read")

    return with_retries(read, f"read {uri}")


def write_if_version(uri: str, data: bytes, version: int) -> None:
    """Replace the object only if it is still at `version` (0: only if absent).

    Raises:
        ConcurrentUpdate: it changed since it was read.
    """
    if not is_gcs(uri):
        _, current = read_versioned(uri)
        if current != version:
            raise ConcurrentUpdate(f"{uri} changed since it was read")
        write_bytes(uri, data)
        return
    from google.api_core.exceptions import PreconditionFailed

    attempts = 0

    def write() -> None:
        nonlocal attempts
        attempts += 1
        _blob(uri).upload_from_string(data, if_generation_match=version, retry=None)

    try:
        with_retries(write, f"write {uri}")
    except PreconditionFailed as err:
        # A retry after a lost answer finds our own write in place: the object changed, but to our bytes.
        if attempts > 1 and read_versioned(uri)[0] == data:
            return
        raise ConcurrentUpdate(f"{uri} changed since it was read") from err


# ------------------------------------------------------------------ directory copies


def download_gcs_dir(uri: str, cache_root: str | Path) -> Path:
    """Copy every object under a gs:// prefix into a local cache directory.

    The cache key covers each object's name and generation, so a re-uploaded
    directory under the same URI is fetched again; an unchanged one is not.
    The copy lands in a temporary directory and is renamed into place whole.

    Raises:
        FileNotFoundError: nothing under the prefix.
        ValueError: an object name that would escape the directory.
    """
    prefix, blobs = _objects_under(uri)
    key = hashlib.sha256()
    for blob in sorted(blobs, key=lambda b: b.name):
        key.update(f"{blob.name}\0{blob.generation}\0".encode())
    target = Path(cache_root) / key.hexdigest()[:24]
    if target.is_dir():
        log.info("using cached copy of %s at %s", uri, target)
        return target
    _copy_objects(blobs, prefix, target)
    log.info("copied %d objects from %s to %s", len(blobs), uri, target)
    return target


def download_tree(uri: str, target: str | Path) -> None:
    """Copy every object under a gs:// prefix to the local folder `target` (not there yet), whole or not at all.

    Raises:
        FileNotFoundError: nothing under the prefix.
        ValueError: an object name that would escape the folder.
    """
    prefix, blobs = _objects_under(uri)
    _copy_objects(blobs, prefix, Path(target))


def objects_under(uri: str) -> tuple[str, list]:
    """The objects under a gs:// prefix (folder markers aside), with the prefix their names start with; none: []."""
    bucket_name, prefix = split_gcs_uri(uri.rstrip("/"))
    prefix = f"{prefix}/" if prefix else ""
    blobs = with_retries(
        lambda: [
            b for b in gcs_client().list_blobs(bucket_name, prefix=prefix, retry=None) if not b.name.endswith("/")
        ],
        f"list {uri}",
    )
    return prefix, blobs


def _objects_under(uri: str) -> tuple[str, list]:
    prefix, blobs = objects_under(uri)
    if not blobs:
        raise FileNotFoundError(f"no objects under {uri}")
    return prefix, blobs


def _copy_objects(blobs: list, prefix: str, target: Path) -> None:
    """The objects, named past `prefix`, into a temporary folder beside `target`, renamed to it whole; a `target`
    that a concurrent copy renamed into place first is kept. `DOWNLOAD_STREAMS` reads at once: the small objects
    whole, each at most `SLICED_FROM` bytes; the larger, one after another, in ranged reads of `SLICE_BYTES`
    (`_download_sliced`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        places = []
        for blob in blobs:
            local = (staging / blob.name[len(prefix) :]).resolve()
            if staging.resolve() not in local.parents:
                raise ValueError(f"object name escapes its directory: {blob.name!r}")
            local.parent.mkdir(parents=True, exist_ok=True)
            places.append((blob, local))
        with ThreadPoolExecutor(DOWNLOAD_STREAMS, thread_name_prefix="download") as pool:
            whole = [pool.submit(with_retries, lambda b=blob, p=local: b.download_to_filename(str(p), retry=None),
                                 f"download {blob.name}")
                     for blob, local in places if (blob.size or 0) <= SLICED_FROM]  # fmt: skip
            try:
                for blob, local in places:
                    if (blob.size or 0) > SLICED_FROM:
                        with_retries(lambda b=blob, p=local: _download_sliced(b, p, pool), f"download {blob.name}")
                for future in whole:
                    future.result()
            finally:
                for future in whole:
                    future.cancel()
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # a concurrent download may have won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# A snapshot's vectors and index are tens of GB: one stream per object reads one at the speed of one connection. A
# larger object is read in ranges of `SLICE_BYTES`, `DOWNLOAD_STREAMS` at once, each written where it belongs as
# it arrives (libcurl, without the interpreter lock: `encoder.object_http`), then checked whole against the
# object's crc32c (a ranged read comes without one). Each range names the object's generation, so none is read
# from a newer object written over it meanwhile.
DOWNLOAD_STREAMS = 8
SLICE_BYTES = 64 << 20
SLICED_FROM = 2 * SLICE_BYTES  # objects past this are read in ranges


def _download_sliced(blob, path: Path, pool: ThreadPoolExecutor) -> None:
    """`blob` into `path` in ranged reads on `pool`, each retried on its own; checked whole against its crc32c.

    Raises:
        ChecksumMismatch: the bytes read are not the object's (a transient error: `with_retries` reads it again).
    """
    from encoder.object_http import ChecksumMismatch

    size = int(blob.size)
    with open(path, "wb") as f:
        f.truncate(size)
    ranges = [(start, min(start + SLICE_BYTES, size)) for start in range(0, size, SLICE_BYTES)]
    uri = f"gs://{blob.bucket.name}/{blob.name}"
    futures = [pool.submit(with_retries, lambda a=a, b=b: _read_range(uri, blob.generation, path, a, b),
                           f"read {uri} bytes {a}-{b - 1}") for a, b in ranges]  # fmt: skip
    import google_crc32c

    checksum = google_crc32c.Checksum()
    try:
        with open(path, "rb") as f:  # each range read back once it and those before it are written, while the
            for (_, stop), future in zip(ranges, futures, strict=True):  # later ones still arrive: the check
                future.result()  # takes no pass of its own after the copy
                while f.tell() < stop and (chunk := f.read(min(8 << 20, stop - f.tell()))):
                    checksum.update(chunk)
    finally:
        for future in futures:
            future.cancel()
    if blob.crc32c is None:
        log.warning("%s has no crc32c to check its %d bytes against", uri, size)
        return
    if checksum.digest() != base64.b64decode(blob.crc32c):
        raise ChecksumMismatch(f"{uri}: the crc32c of the {size} bytes read is not the object's ({blob.crc32c})")


def _read_range(uri: str, generation, path: Path, start: int, stop: int) -> None:
    """Bytes [start, stop) of the object's `generation` into `path` at `start`, as they arrive."""
    from google.api_core.exceptions import from_http_status

    http = _image_http()
    url = _media_url(http, uri, generation)
    written, failed = 0, []
    with open(path, "r+b") as f:

        def sink(chunk: bytes) -> int | None:
            nonlocal written
            try:
                if written + len(chunk) > stop - start:
                    raise OSError(f"GET {uri} bytes {start}-{stop - 1}: more bytes came than were asked for")
                os.pwrite(f.fileno(), chunk, start + written)  # a full disk: its own error, not libcurl's
            except OSError as err:
                failed.append(err)
                return 0
            written += len(chunk)
            return None

        try:
            response = http.get(url, {"Range": f"bytes={start}-{stop - 1}"}, 1 << 16, sink)
        except OSError:
            if failed:
                raise failed[0] from None
            raise
    if response.status != 206:
        raise from_http_status(response.status, f"GET {uri} bytes {start}-{stop - 1}: "
                                                 f"{response.body[:300].decode('utf-8', 'replace')}")  # fmt: skip
    if written != stop - start:
        raise ConnectionError(f"GET {uri} bytes {start}-{stop - 1}: {written} of {stop - start} bytes came")
