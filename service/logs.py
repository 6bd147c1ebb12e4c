"""Logging for the service: one format, probes kept out of the access log, no library that logs object keys.

botocore, s3transfer and urllib3 log full request URLs (which contain object keys, i.e. patient names) at DEBUG,
so they are held at WARNING whatever LOG_LEVEL says.
"""

from __future__ import annotations

import logging

_KEY_LEAKING_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
_PROBE_PATHS = ("/healthz", "/readyz")


class _DropProbes(logging.Filter):
    """Health probes every few seconds would drown the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 3 and args[2] in _PROBE_PATHS)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for name in _KEY_LEAKING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").addFilter(_DropProbes())
