"""The `xray-pipeline` command: serve the sink, manage Ceph bucket notifications, run the local demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from service.errors import ConfigurationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xray-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run the HTTP sink (settings from the environment; see docs/configuration.md)")

    notify = commands.add_parser("notify", help="manage Ceph bucket notifications (topic + rule)")
    actions = notify.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create or update a topic and a bucket notification rule")
    create.add_argument("--bucket", required=True, help="input bucket to watch")
    create.add_argument("--topic", required=True, help="topic name")
    create.add_argument("--endpoint", required=True, help="push endpoint: http(s)://, kafka:// or amqp:// URL")
    create.add_argument("--id", default=None, help="notification rule id (default: <topic>)")
    create.add_argument("--event", action="append", dest="events",
                        help="event, repeatable (default: s3:ObjectCreated:*)")
    create.add_argument("--prefix")
    create.add_argument("--suffix", action="append", dest="suffixes", metavar="SUFFIX",
                        help="key suffix, repeatable (several become one regex rule), e.g. .dcm")
    create.add_argument("--regex", help="Ceph's key regex filter, e.g. '.*\\.(jpe?g|png)$'")
    create.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=True,
                        help="persistent (at-least-once) delivery (default: on)")
    create.add_argument("--kafka-ack-level", choices=["none", "broker"])
    create.add_argument("--opaque-data")
    create.add_argument("--no-verify-ssl", action="store_true")
    listing = actions.add_parser("list", help="list a bucket's notification rules and the topics")
    listing.add_argument("--bucket", required=True)
    remove = actions.add_parser("remove", help="remove a bucket notification rule (and optionally its topic)")
    remove.add_argument("--bucket", required=True)
    remove.add_argument("--id", required=True, help="notification rule id")
    remove.add_argument("--topic", help="also delete this topic")

    model = commands.add_parser("model", help="model tools")
    model_actions = model.add_subparsers(dest="action", required=True)
    export = model_actions.add_parser("export", help="convert a Keras model spec to another backend")
    export.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (ONNX Runtime backend)")
    export.add_argument("--spec", default=None, help="model spec to export (default: MODEL_URI or the default model)")
    export.add_argument("--out", default=None, help="folder for the new spec (default: beside the spec)")
    model_actions.add_parser("fetch", help="download the default model (pinned PyPI wheel) into MODEL_CACHE_DIR; "
                             "prints its folder")

    demo = commands.add_parser("demo", help="the local demo (needs a running S3, see `make demo`)")
    demo.add_argument("--images", default=None, help="folder of input images (default: the model's 16 X-rays)")
    demo.add_argument("--out", default="demo-output", help="where to save the outputs (default: %(default)s)")
    demo.add_argument("--bucket", default="xray-demo", help="input bucket (default: %(default)s)")

    replay = commands.add_parser("replay", help="post recorded deliveries (.http files, notification .json) to a URL")
    replay.add_argument("paths", nargs="+", metavar="FILE|DIR", help="recordings, or folders of them")
    replay.add_argument("--to", required=True, metavar="URL", help="the service, e.g. http://127.0.0.1:8080/")
    replay.add_argument("--timeout", type=float, default=330.0, help="seconds per request (default: %(default)s)")

    process = commands.add_parser("process", help="analyze local files, folders or s3:// prefixes with no server")
    process.add_argument("paths", nargs="+", metavar="PATH",
                         help="image files, folders (recursive) or s3://bucket[/prefix]")
    process.add_argument("--out", default="xray-output", metavar="DIR|s3://BUCKET[/PREFIX]",
                         help="where processed/ and anonymized/ go (default: %(default)s)")
    process.add_argument("--report", default=None, metavar="FILE",
                         help="report file, .csv or .json (default: <out>/report.csv)")
    process.add_argument("--anonymize", choices=["positive", "always"], default=None,
                         help="which images get an anonymized copy (default: ANONYMIZE_WHEN, else positive)")
    process.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")

    backfill = commands.add_parser("backfill", help="get the objects already in a bucket processed")
    backfill.add_argument("source", metavar="s3://BUCKET[/PREFIX]", help="the input bucket, or a prefix in it")
    backfill.add_argument("--rate", type=_rate, default=None, metavar="N/s",
                          help="at most N objects started per second (default: unlimited)")
    backfill.add_argument("--emit", default=None, metavar="URL",
                          help="post one Ceph notification per object to a running service instead of processing here")
    backfill.add_argument("--dry-run", action="store_true", help="list what would be processed; write nothing")
    backfill.add_argument("--concurrency", type=int, default=None, metavar="N",
                          help="objects in flight (default: 2 x BATCH_MAX_SIZE x WORKERS)")
    backfill.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")

    events = commands.add_parser("events", help="delivery recordings")
    event_actions = events.add_subparsers(dest="action", required=True)
    record = event_actions.add_parser("record", help="an HTTP sink that saves every delivery as a .http file")
    record.add_argument("--dir", required=True, help="folder for the recordings (numbering continues)")
    record.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    record.add_argument("--port", type=int, default=8081, help="port (default: %(default)s; 0 picks a free one)")
    record.add_argument("--count", type=int, default=None, help="stop after this many deliveries")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve()
        if args.command == "notify":
            return _notify(args)
        if args.command == "model":
            return _fetch_model() if args.action == "fetch" else _export_model(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "events":
            return _record_events(args)
        if args.command == "process":
            return _process(args)
        if args.command == "backfill":
            return _backfill(args)
        from service.tools.demo import run_demo

        return run_demo(images=args.images, out=args.out, bucket=args.bucket)
    except ConfigurationError as error:
        print(f"xray-pipeline: {error}", file=sys.stderr)
        return 2


def _serve() -> int:
    from service.engine.pool import InferenceEngine
    from service.logs import configure_logging
    from service.models.source import resolve_model
    from service.settings import load_settings
    from service.storage import make_s3_client

    settings = load_settings()  # fail before anything starts, naming the variable
    configure_logging(settings.log_level, settings.log_format)
    spec = resolve_model(settings, make_s3_client)
    engine = InferenceEngine.from_settings(settings, spec)
    # Cold start: the workers import their runtime and load the model while this process imports the web stack.
    engine.launch()
    import uvicorn

    from service.app import create_app

    uvicorn.run(
        create_app(settings, spec=spec, engine=engine),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep configure_logging's handler (JSON access log too) and its probe and scrape filter
        timeout_graceful_shutdown=60,
    )
    return 0


def _fetch_model() -> int:
    from service.models.fetch import fetch
    from service.settings import ModelCacheSettings, load_settings

    folder = fetch(load_settings(ModelCacheSettings).model_cache_dir)
    print(f"default model ready in {folder}", file=sys.stderr)
    print(folder)  # alone on stdout, for scripts: "$(xray-pipeline model fetch)/val" are its X-rays
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.models.fetch import default_spec
    from service.settings import ModelCacheSettings, load_settings
    from service.tools.export import export_onnx

    configured = os.environ.get("MODEL_URI") or os.environ.get("MODEL_SPEC")
    if args.spec is None and configured and "://" in configured:
        raise ConfigurationError(f"MODEL_URI: {configured} is not a local file; pass the spec to export with --spec")
    spec = Path(args.spec or configured or default_spec(load_settings(ModelCacheSettings).model_cache_dir))
    written = export_onnx(spec, Path(args.out) if args.out else spec.parent)
    print(f"wrote {written} (MODEL_URI={written} selects it)")
    return 0


def _process(args: argparse.Namespace) -> int:
    from service.tools.process import run_process

    return run_process(args.paths, out=args.out, report=args.report, anonymize=args.anonymize, progress=args.progress)


def _backfill(args: argparse.Namespace) -> int:
    from service.tools.backfill import run_backfill

    return run_backfill(args.source, rate=args.rate, emit=args.emit, dry_run=args.dry_run,
                        concurrency=args.concurrency, progress=args.progress)


def _rate(value: str) -> float:
    """`--rate 5` or `--rate 5/s`: a positive number of objects per second."""
    try:
        rate = float(value.removesuffix("/s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate such as 5 or 5/s") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError("the rate must be above 0")
    return rate


def _replay(args: argparse.Namespace) -> int:
    """One JSON line per recording: file, status, the service's answer. Exit 1 if any was not answered 2xx."""
    from pathlib import Path

    from service.tools.recordings import RecordingError, load_recordings, replay

    try:
        recordings = load_recordings([Path(path) for path in args.paths])
    except RecordingError as error:
        raise ConfigurationError(str(error)) from None
    failures = 0
    for result in replay(recordings, args.to, timeout_s=args.timeout):
        failures += result.status is None or not 200 <= result.status < 300
        print(json.dumps({"file": result.source, "status": result.status, "response": result.detail}), flush=True)
    print(f"replayed {len(recordings)} recording(s), {failures} not answered 2xx", file=sys.stderr)
    return 1 if failures else 0


