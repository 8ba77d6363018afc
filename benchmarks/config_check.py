"""What a command pays before its own work: its settings checked with the embed pipeline's imports (torch, Beam,
PIL) beside them, as before, against checked alone (`encoder.configs`, `pipelines.embed_config`); each command a new
process, the ways alternated.

    python benchmarks/config_check.py [--rounds 5]

Three commands: `lookalike embed` with a wrong flag value, `lookalike nightly` with a wrong config value (each exits
2 with its one line), and an orchestrator's task after the embed step, `lookalike nightly --step index` on a run whose
embed step is done (the Airflow DAG runs one step per task): it builds the run's index over 100 vectors of a random
tiny SigLIP. "Before" imports what the check imported before it (`pipelines.embed`, and the index client and the
catalog, which the entry point imported for its errors), then runs the same command line. Results go in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, print_ways, realistic_jpegs, timed_process  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint  # noqa: E402

WAYS = {  # what each process imports before the command line runs
    "before: the check beside the pipeline's imports": "import pipelines.embed, indexing, pipelines.catalog",
    "now: the check alone": "",
}
_COMMAND = """
import sys
{imports}
from pipelines.cli import main
rc = main(sys.argv[2:])
if rc != int(sys.argv[1]):
    sys.exit(f"exit code {{rc}}, not {{sys.argv[1]}}")
print(sorted(m for m in ("torch", "apache_beam", "PIL") if m in sys.modules))
"""
CASES = ("embed: a wrong flag value", "nightly: a wrong config value", "nightly --step index, the embed step done")


def _command(way: str, code: int, args: list[str]) -> tuple[float, str]:
    """One command line in a new process, `way`'s imports first: its wall seconds and the heavy modules it imported."""
    took, out = timed_process([sys.executable, "-c", _COMMAND.format(imports=WAYS[way]), str(code), *args])
    return took, out.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lookalike-config-check-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    imported: dict[tuple[int, str], str] = {}
    try:
        model = _checkpoint(work / "model", SHAPES["smoke"])
        realistic_jpegs(work / "photos", 100, width=160)
        config = work / "nightly.json"  # JSON is YAML
        settings = {"catalog": str(work / "photos" / "*.jpg"), "model": str(model), "out": str(work / "out"),
                    "interactions": "-", "embed": {"device": "cpu"}}  # fmt: skip
        config.write_text(json.dumps(settings))
        bad = work / "bad.json"
        bad.write_text(json.dumps({**settings, "embed": {"batch_size": -1}}))
        timed_process([str(Path(sys.executable).with_name("lookalike")), "nightly", "--config", str(config), "--step",
                       "embed", "--run-id", "embedded"])  # fmt: skip
        ledger = (work / "out" / "runs" / "embedded" / "ledger.jsonl").read_text()
        print(f"machine: {machine()}; {args.rounds} rounds, new processes")
        tasks = 0

        def run(case: int, way: str) -> tuple[float, str]:
            nonlocal tasks
            if case == 0:
                return _command(way, 2, ["embed", "--catalog", "c", "--model", "m", "--out", "o", "--batch-size", "-1"])
            if case == 1:
                return _command(way, 2, ["nightly", "--config", str(bad)])
            tasks += 1  # a run of its own whose ledger says its embed step is done, as the DAG's index task finds it
            run_id = f"task-{tasks}"
            (work / "out" / "runs" / run_id).mkdir(parents=True)
            (work / "out" / "runs" / run_id / "ledger.jsonl").write_text(ledger)
            done = _command(way, 0, ["nightly", "--config", str(config), "--run-id", run_id, "--step", "index"])
            if not (work / "out" / "snapshots" / run_id / "manifest.json").is_file():
                raise SystemExit(f"error: the index task {run_id} built no snapshot")
            return done

        for case in range(len(CASES)):
            run(case, next(iter(WAYS)))  # the page cache
            for _ in range(args.rounds):
                for way in WAYS:
                    took, modules = run(case, way)
                    seconds.setdefault((case, way), []).append(took)
                    imported[case, way] = modules
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for case, name in enumerate(CASES):
        print(f"\n{case}: `{name}`")
    print_ways(seconds, list(range(len(CASES))), WAYS, extra_headers=("torch, Beam, PIL imported",),
               extra=lambda n, way: [imported[n, way]], size_header="command")  # fmt: skip


if __name__ == "__main__":
    main()
