"""The ImageNet photo classifier: its spec, and the build that converts its weights to ONNX (`make imagenet-model`)."""
