"""`xray-pipeline process`: the service's analysis on folders and S3 prefixes with no server, against the real RGW
and real workers (tiny model): outputs, the report, reruns that skip, a real Ctrl-C, and privacy of what it prints."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import string
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PSEUDONYM_KEY, encode, interrupted, key_fragments, upload, wait_until, xray_like
from dicom_factory import Patient, make_dicom, make_no_pixels, new_study, phi_values, read
from dicom_inputs import FOLDER, NOT_ASSESSED, assert_deidentified, chest_model, study_files

from service.cli import main
from service.outputs import NOT_ASSESSED_REASON_CODE, processed_key, pseudonym
from service.tools.process import LOCAL_BUCKET, FolderOutput, plan_sources

pytestmark = pytest.mark.rgw

SECRET = TEST_PSEUDONYM_KEY.encode()
BRIGHT, DARK = 220, 30
# Hostile file names: spaces, '+', '%', non-ASCII, patient-like names and dates; folders too.
CORRUPT = "corrupt/Zoë Ünal 100%25+1960-01-01.jpeg"
SPECIAL = {
    "Jürgen Groß/Ærø øre ünïcødé 1949-12-31.png": BRIGHT,
    "scans/Mary+Ann O'Neil 100%25 2001-02-03.JPG": DARK,
}


def make_folder(root: Path, count: int) -> dict[str, int]:
    """`count` small X-ray-like images (alternately bright and dark) plus the hostile names; relative path ->
    brightness. A corrupt image and a text file are written too."""
    images = {f"ward 7/Anna Mcgehee_1941-11-26 scan {index:02d}.jpeg": BRIGHT if index % 2 else DARK
              for index in range(count)} | SPECIAL
    for relative, brightness in images.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(xray_like(brightness, size=(200, 160), seed=len(relative)), path.suffix.lower()))
    (root / CORRUPT).parent.mkdir(parents=True, exist_ok=True)
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 these bytes are no JPEG")
    (root / "ward 7" / "notes about Anna Mcgehee.txt").write_text("not an image: ignored")
    return images


def read_report(path: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    return {row["pseudonym"]: row for row in rows}


def alias(relative: str) -> str:
    return pseudonym(SECRET, LOCAL_BUCKET, relative)


def fragments(names: list[str]) -> list[str]:
    """Identifying pieces of file names; pure hex pieces are left out (they may occur in any digest)."""
    pieces = {piece for name in names for piece in key_fragments(name)}
    return sorted(piece for piece in pieces if not set(piece.lower()) <= set(string.hexdigits.lower()))


def assert_private(texts: list[str], names: list[str]) -> None:
    for text in texts:
        for piece in fragments(names):
            assert piece not in text


def output_files(out: Path) -> dict[str, int]:
    return {str(path.relative_to(out)): path.stat().st_mtime_ns
            for path in out.rglob("*") if path.is_file() and path.name != "report.csv"}


def test_folder_is_processed_reported_privately_and_a_rerun_skips_everything(
    tool_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    folder, out = tmp_path / "in", tmp_path / "out"
    images = make_folder(folder, 24)

    assert main(["process", str(folder), "--out", str(out)]) == 1  # the corrupt file fails the run, not others

    report_text = (out / "report.csv").read_text(encoding="utf-8")
    rows = read_report(out / "report.csv")
    assert len(rows) == len(images) + 1
    for relative, brightness in images.items():
        row = rows[alias(relative)]
        assert (row["status"], row["label"]) == ("processed", "Pneumonia" if brightness == BRIGHT else "Normal")
        assert (out / "processed" / processed_key(relative)).is_file()
        anonymized = out / "anonymized" / row["anonymized"]
        if brightness == BRIGHT:
            assert row["anonymized"] == alias(relative) + Path(relative).suffix.lower() and anonymized.is_file()
            assert float(row["risk"]) > 0.99
        else:
            assert row["anonymized"] == "" and float(row["risk"]) < 0.01
    assert rows[alias(CORRUPT)]["status"] == "failed" and rows[alias(CORRUPT)]["reason"] == "not-an-image"
    assert len(list((out / "anonymized").iterdir())) == sum(b == BRIGHT for b in images.values())
    assert not list(out.rglob(".xray-partial-*"))
    captured = capsys.readouterr()
    assert f"{len(images)} processed, 0 skipped, 1 failed" in captured.err
    names = [*images, CORRUPT]
    assert_private([report_text, captured.out, captured.err, caplog.text], names)

    # Unchanged inputs: nothing is written again, every row says so.
    before = output_files(out)
    assert main(["process", str(folder), "--out", str(out)]) == 1
    assert output_files(out) == before
    rows = read_report(out / "report.csv")
    assert len(rows) == len(images) + 1
    assert {row["status"] for pseudonym_, row in rows.items() if pseudonym_ != alias(CORRUPT)} == {"skipped"}
    assert {row["reason"] for row in rows.values()} == {"already-processed", "not-an-image"}
    assert f"0 processed, {len(images)} skipped, 1 failed" in capsys.readouterr().err

    # A changed input (dark -> bright) is processed again, and only it.
    changed = "ward 7/Anna Mcgehee_1941-11-26 scan 00.jpeg"
    (folder / changed).write_bytes(encode(xray_like(BRIGHT, size=(200, 160), seed=99)))
    assert main(["process", str(folder), "--out", str(out)]) == 1
    rows = read_report(out / "report.csv")
    assert (rows[alias(changed)]["status"], rows[alias(changed)]["label"]) == ("processed", "Pneumonia")
    assert (out / "anonymized" / f"{alias(changed)}.jpeg").is_file()
    after = output_files(out)
    assert after.pop(str(Path("processed") / processed_key(changed))) != before.pop(
        str(Path("processed") / processed_key(changed)))
    assert after.pop(str(Path("anonymized") / f"{alias(changed)}.jpeg"))
    assert after == before
    assert f"1 processed, {len(images) - 1} skipped, 1 failed" in capsys.readouterr().err


def test_ctrl_c_leaves_only_complete_outputs_and_the_rerun_finishes_the_rest(
    tool_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    images = make_folder(folder, 24)
    (folder / CORRUPT).unlink()
    report = out / "report.csv"
    # One image per batch: the run lasts long enough to be interrupted in the middle.
    env = os.environ | {"BATCH_MAX_SIZE": "1"}
    returncode, stdout, stderr = interrupted(
        ["process", str(folder), "--out", str(out), "--progress"], env=env, what="no image was processed",
        once=lambda: report.exists() and len(report.read_text(encoding="utf-8").splitlines()) > 3,
    )
    assert returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    assert_private([stdout, stderr], list(images))

    assert not list(out.rglob(".xray-partial-*"))
    done = read_report(report)
    assert 3 <= len(done) < len(images)
    by_alias = {alias(relative): relative for relative in images}
    for row in done.values():
        assert row["status"] == "processed"
        assert (out / "processed" / processed_key(by_alias[row["pseudonym"]])).is_file()
        assert not row["anonymized"] or (out / "anonymized" / row["anonymized"]).is_file()

    assert main(["process", str(folder), "--out", str(out)]) == 0
    rows = read_report(report)
    assert len(rows) == len(images)
    statuses = [row["status"] for row in rows.values()]
    assert statuses.count("skipped") == len(done) and statuses.count("processed") == len(images) - len(done)
    assert all((out / "processed" / processed_key(relative)).is_file() for relative in images)
    assert f"{len(images) - len(done)} processed, {len(done)} skipped, 0 failed" in capsys.readouterr().err


def test_s3_prefix_in_s3_prefix_out_with_a_json_report(
    tool_env: dict[str, str], rgw: Any, s3: Any, input_bucket: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = {f"ward 7/Anna Mcgehee+{index} 100%.jpeg": BRIGHT if index % 2 else DARK for index in range(6)}
    etags = {key: upload(s3, input_bucket, key, encode(xray_like(value, size=(200, 160), seed=index)))
             for index, (key, value) in enumerate(keys.items())}
    upload(s3, input_bucket, "other ward/Not Selected.jpeg", encode(xray_like(BRIGHT, size=(200, 160))))
    out_bucket = f"{input_bucket}-tools"
    s3.create_bucket(Bucket=out_bucket)
    report = tmp_path / "report.json"
    command = ["process", f"s3://{input_bucket}/ward 7/", "--out", f"s3://{out_bucket}/run 1",
               "--report", str(report), "--anonymize", "always"]

    assert main(command) == 0

    aliases = {key: pseudonym(SECRET, input_bucket, key) for key in keys}  # as the service names them
    stored = {item["Key"] for item in s3.list_objects_v2(Bucket=out_bucket)["Contents"]}
    assert stored == {f"run 1/processed/{processed_key(key.removeprefix('ward 7/'))}" for key in keys} | {
        f"run 1/anonymized/{aliases[key]}.jpeg" for key in keys}  # no report object: --report is a local file
    for key, brightness in keys.items():
        head = s3.head_object(Bucket=out_bucket, Key=f"run 1/processed/{processed_key(key.removeprefix('ward 7/'))}")
        assert head["Metadata"]["source-etag"] == etags[key] and head["Metadata"]["pseudonym"] == aliases[key]
        assert head["Metadata"]["label"] == ("Pneumonia" if brightness == BRIGHT else "Normal")
    rows = {row["pseudonym"]: row for row in json.loads(report.read_text())}
    assert set(rows) == set(aliases.values())
    assert {row["status"] for row in rows.values()} == {"processed"}
    assert all(row["anonymized"] == f"{row['pseudonym']}.jpeg" for row in rows.values())
    captured = capsys.readouterr()
    assert_private([report.read_text(), captured.out, captured.err], list(keys))

    # A rerun writes nothing but the report (no engine is even started).
    def puts() -> list[str]:
        served = rgw.requests_served()
        return [path for method, path, _ in served if method == "PUT" and path.startswith(f"/{out_bucket}/")]

    written = puts()
    assert main(command[:4]) == 0  # no --report: it goes beside the outputs
    # The RGW logs asynchronously, in order: once the report (sent after every other write was answered) shows, any
    # other write of the rerun shows too.
    wait_until(lambda: any(path.endswith("/report.csv") for path in puts()), 10, "the report's PUT was never logged")
    rerun_writes = puts()[len(written):]
    assert len(rerun_writes) == 1 and rerun_writes[0].endswith("/report.csv"), rerun_writes
    published = s3.get_object(Bucket=out_bucket, Key="run 1/report.csv")["Body"].read().decode()
    published_rows = list(csv.DictReader(io.StringIO(published)))
    assert {row["status"] for row in published_rows} == {"skipped"} and len(published_rows) == len(keys)
    assert all(row["anonymized"] for row in published_rows)
    assert_private([published], list(keys))


# ------------------------------------------------------------------------------------------------------ DICOM


def test_dicom_folder_gets_dcm_outputs_not_assessed_rows_and_a_rerun_skips_everything(
    tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_spec: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_URI", str(chest_model(tiny_spec, tmp_path / "model")))
    folder, out = tmp_path / "in", tmp_path / "out"
    patient, study = Patient(), new_study()
    dicoms = {f"{FOLDER}/{name}": data for name, data in study_files(patient, study).items()}
    jpeg = f"{FOLDER}/chest {BRIGHT}.jpeg"
    files = dicoms | {
        jpeg: encode(xray_like(BRIGHT, size=(200, 160))),
        # Without a suffix, but not DICOM: not listed. Nor is the medium's directory, a DICOM file without pixels.
        f"{FOLDER}/notes": b"Doe Jane Marie, follow-up in 6 weeks" * 10,
        "DICOMDIR": make_no_pixels("SR", patient=patient, study=study),
    }
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)

    assert main(["process", str(folder), "--out", str(out)]) == 0

    report_text = (out / "report.csv").read_text(encoding="utf-8")
    rows = read_report(out / "report.csv")
    assert set(rows) == {alias(relative) for relative in [*dicoms, jpeg]}
    for relative in dicoms:
        row = rows[alias(relative)]
        assert row["status"] == "processed"
        processed = out / "processed" / processed_key(relative, dicom=True)
        assert processed.name.endswith("-processed.dcm") and processed.is_file()
        assert read(processed.read_bytes()).ImageType == ["DERIVED", "SECONDARY"]
        # Always anonymized, whatever the policy (ANONYMIZE_WHEN is `positive` here), and always `.dcm`.
        assert row["anonymized"] == f"{alias(relative)}.dcm"
        assert_deidentified((out / "anonymized" / row["anonymized"]).read_bytes(), patient, study)
        if relative.removeprefix(f"{FOLDER}/") in NOT_ASSESSED:
            assert (row["label"], row["reason"], row["risk"]) == ("not-assessed", NOT_ASSESSED_REASON_CODE, "")
        else:
            assert row["label"] in {"Pneumonia", "Normal", "Unsure"} and 0 <= float(row["risk"]) <= 1
            assert row["reason"] == ""
    assert (rows[alias(jpeg)]["label"], rows[alias(jpeg)]["anonymized"]) == ("Pneumonia", f"{alias(jpeg)}.jpeg")
    assert (out / "processed" / processed_key(jpeg)).is_file()
    captured = capsys.readouterr()
    assert "5 processed, 0 skipped, 0 failed; 1 not assessed (outside-model-domain)" in captured.err
    assert_private([report_text, captured.out, captured.err], list(files))
    for text in (report_text, captured.out, captured.err):
        assert not [value for value in phi_values(patient, study=study) if value in text]

    # A rerun reads each file (its sha256 is its fingerprint), so it knows the DICOM ones without a suffix too.
    before = output_files(out)
    assert main(["process", str(folder), "--out", str(out)]) == 0
    assert output_files(out) == before
    rows = read_report(out / "report.csv")
    assert {(row["status"], row["reason"]) for row in rows.values()} == {("skipped", "already-processed")}
    assert rows[alias(f"{FOLDER}/CT 0003.dcm")]["label"] == "not-assessed"
    assert "0 processed, 5 skipped, 0 failed" in capsys.readouterr().err


def test_dicom_outputs_are_written_in_the_syntax_the_operator_chose(
    tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_spec: Path, tmp_path: Path
) -> None:
    """DICOM_OUTPUT_SYNTAX reaches the workers: a JPEG 2000 source's two outputs are RLE, with its pixels."""
    from pydicom import uid

    monkeypatch.setenv("MODEL_URI", str(chest_model(tiny_spec, tmp_path / "model")))
    monkeypatch.setenv("DICOM_OUTPUT_SYNTAX", "rle")
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    source = make_dicom(modality="CR", bits_stored=12, rows=256, columns=256, transfer_syntax=uid.JPEG2000Lossless)
    (folder / "chest.dcm").write_bytes(source)
    assert main(["process", str(folder), "--out", str(out)]) == 0
    outputs = sorted((out / "processed").rglob("*.dcm")) + sorted((out / "anonymized").rglob("*.dcm"))
    assert len(outputs) == 2
    for path in outputs:
        written = read(path.read_bytes())
        assert written.file_meta.TransferSyntaxUID == uid.RLELossless
        assert written.pixel_array.shape == read(source).pixel_array.shape


