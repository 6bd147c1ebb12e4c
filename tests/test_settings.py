"""Settings: the documented variables, their defaults, and start-up errors that name the variable."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import DEFAULT_SPEC

from service.errors import ConfigurationError
from service.settings import Settings, load_settings

KEY = "k" * 32


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["S3_ENDPOINT_URL", "service_point", "SERVICE_POINT", "PSEUDONYM_KEY", "DEV_MODE", "INPUT_BUCKETS",
                 "PROCESSED_BUCKET", "ANONYMIZED_BUCKET", "MODEL_SPEC", "MODEL_URI", "MODEL_SHA256", "MODEL_CACHE_DIR",
                 "WORKERS", "PORT", "ANONYMIZE_WHEN", "BATCH_WAIT_POLICY", "DICOM_OUTPUT_SYNTAX"]:
        monkeypatch.delenv(name, raising=False)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    settings = load_settings()
    assert settings.port == 8080
    assert settings.anonymize_when == "positive"
    assert settings.batch_wait_policy == "adaptive"
    assert settings.dicom_output_syntax == "source"
    assert settings.processed_bucket_for("xray") == "xray-processed"
    assert settings.anonymized_bucket_for("xray") == "xray-anonymized"
    assert Path(settings.model_uri).name == "pneumonia.yaml"
    assert settings.model_sha256 is None
    assert settings.model_cache_dir == Path(tempfile.gettempdir()) / "xray-pipeline-models"


def test_service_point_is_accepted_as_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("service_point", "http://rgw:8080")
    assert load_settings().s3_endpoint_url == "http://rgw:8080"


def test_pseudonym_key_required_unless_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="PSEUDONYM_KEY is required"):
        load_settings()
    monkeypatch.setenv("DEV_MODE", "true")
    assert load_settings().effective_pseudonym_key


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("S3_ENDPOINT_URL", "rgw:8080", "S3_ENDPOINT_URL: must start with http"),
        ("PORT", "http", "PORT:"),
        ("WORKERS", "0", "WORKERS:"),
        ("ANONYMIZE_WHEN", "sometimes", "ANONYMIZE_WHEN:"),
        ("BATCH_WAIT_POLICY", "eager", "BATCH_WAIT_POLICY: Input should be 'adaptive' or 'fixed'"),
        ("DICOM_OUTPUT_SYNTAX", "jpeg-lossy", "DICOM_OUTPUT_SYNTAX: Input should be 'source', 'explicit', 'rle'"),
        ("MODEL_URI", "/nonexistent/spec.yaml", "MODEL_URI: /nonexistent/spec.yaml does not exist"),
        ("MODEL_SPEC", "/nonexistent/spec.yaml", "/nonexistent/spec.yaml does not exist"),
        ("MODEL_URI", "s3://models", "MODEL_URI: s3://models must name an object: s3://bucket/key"),
        ("MODEL_URI", "s3://models/", "MODEL_URI: s3://models/ must name an object"),
        ("MODEL_URI", "s3:///spec.yaml", "MODEL_URI: s3:///spec.yaml must name an object"),
        ("MODEL_URI", "s3://models/v3/", "MODEL_URI: s3://models/v3/ must name an object"),
        ("MODEL_URI", "https://models/spec.yaml", "MODEL_URI: https://models/spec.yaml: only a local path or s3://"),
        ("MODEL_SHA256", "abc123", "MODEL_SHA256: must be a sha256 digest"),
        ("MODEL_SHA256", "g" * 64, "MODEL_SHA256: must be a sha256 digest"),
        ("PSEUDONYM_KEY", "short", "PSEUDONYM_KEY must be at least 16"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert message in str(raised.value)


def test_batch_wait_policy_and_dicom_output_syntax_are_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("BATCH_WAIT_POLICY", "Fixed")
    monkeypatch.setenv("DICOM_OUTPUT_SYNTAX", "JPEG-LS")
    settings = load_settings()
    assert (settings.batch_wait_policy, settings.dicom_output_syntax) == ("fixed", "jpeg-ls")


def test_model_uri_accepts_s3_and_the_old_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("MODEL_URI", "s3://models/pneumonia/v3/pneumonia.yaml")
    # Not checked at start-up beyond its form: the object is fetched when the app is built.
    assert load_settings().model_uri == "s3://models/pneumonia/v3/pneumonia.yaml"
    monkeypatch.delenv("MODEL_URI")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x")
    monkeypatch.setenv("MODEL_SPEC", str(spec))
    assert load_settings().model_uri == str(spec)
    # An image may set the old name as its default; a deployment's MODEL_URI wins over it.
    monkeypatch.setenv("MODEL_URI", "s3://models/v4/spec.yaml")
    assert load_settings().model_uri == "s3://models/v4/spec.yaml"


def test_model_sha256_is_normalised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("MODEL_SHA256", " " + "AB" * 32 + " ")
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MODEL_URI", str(DEFAULT_SPEC))  # the default model is not in that empty cache
    settings = load_settings()
    assert settings.model_sha256 == "ab" * 32
    assert settings.model_cache_dir == tmp_path / "cache"
    monkeypatch.setenv("MODEL_SHA256", "")
    assert load_settings().model_sha256 is None


def test_output_bucket_equal_to_an_input_bucket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("INPUT_BUCKETS", "scans, more")
    monkeypatch.setenv("PROCESSED_BUCKET", "scans")
    with pytest.raises(ConfigurationError, match="INPUT_BUCKETS must not contain an output bucket"):
        load_settings()
    monkeypatch.setenv("PROCESSED_BUCKET", "out")
    monkeypatch.setenv("ANONYMIZED_BUCKET", "out")
    with pytest.raises(ConfigurationError, match="must differ"):
        load_settings()


def test_loop_guard_recognises_output_buckets() -> None:
    default = Settings(pseudonym_key=KEY)
    assert default.is_output_bucket("xray-processed") and default.is_output_bucket("xray-anonymized")
    assert not default.is_output_bucket("xray")
    explicit = Settings(pseudonym_key=KEY, processed_bucket="done", anonymized_bucket="anon")
    assert explicit.is_output_bucket("done") and explicit.is_output_bucket("anon")
    assert not explicit.is_output_bucket("xray-processed")


def test_every_setting_is_documented() -> None:
    table = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name.upper()}` |" in table, f"{name.upper()} is not in the table of docs/configuration.md"


def test_available_cpus_respects_a_container_cpu_limit(tmp_path: Path) -> None:
    import os

    from service.settings import available_cpus

    machine = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == machine  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == machine
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1  # half a CPU still gets one thread
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path) == machine
