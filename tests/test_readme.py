"""The README's operator-tools example runs as written: its shell block, executed by bash from the repository root.

Only what a test must not share with a person's own session is changed: the RGW's folder, the output folder and
the two ports (free loopback ports instead of 8090 and 8091). The block uses the default model (`make model`), a
throwaway RGW it starts and stops itself, and the tools as installed in `.venv`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port

README = ROOT / "README.md"
DEFAULT_MODEL = ROOT / "model" / ".cache" / "pneumonia" / "pneumonia_xception.keras"

pytestmark = pytest.mark.rgw


def section_block(title: str) -> str:
    """The first ```sh block of the README section `## <title>`."""
    text = README.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, f"no sh block in the README section {title!r}"
    return found.group(1)




def test_operator_tools_example_runs_as_written(tmp_path: Path) -> None:
    assert DEFAULT_MODEL.exists(), "the example needs the default model: run `make model`"
    script = section_block("Operator tools")
    replacements = {
        ".rgw/dev": str(tmp_path / "rgw"),
        "/tmp/xray-tools": str(tmp_path / "tools"),
        "8090": str(free_port()),
        "8091": str(free_port()),
    }
    for written, used in replacements.items():
        assert written in script, f"the README example no longer uses {written}: update this test"
        script = script.replace(written, used)
    rgw_dir = replacements[".rgw/dev"]
    environment = {name: value for name, value in os.environ.items()
                   if name not in {"PSEUDONYM_KEY", "DEV_MODE", "MODEL_URI", "MODEL_SPEC", "S3_ENDPOINT_URL"}}
    # Its own session: whatever the block leaves behind (a recorder, a server) is killed with the group. Output to
    # a file, not a pipe: a daemon holding a pipe open would keep a reader waiting.
    log_path = tmp_path / "example.log"
    with log_path.open("w") as log:
        shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=environment,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            shell.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
            # The block stops its RGW as its last line; after a failure midway this does it.
            subprocess.run([sys.executable, str(ROOT / "tests" / "local_rgw.py"), "stop", "--dir", rgw_dir],
                           capture_output=True, timeout=120)
    output = log_path.read_text()
    tail = output[-4000:]
    assert shell.returncode == 0, tail
    for expected in (
        "process: 16 image(s): 16 processed, 0 skipped, 0 failed",
        "process: 16 image(s): 0 processed, 16 skipped, 0 failed",
        "backfill: 32 object(s) (dry run): 32 would-process",
        "backfill: 16 object(s): 16 processed",
        "backfill: 16 object(s): 16 emitted",
        "recorded 16 delivery(ies)",
        "replayed 16 recording(s), 0 not answered 2xx",
        "backfill: 32 object(s): 32 skipped",
    ):
        assert expected in output, f"{expected!r} not in the example's output:\n{tail}"
    assert (tmp_path / "tools" / "local" / "report.csv").exists()
    assert (tmp_path / "tools" / "run-1.json").exists()
