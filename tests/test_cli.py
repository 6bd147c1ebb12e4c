"""The command line: configuration errors stop `serve` before anything starts, naming the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"PSEUDONYM_KEY", "DEV_MODE", "MODEL_SPEC", "MODEL_URI"}}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=clean | env, capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_serve_without_pseudonym_key_fails_at_start() -> None:
    done = run("serve")
    assert done.returncode == 2
    assert "PSEUDONYM_KEY is required" in done.stderr


def test_serve_with_bad_variable_names_it() -> None:
    done = run("serve", PSEUDONYM_KEY="k" * 20, WORKERS="lots")
    assert done.returncode == 2 and "WORKERS:" in done.stderr
    done = run("serve", PSEUDONYM_KEY="k" * 20, MODEL_URI="/nope.yaml")
    assert done.returncode == 2 and "MODEL_URI: /nope.yaml does not exist" in done.stderr
    done = run("serve", PSEUDONYM_KEY="k" * 20, MODEL_SPEC="/nope.yaml")  # the old name still works
    assert done.returncode == 2 and "MODEL_URI: /nope.yaml does not exist" in done.stderr


def test_help_lists_the_commands() -> None:
    done = run("--help")
    assert done.returncode == 0
    # The usage line's choice list, not any mention in the prose: a removed command must fail this.
    listed = re.search(r"\{([a-z,-]+)\}", done.stdout)
    assert listed is not None, done.stdout
    assert set(listed.group(1).split(",")) == {
        "serve", "notify", "demo", "model", "process", "backfill", "replay", "events"
    }
    for command in listed.group(1).split(","):
        assert run(command, "--help").returncode == 0, f"{command} --help"
