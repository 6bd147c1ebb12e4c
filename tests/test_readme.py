"""The documentation stays honest: the README is an entry page (small, its links lead somewhere), and the
operator-tools example in docs/operator-tools.md runs as written, its shell block executed by bash from the
repository root.

For the example, only what a test must not share with a person's own session is changed: the RGW's folder, the
output folder and the two ports (free loopback ports instead of 8090 and 8091). The block uses the default model
(`make model`), a throwaway RGW it starts and stops itself, and the tools as installed in `.venv`.
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
from conftest import MODEL_DIR, ROOT, free_port

README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPERATOR_TOOLS = DOCS / "operator-tools.md"
DEFAULT_MODEL = MODEL_DIR / "pneumonia_xception.keras"
README_LIMIT_BYTES = 10_000
# Pages whose relative links are checked: the README, docs/, and the READMEs it hands the depth to.
LINKED_PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "model" / "README.md", ROOT / "bench" / "README.md"]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def section_block(page: Path, title: str) -> str:
    """The first ```sh block of the section `## <title>` of a markdown page."""
    text = page.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, f"no sh block in the section {title!r} of {page.relative_to(ROOT)}"
    return found.group(1)


def prose(markdown: str) -> str:
    """The text outside fenced code blocks: links and headings in code are not links and headings."""
    return FENCE.sub("", markdown)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation except '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page, repeated headings numbered as GitHub does (`x`, `x-1`, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(prose(page.read_text())):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(page.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)]


def test_github_slug_follows_githubs_rules() -> None:
    assert github_slug("The same with `kn`") == "the-same-with-kn"
    assert github_slug("6. Upload the model (MODEL_URI)") == "6-upload-the-model-model_uri"
    assert github_slug("Measured accuracy (16 validation X-rays shipped in the wheel)") == (
        "measured-accuracy-16-validation-x-rays-shipped-in-the-wheel")
    assert github_slug("Without Rook's notification CRDs: `xray-pipeline notify`") == (
        "without-rooks-notification-crds-xray-pipeline-notify")


def test_readme_is_an_entry_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes: move depth to docs/ (limit {README_LIMIT_BYTES})"
    # A newcomer's first lines: the two commands, then what they install.
    text = README.read_text()
    assert text.startswith("# xray-pipeline\n\n```sh\nmake demo ")
    assert "\nmake test " in text.split("```", 2)[1]
    assert text.split("```", 2)[2].lstrip("\n").startswith("Both commands install what they need")


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert page.exists(), page
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_docs_pages_say_what_they_cover() -> None:
    pages = sorted(DOCS.glob("*.md"))
    assert pages
    for page in pages:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip(), (
            f"{page.relative_to(ROOT)}: start with a one-line H1, then a sentence saying what the page covers")
        assert f"](docs/{page.name})" in README.read_text(), f"README.md does not link docs/{page.name}"


@pytest.mark.rgw
def test_operator_tools_example_runs_as_written(tmp_path: Path) -> None:
    assert DEFAULT_MODEL.exists(), "the example needs the default model: run `make model`"
    script = section_block(OPERATOR_TOOLS, "Example")
    replacements = {
        ".rgw/dev": str(tmp_path / "rgw"),
        "/tmp/xray-tools": str(tmp_path / "tools"),
        "8090": str(free_port()),
        "8091": str(free_port()),
    }
    for written, used in replacements.items():
        assert written in script, f"the operator-tools example no longer uses {written}: update this test"
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
