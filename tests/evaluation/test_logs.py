"""Interaction logs: every documented rule, and a clear error only when nothing is usable."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.logs import LogError, read_judgments


def _write(tmp_path, name="logs.parquet", **columns):
    pq.write_table(pa.table(columns), tmp_path / name)
    return str(tmp_path / name)


def test_rules_are_applied_and_counted(tmp_path):
    t = [datetime(2026, 1, d, tzinfo=UTC) for d in (1, 1, 1, 2, 3, 4, 5)]
    path = _write(
        tmp_path,
        query_item_id=["q", "q", "q", "q", "q", "q", None],
        clicked_item_id=["a", "a", "b", "a", "q", "c", "a"],
        weight=[1.0, 1.0, 2.0, 3.0, 1.0, -1.0, 1.0],
        timestamp=t,
        session_id=["s1", "s1", "s1", "s2", "s3", "s4", "s5"],
    )
    j = read_judgments(path)
    assert j.relevance == {"q": {"a": 4.0, "b": 2.0}}  # duplicate row once; a: 1 + 3
    assert j.counts["duplicate_rows"] == 1 and j.counts["self_clicks"] == 1 and j.counts["bad_rows"] == 2
    later = read_judgments(path, since=datetime(2026, 1, 2, tzinfo=UTC))
    assert later.relevance == {"q": {"a": 3.0}} and later.counts["before_since"] == 3


def test_a_row_with_a_weight_or_time_that_is_not_one_is_dropped_and_counted_not_the_log(tmp_path):
    (tmp_path / "logs.csv").write_text(
        "query_item_id,clicked_item_id,weight,timestamp\n"
        "q,a,1.5,2026-01-01\n"  # before --since
        "q,b,2,2026-01-03T01:00:00+02:00\n"  # 2026-01-02 23:00 UTC
        "q,c,abc,2026-01-04\n"  # not a number: a bad row
        "q,d,,2026-01-04\n"  # no weight: a bad row
        ",e,1,2026-01-04\n"  # no query: a bad row
        "q,f,1,notadate\n"  # not a time
        "q,g,1,\n"  # no time
        "q,h,3,2026-01-05 12:00:00\n"  # a space for the T, no zone: UTC
    )
    j = read_judgments(str(tmp_path / "logs.csv"))
    assert j.relevance == {"q": {"a": 1.5, "b": 2.0, "f": 1.0, "g": 1.0, "h": 3.0}} and j.counts["bad_rows"] == 3
    later = read_judgments(str(tmp_path / "logs.csv"), since=datetime(2026, 1, 2, 22, tzinfo=UTC))
    assert later.relevance == {"q": {"b": 2.0, "h": 3.0}}
    assert (later.counts["before_since"], later.counts["no_timestamp"], later.counts["bad_rows"]) == (1, 2, 3)


@pytest.mark.parametrize("kind", ["date", "naive", "zoned"])
def test_since_reads_dates_and_timestamps_with_and_without_a_zone(tmp_path, kind):
    days = [datetime(2026, 1, d) for d in (1, 2, 3)]
    stamps = {
        "date": pa.array([d.date() for d in days], pa.date32()),
        "naive": pa.array(days, pa.timestamp("ms")),
        "zoned": pa.array([d.replace(tzinfo=UTC) for d in days], pa.timestamp("s", tz="Europe/Paris")),
    }[kind]
    path = _write(tmp_path, query_item_id=["q"] * 3, clicked_item_id=["a", "b", "c"], timestamp=stamps)
    later = read_judgments(path, since=datetime(2026, 1, 2, tzinfo=UTC))
    assert later.relevance == {"q": {"b": 1.0, "c": 1.0}} and later.counts["before_since"] == 1


def test_weights_and_times_of_the_wrong_kind_are_refused_by_name(tmp_path):
    path = _write(tmp_path, query_item_id=["q"], clicked_item_id=["a"], weight=[[1.0]])
    with pytest.raises(LogError, match="weight must be numbers, not list<element: double>"):
        read_judgments(path)
    path = _write(tmp_path, query_item_id=["q"], clicked_item_id=["a"], timestamp=[1.5])
    with pytest.raises(LogError, match="timestamp must be timestamps, dates or ISO 8601 text, not double"):
        read_judgments(path, since=datetime(2026, 1, 2, tzinfo=UTC))


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ({"query_item_id": [["a"]]}, "query_item_id must be text, not list<element: string>"),
        ({"session_id": [[1]]}, "session_id must be text, not list<element: int64>"),
        ({"timestamp": [{"at": 1}]}, "timestamp must be timestamps, dates or ISO 8601 text, not struct<at: int64>"),
    ],
    ids=["ids", "sessions", "times"],
)
def test_a_column_of_lists_or_structs_is_refused_by_name(tmp_path, column, message):
    """Arrow said only "Unsupported cast from list<element: string> to utf8" or "Keys of type list"."""
    path = _write(tmp_path, **{"query_item_id": ["q"], "clicked_item_id": ["a"], **column})
    with pytest.raises(LogError, match=re.escape(message)):
        read_judgments(path)


def test_json_lines_ids_of_both_kinds_are_text(tmp_path):
    (tmp_path / "logs.jsonl").write_text('{"query_item_id": 7, "clicked_item_id": "8", "weight": 1}\n'
                                         '{"query_item_id": "7", "clicked_item_id": 9, "weight": "2"}\n'
                                         '{"query_item_id": 7, "clicked_item_id": 10}\n')  # fmt: skip
    j = read_judgments(str(tmp_path / "logs.jsonl"))
    assert j.relevance == {"7": {"8": 1.0, "9": 2.0}} and j.counts["bad_rows"] == 1  # a weight column, none given


def test_weight_defaults_to_one_and_csv_ids_stay_strings(tmp_path):
    (tmp_path / "logs.csv").write_text("query_item_id,clicked_item_id\n007,8\n007,9\n")
    assert read_judgments(str(tmp_path / "logs.csv")).relevance == {"007": {"8": 1.0, "9": 1.0}}


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (
            {"query_item_id": ["q"], "clicked_id": ["a"]},
            r"lacks column\(s\) \['clicked_item_id'\]; found "
            r"\['query_item_id', 'clicked_id'\]",
        ),  # unread, but named
        ({"query_item_id": pa.array([], pa.string()), "clicked_item_id": pa.array([], pa.string())}, "no rows"),
        ({"query_item_id": ["q"], "clicked_item_id": ["q"]}, "no usable rows"),
    ],
    ids=["missing-column", "empty", "only-self-clicks"],
)
def test_unusable_logs(tmp_path, columns, message):
    with pytest.raises(LogError, match=message):
        read_judgments(_write(tmp_path, **columns))


def test_since_needs_timestamps(tmp_path):
    path = _write(tmp_path, query_item_id=["q"], clicked_item_id=["a"])
    with pytest.raises(LogError, match="--since needs a timestamp"):
        read_judgments(path, since=datetime(2026, 1, 1, tzinfo=UTC))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(LogError, match="does not exist"):
        read_judgments(str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(LogError, match="cannot read"):
        read_judgments(str(tmp_path / "bad.parquet"))


def test_since_after_every_row_says_so(tmp_path):
    """A `--since` after the last row (a typo'd year) leaves nothing: an error naming it, not a crash on the empty
    table's counts (Arrow sums an empty mask to null)."""
    days = [datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2)]
    path = _write(tmp_path, query_item_id=["q", "q"], clicked_item_id=["a", "b"], timestamp=days)
    with pytest.raises(LogError, match=r"no row at or after --since 2062-01-01T00:00:00\+00:00 .*'before_since': 2"):
        read_judgments(path, since=datetime(2062, 1, 1, tzinfo=UTC))
    (tmp_path / "times.csv").write_text("query_item_id,clicked_item_id,timestamp\nq,a,never\nq,b,\n")
    with pytest.raises(LogError, match="no row at or after --since .*'no_timestamp': 2"):  # every time unreadable
        read_judgments(str(tmp_path / "times.csv"), since=datetime(2026, 1, 1, tzinfo=UTC))


