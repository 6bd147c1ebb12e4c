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

    commands.add_parser("serve", help="run the HTTP sink (settings from the environment; see README)")

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
    create.add_argument("--suffix")
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

    demo = commands.add_parser("demo", help="the local demo (needs a running S3, see `make demo`)")
    demo.add_argument("--images", default=None, help="folder of input images (default: the model's 16 X-rays)")
    demo.add_argument("--out", default="demo-output", help="where to save the outputs (default: %(default)s)")
    demo.add_argument("--bucket", default="xray-demo", help="input bucket (default: %(default)s)")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve()
        if args.command == "notify":
            return _notify(args)
        if args.command == "model":
            return _export_model(args)
        from service.demo import run_demo

        return run_demo(images=args.images, out=args.out, bucket=args.bucket)
    except ConfigurationError as error:
        print(f"xray-pipeline: {error}", file=sys.stderr)
        return 2


def _serve() -> int:
    from service.inference import InferenceEngine
    from service.logs import configure_logging
    from service.model_source import resolve_model
    from service.settings import load_settings
    from service.storage import make_s3_client

    settings = load_settings()  # fail before anything starts, naming the variable
    configure_logging(settings.log_level)
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
        log_config=None,  # keep configure_logging's handlers and probe filter
        timeout_graceful_shutdown=60,
    )
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.export import export_onnx
    from service.settings import DEFAULT_MODEL_SPEC

    configured = os.environ.get("MODEL_URI") or os.environ.get("MODEL_SPEC")
    if args.spec is None and configured and "://" in configured:
        raise ConfigurationError(f"MODEL_URI: {configured} is not a local file; pass the spec to export with --spec")
    spec = Path(args.spec or configured or DEFAULT_MODEL_SPEC)
    written = export_onnx(spec, Path(args.out) if args.out else spec.parent)
    print(f"wrote {written} (MODEL_URI={written} selects it)")
    return 0


def _notify(args: argparse.Namespace) -> int:
    from service.notify import DEFAULT_EVENTS, NotificationAdmin, TopicOptions
    from service.settings import S3Settings, load_settings

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
            prefix=args.prefix, suffix=args.suffix, regex=args.regex,
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
