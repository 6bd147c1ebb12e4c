"""`xray-pipeline demo`, the newcomer's first run, against the session's RGW (what `make demo` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.rgw, pytest.mark.model]


def test_demo_processes_all_validation_xrays(rgw: Any, tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    env = os.environ | rgw.env()
    env.pop("PSEUDONYM_KEY", None)
    done = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--out", str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line[:2].isdigit() and line[2:4] == "  "]
    assert len(rows) == 16
    assert "16 images;" in done.stdout
    for folder in ("input", "processed", "anonymized"):
        assert len(list((out / folder).glob("*.jpeg"))) == 16, folder
    # The table shows pseudonyms, never the patient-like keys the demo uploaded.
    assert "Mcgehee" not in done.stdout