def _partitioned(root, days: int = 2):
    """Logs as a data platform writes them: a folder per day, a part file in each, a marker beside them."""
    for day in range(1, days + 1):
        (root / f"dt=2026-01-0{day}").mkdir(parents=True)
        pq.write_table(pa.table({"query_item_id": ["q", "q"], "clicked_item_id": [f"a{day}", "b"],
                                 "weight": [1, 1.5 + day]}), root / f"dt=2026-01-0{day}" / "part-0.parquet")  # fmt: skip
    (root / "_SUCCESS").write_text("")
    (root / "dt=2026-01-01" / ".part-0.parquet.crc").write_bytes(b"\x00")


def test_logs_written_as_many_files_are_read_as_one(tmp_path):
    """A glob of files, or their folder (its markers and hidden files skipped), reads as the files together; it was
    "does not exist" for a glob and "unknown format" for a folder."""
    _partitioned(tmp_path / "clicks")
    whole = {"q": {"a1": 1.0, "a2": 1.0, "b": 6.0}}
    assert read_judgments(str(tmp_path / "clicks")).relevance == whole
    assert read_judgments(str(tmp_path / "clicks" / "*" / "part-*.parquet")).relevance == whole
    assert read_judgments(str(tmp_path / "clicks" / "dt=2026-01-01" / "part-0.parquet")).relevance == {
        "q": {"a1": 1.0, "b": 2.5}}  # fmt: skip
    with pytest.raises(LogError, match=r"clicks/dt=2026-02-\*/\*.parquet does not exist \(no file matches it\)"):
        read_judgments(str(tmp_path / "clicks" / "dt=2026-02-*" / "*.parquet"))
    pq.write_table(pa.table({"query_item_id": ["q"], "clicked_item_id": ["c"], "weight": [[1.0]]}),
                   tmp_path / "clicks" / "dt=2026-01-02" / "part-1.parquet")  # fmt: skip
    with pytest.raises(LogError, match="its 3 files do not agree on their columns"):
        read_judgments(str(tmp_path / "clicks"))


