"""The Airflow DAG loads in a real Airflow (its own environment: its pins clash with Beam's, e.g. protobuf 7)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-airflow"
REQUIREMENTS = ROOT / "requirements-airflow.txt"

_LOAD = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("lookalike_nightly")
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "tasks": [t.task_id for t in dag.topological_sort()] if dag else [],
    "commands": {t.task_id: t.bash_command for t in dag.tasks} if dag else {},
    "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
    "timeouts_s": {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks} if dag else {},
    "max_active_runs": dag.max_active_runs if dag else None,
}))
"""


def _airflow_python() -> Path:
    """`.venv-airflow` with requirements-airflow.txt, made once and remade when the pins change."""
    stamp = VENV / ".requirements-sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    python = VENV / "bin" / "python"
    if not (python.exists() and stamp.exists() and stamp.read_text() == digest):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                        str(REQUIREMENTS)], check=True, timeout=900)  # fmt: skip
        stamp.write_text(digest)
    return python


def test_dag_loads_with_one_task_per_step(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "LOOKALIKE_CONFIG": "/srv/night jobs/nightly.yaml"}
    done = subprocess.run([str(_airflow_python()), "-c", _LOAD, str(ROOT / "pipelines" / "airflow_dag.py")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    dag = json.loads(done.stdout.strip().splitlines()[-1])
    assert dag["errors"] == {}
    assert dag["tasks"] == ["embed", "index", "evaluate", "publish", "retention"]
    for step, command in dag["commands"].items():
        assert (
            command
            == f"lookalike nightly --config '/srv/night jobs/nightly.yaml' --run-id nightly-{{{{ ds_nodash }}}} --step {step}"
        )
    assert all(r >= 1 for r in dag["retries"].values()) and dag["timeouts_s"]["embed"] == 6 * 3600
    assert dag["max_active_runs"] == 1
