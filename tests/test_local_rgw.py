"""The local Ceph RGW that other tests run against: S3 with awkward keys, topics and HTTP push
notifications, two clusters side by side, the detached CLI, and no process left behind."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from local_rgw import LocalRGW, RGWError, has_exited

pytestmark = pytest.mark.rgw

LOCAL_RGW_SCRIPT = Path(__file__).with_name("local_rgw.py")
# Space, plus, a literal percent escape and non-ASCII: every way a key gets mangled by en-/decoding.
AWKWARD_KEY = "a b+c%20d/Ærø.jpg"


@contextlib.contextmanager
def push_receiver() -> Iterator[tuple[str, queue.Queue[dict[str, Any]]]]:
    """An HTTP endpoint on loopback that queues every notification record POSTed to it."""
    records: queue.Queue[dict[str, Any]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            for record in json.loads(body)["Records"]:
                records.put(record)
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", records
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_s3_topics_and_http_push_then_stop_leaves_no_process(tmp_path: Path) -> None:
    rgw = LocalRGW(tmp_path / "rgw")
    with push_receiver() as (push_url, records), rgw:
        assert rgw.env() == {
            "S3_ENDPOINT_URL": rgw.endpoint_url,
            "AWS_ACCESS_KEY_ID": rgw.access_key,
            "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
            "AWS_DEFAULT_REGION": "default",
        }
        s3, sns = rgw.s3_client(), rgw.sns_client()
        try:
            s3.create_bucket(Bucket="images")
            s3.put_object(Bucket="images", Key=AWKWARD_KEY, Body=b"pixels")
            assert s3.get_object(Bucket="images", Key=AWKWARD_KEY)["Body"].read() == b"pixels"
            assert [obj["Key"] for obj in s3.list_objects_v2(Bucket="images")["Contents"]] == [AWKWARD_KEY]

            topic_arn = sns.create_topic(
                Name="uploads", Attributes={"push-endpoint": push_url, "persistent": "false"}
            )["TopicArn"]
            s3.put_bucket_notification_configuration(
                Bucket="images",
                NotificationConfiguration={
                    "TopicConfigurations": [
                        {"Id": "on-upload", "TopicArn": topic_arn, "Events": ["s3:ObjectCreated:*"]}
                    ]
                },
            )
            [config] = s3.get_bucket_notification_configuration(Bucket="images")["TopicConfigurations"]
            assert (config["Id"], config["TopicArn"], config["Events"]) == (
                "on-upload",
                topic_arn,
                ["s3:ObjectCreated:*"],
            )

            # A non-persistent topic pushes inside the PUT, so the record is there when put_object returns.
            s3.put_object(Bucket="images", Key=AWKWARD_KEY, Body=b"new pixels")
            record = records.get(timeout=10)
            assert record["s3"]["bucket"]["name"] == "images"
            assert record["s3"]["object"]["key"] == AWKWARD_KEY  # Ceph sends the raw key, not encoded
        finally:
            s3.close()
            sns.close()
        pids = list(rgw.pids().values())
        assert len(pids) == 3

    assert rgw.pids() == {}
    assert [pid for pid in pids if not has_exited(pid)] == []
    rgw.stop()  # idempotent


def test_two_clusters_side_by_side_one_detached_by_the_cli(tmp_path: Path) -> None:
    cli_dir = tmp_path / "cli"
    with LocalRGW(tmp_path / "lib") as in_process:
        started = run_cli("start", "--dir", str(cli_dir))
        detached_pids = [int(pid_file.read_text()) for pid_file in (cli_dir / "pids").glob("*.pid")]
        try:
            assert started.returncode == 0, started.stderr
            assert (cli_dir / "env.sh").read_text() == started.stdout
            detached_env = dict(
                line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
            )
            assert detached_env["S3_ENDPOINT_URL"] != in_process.endpoint_url
            assert len(detached_pids) == 3
            assert not any(has_exited(pid) for pid in detached_pids)

            # The same bucket name in both proves they are separate clusters.
            with (
                contextlib.closing(in_process.s3_client()) as own,
                contextlib.closing(s3_client_from_env(detached_env)) as other,
            ):
                for s3, body in ((own, b"in-process"), (other, b"detached")):
                    s3.create_bucket(Bucket="shared-name")
                    s3.put_object(Bucket="shared-name", Key="who", Body=body)
                assert own.get_object(Bucket="shared-name", Key="who")["Body"].read() == b"in-process"
                assert other.get_object(Bucket="shared-name", Key="who")["Body"].read() == b"detached"
        finally:
            stopped = run_cli("stop", "--dir", str(cli_dir))
        assert stopped.returncode == 0, stopped.stderr
        assert [pid for pid in detached_pids if not has_exited(pid)] == []

        # Stopping the other cluster left this one alone.
        assert not any(has_exited(pid) for pid in in_process.pids().values())
        with contextlib.closing(in_process.s3_client()) as own:
            assert [bucket["Name"] for bucket in own.list_buckets()["Buckets"]] == ["shared-name"]


def test_failed_boot_raises_with_the_daemon_log_and_leaves_no_process(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        rgw = LocalRGW(tmp_path / "busy", port=squatter.getsockname()[1])
        with pytest.raises(RGWError, match=r"(?s)client\.rgw\.xray exited.*Address already in use"):
            rgw.start(timeout=30)
    assert rgw.pids() == {}
    assert processes_using(rgw.conf_path) == []


def processes_using(conf_path: Path) -> list[int]:
    """Live pids whose command line names `conf_path`, whoever started them."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and not has_exited(int(proc.name)):
            with contextlib.suppress(OSError):
                if str(conf_path).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
    return pids


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LOCAL_RGW_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def s3_client_from_env(env: dict[str, str]) -> Any:
    """An S3 client built only from exported variables, as a consumer of env.sh would build it."""
    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, proxies={}),
    )
