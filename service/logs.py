"""Logging for the service: one JSON object per line (or text for people), probes and scrapes kept out of the access
log, no library that logs object keys.

Every record, uvicorn's access log included, goes through the one handler `configure_logging` installs; extra
fields a caller passes (`logger.info(..., extra={...})`) become fields of the JSON object. botocore, s3transfer
and urllib3 log full request URLs (which contain object keys, i.e. patient names) at DEBUG, so they are held at
WARNING whatever LOG_LEVEL says.
"""

from __future__ import annotations

import logging
from typing import IO, Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

_KEY_LEAKING_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
#: Requests too frequent and too uneventful for the access log: Kubernetes probes and Prometheus scrapes.
_QUIET_PATHS = ("/healthz", "/readyz", "/metrics")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The argument count of uvicorn's access log call: client, method, path, HTTP version, status.
_ACCESS_ARGS = 5


class _AccessLogFilter(logging.Filter):
    """Drops probes and scrapes (every few seconds, they would drown the access log); gives the other access
    records their request as fields (method, path, status), so the JSON log need not be parsed back from text."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == _ACCESS_ARGS):
            return True
        client, method, path, _, status = args
        if str(path).partition("?")[0] in _QUIET_PATHS:
            return False
        record.client, record.method, record.path, record.status = client, method, path, status
        return True


class JsonLinesFormatter(JsonFormatter):
    """`{"timestamp", "level", "logger", "message", ...extra fields}` on one line per record."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            # uvicorn adds a copy of some messages with terminal colour codes.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            timestamp=True,
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # The time first, as in every other log line people read.
        return {"timestamp": log_data.pop("timestamp"), **log_data}


def configure_logging(level: str, log_format: Literal["json", "text"] = "json", stream: IO[str] | None = None) -> None:
    """Route every logger through one handler on `stream` (stderr by default) in `log_format`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in _KEY_LEAKING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    for installed in [found for found in access.filters if isinstance(found, _AccessLogFilter)]:
        access.removeFilter(installed)  # configured again (tests): one filter is enough
    access.addFilter(_AccessLogFilter())
