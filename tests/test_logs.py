"""The log set-up: one JSON object per line (or text), uvicorn's access log in the same format, probes and
metrics scrapes left out of it, and the libraries that log object keys held at WARNING."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import JsonLog, serving

from service.app import create_app
from service.logs import TEXT_FORMAT, configure_logging
from service.settings import Settings

ACCESS_MESSAGE = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access log call


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, access = logging.getLogger(), logging.getLogger("uvicorn.access")
    handlers, level, access_filters = root.handlers[:], root.level, access.filters[:]
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        access.filters[:] = access_filters


def access_record(path: str, method: str = "GET", status: int = 200) -> None:
    logging.getLogger("uvicorn.access").info(ACCESS_MESSAGE, "127.0.0.1:5000", method, path, "1.1", status)


def test_every_record_is_one_json_object_with_its_extra_fields(json_log: JsonLog) -> None:
    logger = logging.getLogger("service.test")
    logger.info("record %s: processed", "abc", extra={"pseudonym": "abc", "stages_ms": {"fetch": 1.5}})
    logger.warning("two\nlines")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    logging.getLogger("uvicorn.error").info("Started server", extra={"color_message": "\x1b[32mStarted\x1b[0m"})
    first, second, third, fourth = json_log.entries()
    assert first["level"] == "INFO" and first["logger"] == "service.test"
    assert first["message"] == "record abc: processed"
    assert first["pseudonym"] == "abc" and first["stages_ms"] == {"fetch": 1.5}
    assert next(iter(first)) == "timestamp" and first["timestamp"].endswith("+00:00")
    assert second["message"] == "two\nlines"  # still one line in the log
    assert third["level"] == "ERROR" and "ValueError: boom" in third["exc_info"]
    assert "color_message" not in fourth


def test_probes_and_scrapes_stay_out_of_the_access_log(json_log: JsonLog) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/metrics?name[]=xray_ready"):
        access_record(path)
    access_record("/", method="POST", status=422)
    [entry] = json_log.entries()
    assert entry["logger"] == "uvicorn.access"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/", 422)
    assert entry["message"] == '127.0.0.1:5000 - "POST / HTTP/1.1" 422'


def test_text_format_for_people(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "text", stream)
    logging.getLogger("service.test").info("hello %s", "there")
    access_record("/healthz")
    [line] = stream.getvalue().splitlines()
    assert line.endswith(" INFO service.test: hello there")
    assert TEXT_FORMAT.startswith("%(asctime)s")


def test_configured_twice_one_filter_and_key_leaking_libraries_held_at_warning(restore_logging: None) -> None:
    configure_logging("DEBUG", "json", io.StringIO())
    configure_logging("DEBUG", "json", io.StringIO())
    assert len(logging.getLogger("uvicorn.access").filters) == 1
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("service.pipeline").getEffectiveLevel() == logging.DEBUG


def test_log_format_setting() -> None:
    assert Settings(dev_mode=True).log_format == "json"
    assert Settings(dev_mode=True, log_format="TEXT").log_format == "text"


@pytest.mark.rgw
def test_real_uvicorn_logs_json_and_leaves_out_probes_and_scrapes(
    make_settings: Callable[..., Settings], json_log: JsonLog
) -> None:
    """As `serve` runs it: uvicorn with log_config=None, so its access log goes through the service's handler."""
    with serving(create_app(make_settings())) as url:
        base = url.rstrip("/")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert request(base + path) == 200
        assert request(base + "/", {"Service": "Amazon S3", "Event": "s3:TestEvent"}) == 200
        assert request(base + "/not-here") == 404
    entries = json_log.entries()  # every line, uvicorn's own included, is JSON
    access = [(entry["method"], entry["path"], entry["status"]) for entry in entries
              if entry["logger"] == "uvicorn.access"]
    assert access == [("POST", "/", 200), ("GET", "/not-here", 404)]
    assert any(entry["logger"] == "uvicorn.error" for entry in entries)




def request(url: str, body: Any = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)