@pytest.mark.gcs
def test_logs_as_many_files_on_gcs(gcs_emulator, gcs_bucket, tmp_path):
    from encoder import storage

    _partitioned(tmp_path / "clicks")
    for path in sorted((tmp_path / "clicks").rglob("*")):
        if path.is_file():
            storage.write_bytes(f"gs://{gcs_bucket}/logs/{path.relative_to(tmp_path)}", path.read_bytes())
    whole = {"q": {"a1": 1.0, "a2": 1.0, "b": 6.0}}
    assert read_judgments(f"gs://{gcs_bucket}/logs/clicks").relevance == whole
    assert read_judgments(f"gs://{gcs_bucket}/logs/clicks/dt=*/part-*.parquet").relevance == whole
    with pytest.raises(LogError, match="does not exist"):
        read_judgments(f"gs://{gcs_bucket}/logs/clicks/dt=2027*/*.parquet")


def test_columns_evaluation_does_not_read_are_never_read(tmp_path):
    """A warehouse's export carries columns evaluation has no use for; they were read, held and concatenated, so
    one of another kind in one file than in the next failed the logs ("do not agree on their columns")."""
    (tmp_path / "clicks").mkdir()
    for n, extra in enumerate(([1, 2], ["x", "y"])):
        pq.write_table(pa.table({"query_item_id": ["q", "q"], "clicked_item_id": [f"a{n}", "b"], "page": extra}),
                       tmp_path / "clicks" / f"part-{n}.parquet")  # fmt: skip
    (tmp_path / "clicks" / "part-2.csv").write_text('query_item_id,clicked_item_id,page\nq,c,"[1, {2}]"\n')
    (tmp_path / "clicks" / "part-3.jsonl").write_text('{"query_item_id": "q", "clicked_item_id": "d", "page": {}}\n')
    relevance = {"q": {"a0": 1, "a1": 1, "b": 1, "c": 1, "d": 1}}  # b's two rows are one: exact duplicates
    assert read_judgments(str(tmp_path / "clicks")).relevance == relevance


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_table_read_for_some_columns_holds_those_it_has_in_their_order(fmt):
    import io

    from encoder.tables import table_from_bytes

    table = pa.table({"a": ["1", "2"], "b": [3, 4], "c": ["x", "y"]})
    data = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, data)
    elif fmt == "csv":
        data.write(b"a,b,c\n007,3,x\n2,4,y\n")
    else:
        data.write(b'{"a": "1", "b": 3, "c": "x"}\n{"a": "2", "b": 4, "c": "y"}\n')
    read = table_from_bytes(data.getvalue(), fmt, string_columns=("a",), columns=("c", "missing", "a"))
    assert read.column_names == ["c", "a"] and read.column("c").to_pylist() == ["x", "y"]
    assert read.column("a").type == pa.string()  # the CSV's 007 stays text


def _days(root, layout: str, days: range) -> list[str]:
    """A partition per day of November 2026 under `root`, named by `layout`, each with a click at noon."""
    names = []
    for day in days:
        when = datetime(2026, 11, day, 12, tzinfo=UTC)
        names.append(layout.format(*[when] * layout.count("{")))
        (root / names[-1]).mkdir(parents=True)
        pq.write_table(pa.table({"query_item_id": ["q"], "clicked_item_id": [names[-1]], "timestamp": [when]}),
                       root / names[-1] / "part-0.parquet")  # fmt: skip
    return names


