"""A stand-in for Beam's SDK worker in `pipelines.worker_fork`'s tests: prints where and how it runs, as one JSON
line, then sleeps `PROBE_SLEEP_S` and exits with `PROBE_EXIT`."""

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    print(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": argv,
        "probe": os.environ.get("PROBE"), "forked": os.environ.get("LOOKALIKE_FORKED_WORKER"),
        # Imported before this process began: the forker preloaded it (run as `-m`, it is `__main__` instead).
        "preloaded": __name__ != "__main__",
        "heavy_imported": "torch" in sys.modules,
        # A Beam worker's own set-up (`pipelines.worker_plugin.start_worker`), where the module is imported.
        "worker_set_up": "pipelines.worker_plugin" in sys.modules
        and sys.modules["pipelines.worker_plugin"]._BRIEF["runs"] > 0,
    }), flush=True)  # fmt: skip
    time.sleep(float(os.environ.get("PROBE_SLEEP_S", "0")))
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))


if __name__ == "__main__":
    main(sys.argv)
