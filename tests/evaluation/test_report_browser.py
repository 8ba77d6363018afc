"""The HTML report in a real browser: headless Chromium (Debian package) renders it and every image loads."""

from __future__ import annotations

import shutil
import subprocess

from evaluation.run import EvaluateConfig, run_evaluation

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Debian's chromium is needed for this test; `make test` installs it"
    return path


def test_report_renders_with_all_images(snapshots, demo_catalog, tmp_path):
    root, exact, reduced = snapshots
    run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(demo_catalog.interactions),
                                  baseline=str(root / reduced), catalog=str(demo_catalog.manifest),
                                  out=str(tmp_path / "eval"), bootstrap=100))  # fmt: skip
    page = f"file://{tmp_path / 'eval' / 'report.html'}"
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=5000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-ok="true"' in dom.stdout, "some report image failed to load"
    assert dom.stdout.count("<img") >= 20
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, *profile, "--window-size=1280,2000", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 50_000  # a rendered page with pictures, not a blank one
