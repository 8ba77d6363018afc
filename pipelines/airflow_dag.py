"""Airflow DAG: lookalike's nightly job, one task per step (embed → index → evaluate → publish → retention).

Copy (or symlink) this file into the DAGs folder of an Airflow 3 deployment whose workers
have lookalike installed. Each task runs

    lookalike nightly --config $LOOKALIKE_CONFIG --run-id nightly-<ds_nodash> --step <step>

so every task of one DAG run shares the run id, and the ledger makes each task do only
its own step: a retried task resumes its step, never an earlier one. A losing candidate
fails the `evaluate` task (exit 1), so `publish` never runs and LATEST keeps serving.
Airflow is not a dependency of lookalike; a test loads this file in an isolated Airflow.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

# Quoted for the task's shell: a path with a space (or a `$`) stays one argument.
CONFIG = shlex.quote(os.environ.get("LOOKALIKE_CONFIG", "/etc/lookalike/nightly.yaml"))
LOOKALIKE = shlex.quote(os.environ.get("LOOKALIKE_BIN", "lookalike"))

# Per-step time limits (the job's SLA in Airflow 3 terms) and retries: storage and
# preemption failures deserve retries; a gate failure does not change on a retry.
STEPS = {
    "embed": (timedelta(hours=6), 2),
    "index": (timedelta(hours=2), 2),
    "evaluate": (timedelta(hours=1), 1),
    "publish": (timedelta(minutes=15), 3),
    "retention": (timedelta(minutes=15), 3),
}

with DAG(
    dag_id="lookalike_nightly",
    description="Embed the catalog, index it, evaluate against what is served, publish if it wins.",
    schedule="15 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # the run lock would stop a second one anyway; this keeps it from queueing
    dagrun_timeout=timedelta(hours=10),
    default_args={
        "owner": "lookalike",
        "retry_delay": timedelta(minutes=10),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(hours=1),
    },
    tags=["lookalike", "recommendations"],
) as dag:
    previous = None
    for step, (timeout, retries) in STEPS.items():
        task = BashOperator(
            task_id=step,
            bash_command=f"{LOOKALIKE} nightly --config {CONFIG} --run-id nightly-{{{{ ds_nodash }}}} --step {step}",
            execution_timeout=timeout,
            retries=retries,
        )
        if previous is not None:
            previous >> task
        previous = task
