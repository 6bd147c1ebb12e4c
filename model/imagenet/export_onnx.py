"""EfficientNet-Lite0's PyTorch weights -> one ONNX file the service's onnx backend runs as it runs any spec's model.

Runs only in the throwaway conversion venv that model/imagenet/build.py makes (torch, onnxscript and the
`efficientnet-lite-pytorch` wheel), never in the project's venv nor the service image, and imports nothing of the
service: build.py hands it the weights, the sample photos already preprocessed by the service's own code, and takes
back the ONNX file and PyTorch's logits for those photos, to compare with what ONNX Runtime makes of them.

    python export_onnx.py WEIGHTS.pth OUT.onnx SAMPLES.npy TORCH_LOGITS.npy
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet


class ChannelsLast(torch.nn.Module):
    """The service feeds every model (n, height, width, channels), as Keras models take it; PyTorch's convolutions
    take (n, channels, height, width). The transpose goes into the graph, so the spec needs no layout of its own."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.permute(0, 3, 1, 2))


def export(weights: Path, out: Path, samples: np.ndarray) -> np.ndarray:
    """Write the ONNX file; returns PyTorch's logits for `samples` (n, 224, 224, 3 float32)."""
    # Static "same" padding for 224 x 224, as the TensorFlow checkpoint was built; the 1000-class head is loaded too.
    network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    model = ChannelsLast(network).eval()
    example = torch.from_numpy(samples)
    # One graph for any batch size: the service sends batches of 1 to BATCH_MAX_SIZE images.
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (example,), str(out), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False)
    with torch.no_grad():
        return model(example).numpy()


if __name__ == "__main__":
    weights_path, onnx_path, samples_path, logits_path = map(Path, sys.argv[1:5])
    logits = export(weights_path, onnx_path, np.load(samples_path))
    np.save(logits_path, logits)
