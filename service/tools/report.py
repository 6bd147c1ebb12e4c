"""The report of a `process` run: one row per input image (its pseudonym and what became of it, never its path),
saved as the run goes, so that it is also the resume state of folder outputs."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ConfigurationError
from service.files import write_atomically
from service.outputs import Outcome

logger = logging.getLogger(__name__)

REPORT_COLUMNS = ("pseudonym", "status", "reason", "label", "risk", "anonymized", "fingerprint")
#: How often a JSON report (rewritten whole, unlike a CSV one, which is appended to) is saved during a run.
_JSON_REPORT_EVERY_S = 1.0


@dataclass(frozen=True)
class ReportRow:
    """One image's line in the report: its pseudonym and what happened, nothing of its path."""

    pseudonym: str
    status: Outcome
    reason: str = ""
    label: str = ""
    risk: float | None = None
    #: The anonymized copy's name (`<pseudonym><ext>`) when there is one.
    anonymized: str = ""
    #: sha256 of the input file, or the input object's ETag: a rerun skips an input whose fingerprint is unchanged.
    fingerprint: str = ""

    def to_text(self) -> dict[str, str]:
        values = dataclasses.asdict(self) | {"risk": "" if self.risk is None else f"{self.risk:.6f}"}
        return {column: str(values[column]) for column in REPORT_COLUMNS}

    def to_json(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in REPORT_COLUMNS}

    @classmethod
    def parse(cls, values: dict[str, Any]) -> ReportRow | None:
        """A row read back from a report; None for one that is not whole (a run killed while writing it)."""
        try:
            risk = values.get("risk")
            return cls(
                pseudonym=str(values["pseudonym"]),
                status=Outcome(values["status"]),
                reason=str(values.get("reason") or ""),
                label=str(values.get("label") or ""),
                risk=None if risk in (None, "") else float(risk),
                anonymized=str(values.get("anonymized") or ""),
                fingerprint=str(values.get("fingerprint") or ""),
            )
        except (KeyError, TypeError, ValueError):
            return None


class Report:
    """The rows of a report file, the last row per pseudonym winning.

    It is the resume state of folder outputs, so rows are saved as they come: a CSV report is appended to and
    flushed per row; a JSON one is rewritten whole (atomically) every second. At the end the file is rewritten
    with one row per pseudonym. Rows of earlier runs for inputs not in this run are kept.
    """

    def __init__(self, path: Path | None, *, json_format: bool = False) -> None:
        self.path = path
        self.json_format = json_format if path is None else path.suffix.lower() == ".json"
        self.previous: dict[str, ReportRow] = {}
        self.rows: dict[str, ReportRow] = {}
        self._appender: io.TextIOWrapper | None = None
        self._saved_at = 0.0

    @staticmethod
    def check_suffix(path: Path) -> None:
        if path.suffix.lower() not in (".csv", ".json"):
            raise ConfigurationError("--report: the report file must end in .csv or .json")

    def open(self) -> Report:
        if self.path is None:
            return self
        if self.path.exists():
            self.previous = self._read(self.path)
            self.rows = dict(self.previous)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()  # also drops a half-written last line of a killed run before appending after it
        if not self.json_format:
            self._appender = self.path.open("a", newline="", encoding="utf-8")
        return self

    def add(self, row: ReportRow) -> None:
        self.rows[row.pseudonym] = row
        if self._appender is not None:
            csv.DictWriter(self._appender, REPORT_COLUMNS).writerow(row.to_text())
            self._appender.flush()
        elif self.path is not None and time.monotonic() - self._saved_at >= _JSON_REPORT_EVERY_S:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            write_atomically(self.path, self.render())
            self._saved_at = time.monotonic()

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        self.save()

    def render(self) -> bytes:
        if self.json_format:
            return (json.dumps([row.to_json() for row in self.rows.values()], indent=1) + "\n").encode()
        text = io.StringIO()
        writer = csv.DictWriter(text, REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(row.to_text() for row in self.rows.values())
        return text.getvalue().encode()

    def _read(self, path: Path) -> dict[str, ReportRow]:
        foreign = ConfigurationError("--report: the file exists and is not a report of `xray-pipeline process`")
        try:
            text = path.read_text(encoding="utf-8")
            if self.json_format:
                items = json.loads(text) if text.strip() else []
                if not isinstance(items, list):
                    raise foreign
            else:
                reader = csv.DictReader(io.StringIO(text))
                if text.strip() and tuple(reader.fieldnames or ()) != REPORT_COLUMNS:
                    raise foreign
                items = list(reader)
        except (OSError, UnicodeDecodeError, ValueError, csv.Error):
            raise foreign from None
        rows = [ReportRow.parse(item) if isinstance(item, dict) else None for item in items]
        return {row.pseudonym: row for row in rows if row is not None}
