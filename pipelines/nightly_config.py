"""The nightly job's settings: one YAML file, typed and validated before any work, overridable by CLI flags.

    catalog: gs://bucket/catalog/manifest.parquet
    model: gs://bucket/models/encoder-v3
    out: gs://bucket/lookalike            # embeddings/, failures/, snapshots/, runs/ go under it
    interactions: gs://bucket/logs/interactions.parquet
    embed:    {batch_size: 256, workers: 1, device: auto}
    index:    {backend: faiss, index: auto, min_recall: 0.9}
    evaluate: {gates: ["ndcg@5>=baseline-0.002"], since_days: 28}
    keep: 7

Unknown keys anywhere are an error that lists the known ones, so a typo fails in the
first second instead of silently using a default.
"""

from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from encoder.storage import check_location
from evaluation import PIXELS
from indexing.spec import IndexConfig

__all__ = ["ConfigError", "EmbedSettings", "EvaluateSettings", "NightlyConfig", "load_nightly_config"]


class ConfigError(ValueError):
    """The nightly config cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class EmbedSettings:
    """The embed step's knobs (see `lookalike embed --help`)."""

    batch_size: int = 64
    fetch_threads: int = 16
    hedge_reads: bool = True
    page_lock_reads: bool = True
    workers: int = 1
    fork_workers: bool = True
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_frozen: bool = False
    cuda_graph: bool = False
    decode_sms: int = 0
    gpu_decode: str = "auto"
    gpu_decoder: str = "auto"
    gpu_decode_threads: int = 1
    gpu_resize: str = "products"
    draft: bool = True
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    max_decode_s: float = 30.0
    max_dead_letters: float = 0.5
    reuse_memory_mb: int = 1024
    rows_per_shard: int = 100_000
    beam_args: tuple[str, ...] = ()  # e.g. ["--runner=DataflowRunner", "--project=P", ...]

    def __post_init__(self) -> None:
        from pipelines.embed_config import EmbedConfig  # checks the values as the step will, before any work

        EmbedConfig(catalog="-", model="-", out="-", **self.step_options())

    def step_options(self) -> dict[str, Any]:
        """The `EmbedConfig` fields these settings give."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "beam_args"}


@dataclass(frozen=True)
class EvaluateSettings:
    """Which logs count and what the candidate must beat before it is published."""

    k: int = 5
    gates: tuple[str, ...] = ("ndcg@5>=baseline-0.002",)  # against the published snapshot
    since_days: int | None = 28  # interactions of the last N days; None: all
    first_baseline: str | None = PIXELS  # when nothing is published yet: builtin:pixels, or None (no gate)
    bootstrap: int = 1000
    # The candidate may hold at most this share fewer items than the published snapshot; None: no limit. The metrics
    # compare the queries both snapshots hold, so a catalog cut short upstream would pass them.
    max_shrink: float | None = 0.1
    # A gate judged on fewer queries is not judged: logs thinned by an upstream fault (or ids that stopped matching
    # the catalog's) would otherwise pass or fail a candidate on a handful of clicks.
    min_queries: int = 100
    # At most this many query items of the logs (chosen by a hash of their ids, the same each night where they
    # recur); None: all. Logs of millions of queries otherwise build their relevance in memory, then rank them all.
    max_queries: int | None = None

    def __post_init__(self) -> None:
        from evaluation.gate import parse_gate

        if self.k < 1 or self.bootstrap < 1 or self.min_queries < 1:
            raise ValueError(f"evaluate.k, evaluate.bootstrap and evaluate.min_queries must be >= 1, got {self.k}, "
                             f"{self.bootstrap}, {self.min_queries}")  # fmt: skip
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"evaluate.max_queries must be >= 1 or null, got {self.max_queries}")
        if self.max_queries is not None and self.max_queries < self.min_queries:  # every gated night would stop
            raise ValueError(f"evaluate.max_queries {self.max_queries} is below evaluate.min_queries "
                             f"{self.min_queries}")  # fmt: skip
        if self.since_days is not None and self.since_days < 1:
            raise ValueError(f"evaluate.since_days must be >= 1 or null, got {self.since_days}")
        if self.first_baseline not in (PIXELS, None):
            raise ValueError(f"evaluate.first_baseline must be {PIXELS!r} or null, got {self.first_baseline!r}")
        for gate in self.gates:
            parse_gate(gate, self.k)
        if self.max_shrink is not None and not 0 <= self.max_shrink < 1:
            raise ValueError(f"evaluate.max_shrink is a share of the published items, 0 to 1 (or null); "
                             f"got {self.max_shrink}")  # fmt: skip


@dataclass(frozen=True)
class NightlyConfig:
    """Everything one nightly (or backfill) run needs; paths local or gs://."""

    catalog: str
    model: str
    out: str
    interactions: str
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    keep: int = 7  # snapshots kept after publishing (never LATEST or the one before)
    lock_ttl_h: float = 12.0  # a lock older than this is taken over (its job is presumed dead)

    def __post_init__(self) -> None:
        for name in ("catalog", "model", "out", "interactions"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (in the config file or as --{name})")
        check_location(self.out, "out")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.lock_ttl_h <= 0:
            raise ValueError(f"lock_ttl_h must be > 0, got {self.lock_ttl_h}")


_SECTIONS = {"embed": EmbedSettings, "index": IndexConfig, "evaluate": EvaluateSettings}
_TUPLES = {"beam_args", "gates"}
# Switches with an "auto": YAML reads an unquoted on / off (yes / no) as true / false, which mean "on" / "off" here.
_SWITCHES = {"gpu_decode"}


def _known(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.name != "extra"]


def _type_problem(value: Any, hint: Any) -> str | None:
    """What `value` should have been for the annotation `hint`, or None when it fits."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        problems = [_type_problem(value, a) for a in args]
        return None if None in problems else " or ".join(p for p in problems if p)
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return "a list"
        inner = [_type_problem(v, args[0]) for v in value]
        return next((f"a list of {p.removeprefix('a ')}s" for p in inner if p), None)
    if hint is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def _check_types(cls, values: dict, where: str, path: str) -> None:
    hints = get_type_hints(cls)
    for key, value in values.items():
        problem = _type_problem(value, hints[key])
        if problem:
            raise ConfigError(f"{path}: {where}{key} must be {problem}, got {type(value).__name__} {value!r}")


def _section(cls, values: Any, where: str, path: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {where} must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_known(cls)))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in {where}; known: {_known(cls)}")
    values = {k: ("on" if v else "off") if k in _SWITCHES and isinstance(v, bool) else v for k, v in values.items()}
    _check_types(cls, values, f"{where}.", path)
    values = {k: tuple(v) if k in _TUPLES and isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {where}: {err}") from err


def _relative_to(folder: str, values: dict) -> dict:
    """The file's relative paths as relative to its folder, not to the working directory, which an orchestrator's task
    chooses (a temporary one for Airflow's BashOperator: a relative `out` would have gone with it). A `model` only where
    it is one (`./`, `../`, or a folder there): `org/name` is a Hub id."""
    from encoder import storage

    resolved = dict(values)
    for key in ("catalog", "out", "interactions", "model"):
        value = values.get(key)
        if not isinstance(value, str) or not value:
            continue
        there = storage.resolve(folder, value)
        if key != "model" or value.startswith(("./", "../")) or (not storage.is_gcs(there) and os.path.isdir(there)):
            resolved[key] = there
    return resolved


def load_nightly_config(path: str | None, **overrides: Any) -> NightlyConfig:
    """Read the YAML file (optional), apply non-None `overrides` to its top-level keys, validate.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or values, a missing required key.
    """
    import yaml

    from encoder import storage

    raw: dict = {}
    if path:
        try:
            raw = yaml.safe_load(storage.read_bytes(path)) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config {path} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    where = path or "command line"
    unknown = sorted(set(raw) - set(_known(NightlyConfig)))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {_known(NightlyConfig)}")
    values = {k: v for k, v in raw.items() if k not in _SECTIONS}
    if path:
        values = _relative_to(storage.parent_dir(path), values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name in ("catalog", "model", "out", "interactions") if not values.get(name)]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} required (in the config file or as --{missing[0]})")
    _check_types(NightlyConfig, values, "", where)
    sections = {name: _section(cls, raw.get(name), name, where) for name, cls in _SECTIONS.items()}
    try:
        return NightlyConfig(**values, **sections)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
