"""Recorded deliveries: the raw `.http` files of `tests/events/`, captured from a real sink and replayed as sent.

A recording is one HTTP request exactly as the service would receive it: request line, headers, a blank line,
the body. `RecordingSink` is a tiny HTTP server that writes every request it gets as one such file (point a Ceph
topic or a KafkaSource at it); `replay` posts recordings to a running service with their headers preserved, so
users can build and replay their own sets. Notification JSON files (`.json`, as Ceph or AWS send them) replay as
plain pushes. Recordings hold object keys (patient names): they stay on disk where the user put them and are
never logged.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: Headers the transport recomputes for the replayed request.
_TRANSPORT_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
RECORDING_SUFFIXES = (".http", ".json")


class RecordingError(ValueError):
    """A file that is not a recording; the message names the file, never its content."""


@dataclass(frozen=True)
class Recording:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    #: Where it was read from (empty for a request just received).
    source: str = field(default="", compare=False)

    def replay_headers(self) -> dict[str, str]:
        return {name: value for name, value in self.headers if name.lower() not in _TRANSPORT_HEADERS}

    def to_bytes(self) -> bytes:
        head = [f"{self.method} {self.path} HTTP/1.1", *(f"{name}: {value}" for name, value in self.headers)]
        return ("\n".join(head) + "\n\n").encode("utf-8") + self.body


def parse_recording(data: bytes, source: str = "") -> Recording:
    """Parse a raw `.http` recording (LF or CRLF line ends in the head; the body is kept byte for byte)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, body = data.partition(separator)
        if found:
            break
    else:
        raise RecordingError(f"{source or 'recording'}: no blank line between the headers and the body")
    lines = head.decode("utf-8", errors="replace").splitlines()
    request_line = lines[0].split() if lines else []
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/"):
        raise RecordingError(f"{source or 'recording'}: the first line is not an HTTP request line")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise RecordingError(f"{source or 'recording'}: malformed header line")
        headers.append((name.strip(), value.strip()))
    return Recording(request_line[0], request_line[1], headers, body, source)


def notification_recording(data: bytes, source: str = "") -> Recording:
    """A bare notification document (`{"Records": [...]}`) as Ceph's plain HTTP push would post it."""
    try:
        document = json.loads(data)
    except ValueError:
        raise RecordingError(f"{source or 'notification'}: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("Records"), list):
        raise RecordingError(f"{source or 'notification'}: no Records list")
    return Recording("POST", "/", [("Content-Type", "application/json")], data, source)


def load_recordings(paths: list[Path]) -> list[Recording]:
    """Every recording in `paths` (files, or folders searched recursively), in name order within a folder."""
    recordings = []
    for path in paths:
        if not path.exists():
            raise RecordingError(f"{path}: no such file or folder")
        files = sorted(p for p in path.rglob("*") if p.suffix in RECORDING_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            data = file.read_bytes()
            if file.suffix == ".json":
                recordings.append(notification_recording(data, str(file)))
            else:
                recordings.append(parse_recording(data, str(file)))
    return recordings


@dataclass(frozen=True)
class ReplayResult:
    source: str
    status: int | None
    #: The service's JSON answer (pseudonyms and outcomes only), or the transport error.
    detail: Any


def replay(recordings: list[Recording], url: str, *, timeout_s: float = 330.0) -> Iterator[ReplayResult]:
    """Post each recording to `url` (its recorded path appended), one after the other, as it was sent."""
    base = url.rstrip("/")
    with httpx.Client(timeout=timeout_s) as client:
        for recording in recordings:
            try:
                response = client.request(
                    recording.method, base + recording.path, headers=recording.replay_headers(),
                    content=recording.body,
                )
            except httpx.HTTPError as error:
                yield ReplayResult(recording.source, None, f"{type(error).__name__}: {error}")
                continue
            try:
                detail: Any = response.json()
            except ValueError:
                detail = response.text[:200]
            yield ReplayResult(recording.source, response.status_code, detail)


class RecordingSink:
    """An HTTP server that answers 200 to every POST and writes it as `<prefix>-NNNN.http` in `folder`.

    Point a Ceph topic (`xray-pipeline notify create --endpoint http://HOST:PORT/`) or a KafkaSource sink at it.
    """

    def __init__(self, folder: Path, *, host: str = "127.0.0.1", port: int = 0, prefix: str = "delivery") -> None:
        self.folder = folder
        self.prefix = prefix
        self.recorded: list[Path] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        folder.mkdir(parents=True, exist_ok=True)
        # Numbering continues after what the folder holds, so a restarted sink adds to a set.
        numbers = [path.stem.rsplit("-", 1)[-1] for path in folder.glob(f"{prefix}-*.http")]
        self._next_number = 1 + max((int(number) for number in numbers if number.isdigit()), default=0)
        self._server = http.server.ThreadingHTTPServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> RecordingSink:
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> RecordingSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout_s: float | None) -> list[Path]:
        """Block until `count` deliveries are recorded (or `timeout_s` passes); returns what was recorded."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.recorded) >= count, timeout=timeout_s)
            return list(self.recorded)

    def _save(self, recording: Recording) -> Path:
        with self._arrived:
            path = self.folder / f"{self.prefix}-{self._next_number:04d}.http"
            self._next_number += 1
            # Exclusive creation: never overwrite a recording already there.
            with path.open("xb") as file:
                file.write(recording.to_bytes())
            self.recorded.append(path)
            self._arrived.notify_all()
            return path

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = self._read_chunked()
                    # Recorded as the body it carried, so a replay sends it with a Content-Length.
                    headers = [(n, v) for n, v in self.headers.items() if n.lower() != "transfer-encoding"]
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length > 0 else b""
                    headers = list(self.headers.items())
                sink._save(Recording(self.command, self.path, headers, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _read_chunked(self) -> bytes:
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)

            do_POST = do_PUT = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass  # request lines carry nothing secret, but bodies do: keep the sink quiet

        return Handler