def _record_events(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from service.tools.recordings import RecordingSink

    sink = RecordingSink(Path(args.dir), host=args.host, port=args.port)
    with sink:
        print(f"recording deliveries to {args.dir}; point a topic at {sink.url} (Ctrl-C stops)", file=sys.stderr,
              flush=True)
        try:
            if args.count is not None:
                sink.wait_for(args.count, timeout_s=None)
            else:
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
    print(f"recorded {len(sink.recorded)} delivery(ies)", file=sys.stderr)
    return 0


def _notify(args: argparse.Namespace) -> int:
    from service.settings import S3Settings, load_settings
    from service.tools.notify import DEFAULT_EVENTS, NotificationAdmin, TopicOptions

    admin = NotificationAdmin(load_settings(S3Settings))
    output: Any
    if args.action == "create":
        options = TopicOptions(
            push_endpoint=args.endpoint,
            persistent=args.persistent,
            kafka_ack_level=args.kafka_ack_level,
            opaque_data=args.opaque_data,
            verify_ssl=not args.no_verify_ssl,
        )
        arn = admin.ensure_topic(args.topic, options)
        rule_id = args.id or args.topic
        admin.ensure_notification(
            args.bucket, arn, notification_id=rule_id, events=args.events or DEFAULT_EVENTS,
            prefix=args.prefix, suffix=args.suffixes, regex=args.regex,
        )
        output = {"topic_arn": arn, "bucket": args.bucket, "id": rule_id}
    elif args.action == "list":
        output = {"notifications": admin.list_notifications(args.bucket), "topics": admin.list_topics()}
    else:
        output = {"removed": admin.remove_notification(args.bucket, args.id)}
        if args.topic:
            admin.delete_topic(args.topic)
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
