"""Operator commands over the service's own engine and output contract, without a server: `process` (files,
folders, `s3://` prefixes), `backfill` (a bucket's existing objects), `recordings` (record and replay deliveries),
`notify` (Ceph bucket notifications), `export` (a Keras model to ONNX), `demo`; `run` is their shared run loop
(counts, progress, Ctrl-C, exit codes) and `listing` finds their inputs."""