@pytest.mark.parametrize("layout", ["dt={:%Y-%m-%d}", "date={:%Y%m%d}", "year={:%Y}/month={:%m}/day={:%d}"])
def test_since_skips_partitions_of_days_before_it(tmp_path, layout):
    """Logs partitioned by day: `since` reads the partitions of its window (and the day before it, whose events
    may fall after `since` in UTC where the partitions are in local time), not the history's; a file it skips is
    never opened, so an old unreadable one does not fail the evening's evaluation."""
    names = _days(tmp_path / "clicks", layout, range(20, 30))
    (tmp_path / "clicks" / names[0] / "part-1.parquet").write_bytes(b"PAR1 not a parquet file")
    judgments = read_judgments(str(tmp_path / "clicks"), since=datetime(2026, 11, 27, 18, tzinfo=UTC))
    assert judgments.relevance == {"q": {names[-2]: 1.0, names[-1]: 1.0}}  # the 28th's and 29th's clicks at noon
    assert judgments.counts["files_before_since"] == 6 + 1  # the 20th to the 25th (+ the bad file): not read
    assert judgments.counts["before_since"] == 2 and judgments.counts["rows"] == 4  # the 26th's and 27th's
    with pytest.raises(LogError, match="cannot read"):
        read_judgments(str(tmp_path / "clicks"))  # without since, every file is read
    with pytest.raises(LogError, match=r"all in partitions of days before --since 2027"):
        read_judgments(str(tmp_path / "clicks"), since=datetime(2027, 1, 1, tzinfo=UTC))


def test_files_outside_day_partitions_are_always_read(tmp_path):
    """A folder that is not a day (`dt=2026-02-30`, `hour=7`, `region=eu`) says nothing about the rows' times."""
    for name in ("dt=2026-02-30", "region=eu", "dt=2026-01-01/hour=07", "year=2026/month=01"):
        (tmp_path / name).mkdir(parents=True)
        pq.write_table(pa.table({"query_item_id": ["q"], "clicked_item_id": [name], "timestamp": ["2026-11-29"]}),
                       tmp_path / name / "part-0.parquet")  # fmt: skip
    judgments = read_judgments(str(tmp_path), since=datetime(2026, 11, 28, tzinfo=UTC))
    assert set(judgments.relevance["q"]) == {"dt=2026-02-30", "region=eu", "year=2026/month=01"}
    assert judgments.counts["files_before_since"] == 1  # dt=2026-01-01/hour=07


def test_since_takes_each_files_times_as_they_are_written(tmp_path):
    """One day's times written as text, the next's as timestamps: each file's are read as UTC instants before the
    files are joined, which failed before ("do not agree on their columns")."""
    _write(tmp_path, "a.parquet", query_item_id=["q"], clicked_item_id=["a"], timestamp=["2026-11-29T10:00:00Z"])
    _write(tmp_path, "b.parquet", query_item_id=["q"], clicked_item_id=["b"],
           timestamp=[datetime(2026, 11, 29, 11, tzinfo=UTC)])  # fmt: skip
    judgments = read_judgments(str(tmp_path / "*.parquet"), since=datetime(2026, 11, 29, tzinfo=UTC))
    assert judgments.relevance == {"q": {"a": 1.0, "b": 1.0}}


def test_max_queries_keeps_the_query_items_whose_ids_hash_lowest(tmp_path):
    """Logs of millions of queries built their relevance whole; `max_queries` keeps the rows of that many query items,
    chosen by a hash of their ids: the same items each night they recur, whatever else the logs hold."""
    from indexing.item_ids import fnv1a64

    queries = [f"q{i}" for i in range(40)]
    rows = {"query_item_id": [q for q in queries for _ in range(2)] + ["", "q0"],
            "clicked_item_id": [f"{q}-{n}" for q in queries for n in range(2)] + ["x", "q0"]}  # fmt: skip
    path = _write(tmp_path, "logs.parquet", **rows)
    lowest = sorted(queries, key=lambda q: int(fnv1a64([q])[0]))[:10]
    judgments = read_judgments(path, max_queries=10)
    assert sorted(judgments.relevance) == sorted(lowest) and judgments.counts["queries_not_sampled"] == 30
    assert all(len(clicked) == 2 for clicked in judgments.relevance.values())  # each sampled query whole
    more = _write(tmp_path, "more.parquet", query_item_id=queries[:20] + ["new-1", "new-2"],
                  clicked_item_id=["c"] * 22)  # fmt: skip
    again = read_judgments(more, max_queries=10)
    kept = set(again.relevance)
    assert set(lowest) & set(queries[:20]) <= kept  # another night: the items both hold are kept again where they rank
    assert read_judgments(path, max_queries=1000).counts["queries_not_sampled"] == 0
    assert len(read_judgments(path, max_queries=1000).relevance) == 40
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        read_judgments(path, max_queries=0)