def test_dicom_objects_from_s3_to_s3_and_a_rerun_that_fetches_only_what_was_misnamed(
    tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_spec: Path, rgw: Any, s3: Any,
    input_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_URI", str(chest_model(tiny_spec, tmp_path / "model")))
    patient, study = Patient(), new_study()
    objects = {f"{FOLDER}/{name}": data for name, data in study_files(patient, study).items()}
    # A DICOM object named as a JPEG: listed by its name, known as DICOM only once fetched.
    misnamed = f"{FOLDER}/Doe Jane scan.jpeg"
    objects[misnamed] = make_dicom(patient=patient, study=study, modality="DX", rows=256, columns=256, seed=9)
    for key, data in objects.items():
        upload(s3, input_bucket, key, data)
    upload(s3, input_bucket, f"{FOLDER}/notes", b"Doe Jane Marie, follow-up in 6 weeks" * 10)
    upload(s3, input_bucket, f"{FOLDER}/", b"")  # a folder marker
    out_bucket = f"{input_bucket}-tools"
    s3.create_bucket(Bucket=out_bucket)
    command = ["process", f"s3://{input_bucket}/{FOLDER}/", "--out", f"s3://{out_bucket}/run"]

    assert main(command) == 0

    aliases = {key: pseudonym(SECRET, input_bucket, key) for key in objects}
    stored = {item["Key"] for item in s3.list_objects_v2(Bucket=out_bucket)["Contents"]}
    names = [key.removeprefix(f"{FOLDER}/") for key in objects]
    assert stored == {f"run/processed/{processed_key(name, dicom=True)}" for name in names} | {
        f"run/anonymized/{aliases[key]}.dcm" for key in objects} | {"run/report.csv"}
    for key in objects:
        assert_deidentified(s3.get_object(Bucket=out_bucket, Key=f"run/anonymized/{aliases[key]}.dcm")["Body"].read(),
                            patient, study)
    ct = s3.head_object(Bucket=out_bucket, Key=f"run/processed/{processed_key('CT 0003.dcm')}")
    assert ct["ContentType"] == "application/dicom" and ct["Metadata"]["label"] == "not-assessed"
    assert "5 processed, 0 skipped, 0 failed; 1 not assessed" in capsys.readouterr().err

    def requests() -> list[tuple[str, str]]:
        return [(method, path) for method, path, _ in rgw.requests_served()
                if path.startswith((f"/{input_bucket}/", f"/{out_bucket}/run/report.csv"))]

    before = len(requests())
    assert main(command) == 0
    # The RGW logs in order: once the report's PUT (the rerun's last request) shows, its GETs show too.
    wait_until(lambda: ("PUT", f"/{out_bucket}/run/report.csv") in requests()[before:], 10,
               "the report's PUT was never logged")
    gets = [path for method, path in requests()[before:] if method == "GET" and "list-type" not in path]
    # Fetched: only the misnamed object (its processed copy was not where its name said). Keys without a suffix
    # are sniffed by a ranged GET each: IM0002, the one named by its UID and the notes (the folder marker is not).
    assert len(gets) == 4, gets
    published = s3.get_object(Bucket=out_bucket, Key="run/report.csv")["Body"].read().decode()
    rows = {row["pseudonym"]: row for row in csv.DictReader(io.StringIO(published))}
    assert set(rows) == set(aliases.values())
    assert {(row["status"], row["reason"]) for row in rows.values()} == {("skipped", "already-processed")}
    assert all(row["anonymized"] == f"{row['pseudonym']}.dcm" for row in rows.values())
    assert rows[aliases[f"{FOLDER}/CT 0003.dcm"]]["label"] == "not-assessed"


def test_inputs_that_would_share_a_processed_dicom_copy_are_duplicates(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    scan = make_dicom(rows=64, columns=64)
    for name in ("IM0001", "IM0001.dcm", "IM0001.DICOM", "IM0002.dcm"):
        (folder / name).write_bytes(scan)
    sources = plan_sources([str(folder)], FolderOutput(tmp_path / "out"), None)
    assert [(source.relative, source.dicom, source.duplicate) for source in sources] == [
        ("IM0001", True, False), ("IM0001.DICOM", True, True), ("IM0001.dcm", True, True), ("IM0002.dcm", True, False)]
