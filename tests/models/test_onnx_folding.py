"""Folding the text models' elementwise chains (service.models.onnx_folding): the folded networks compute what the
pinned ones do, on small graphs built here (each rewrite, and each near miss it must leave alone) and on the real
PP-OCRv4 detector and recognizer the workers load."""

from __future__ import annotations

import collections
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TEXT_OPTIONS
from onnx import TensorProto, helper, numpy_helper

from service.imaging.ocr_models import CtcTextRecognizer, DbTextDetector
from service.models.fetch import (
    TEXT_DETECTOR_FILE,
    TEXT_DETECTOR_NAME,
    TEXT_RECOGNIZER_FILE,
    TEXT_RECOGNIZER_NAME,
)
from service.models.onnx_folding import fold, folded_file

CHANNELS = 4


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node if node.op_type != "Constant")


class GraphBuilder:
    """A float graph on input `x` (1 x CHANNELS x 8 x 8), one node at a time; constants as Constant nodes, as
    Paddle2ONNX writes them."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.names = iter(range(10_000))

    def constant(self, value: np.ndarray | float) -> str:
        name = f"c{next(self.names)}"
        array = np.asarray(value, np.float32)
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        return name

    def op(self, op_type: str, *inputs: str, **attributes: object) -> str:
        name = f"t{next(self.names)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{name}", **attributes))
        return name

    def conv(self, x: str, kernel: int, *, bias: bool = True) -> str:
        weights = self.constant(self.rng.normal(size=(CHANNELS, CHANNELS, kernel, kernel)))
        inputs = [x, weights, self.constant(self.rng.normal(size=CHANNELS))] if bias else [x, weights]
        return self.op("Conv", *inputs, pads=[kernel // 2] * 4)

    def affine(self, x: str, scale: float, shift: float) -> str:
        return self.op("Add", self.op("Mul", self.constant([scale]), x), self.constant([shift]))

    def hard_swish(self, x: str, ceiling: float = 6.0) -> str:
        clipped = self.op("Clip", self.op("Add", x, self.constant(3.0)), self.constant(0.0), self.constant(ceiling))
        return self.op("Div", self.op("Mul", x, clipped), self.constant(6.0))

    def model(self, *outputs: str) -> onnx.ModelProto:
        shape = [1, CHANNELS, 8, 8]
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in outputs])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def folded_matches(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """`model` folded, checked, and computing what `model` does (within float rounding) on random input."""
    x = np.random.default_rng(seed).normal(scale=3.0, size=(1, CHANNELS, 8, 8)).astype(np.float32)
    expected = run(model, x)
    folded = fold(onnx.ModelProto.FromString(model.SerializeToString()))
    onnx.checker.check_model(folded)
    np.testing.assert_allclose(run(folded, x), expected, rtol=1e-4, atol=1e-4)
    return folded


@pytest.mark.parametrize("seed", range(5))
def test_a_convolution_block_folds_to_convolutions_and_one_fused_swish(seed: int) -> None:
    """PP-LCNetV3's block: conv, affine, hard-swish, affine, then a pointwise conv: two convolutions, a HardSigmoid
    and a Mul remain, and the output is the same."""
    graph = GraphBuilder(seed)
    swished = graph.hard_swish(graph.affine(graph.conv("x", 3), 0.9, 0.5))
    out = graph.conv(graph.affine(swished, 0.47, -0.2), 1)
    folded = folded_matches(graph.model(out), seed)
    assert op_counts(folded) == {"Conv": 2, "HardSigmoid": 1, "Mul": 1}


@pytest.mark.parametrize("seed", range(3))
def test_a_convolution_without_bias_gets_the_affine_shift_as_its_bias(seed: int) -> None:
    graph = GraphBuilder(seed)
    out = graph.affine(graph.conv("x", 3, bias=False), -1.7, 0.25)
    assert op_counts(folded_matches(graph.model(out), seed)) == {"Conv": 1}


def test_an_affine_block_before_a_padded_convolution_stays() -> None:
    """The padded border would see zeros where the block gave its shift: folding it would change the edges."""
    graph = GraphBuilder(0)
    out = graph.conv(graph.affine(graph.op("Relu", "x"), 0.5, 2.0), 3)
    assert op_counts(folded_matches(graph.model(out), 0)) == {"Relu": 1, "Mul": 1, "Add": 1, "Conv": 1}


def test_near_misses_are_left_as_they_are() -> None:
    graph = GraphBuilder(1)
    # A clip to 5 is not a hard-swish.
    not_swish = graph.hard_swish(graph.op("Relu", "x"), ceiling=5.0)
    # A convolution whose output is also read elsewhere keeps it (the affine block cannot move into it).
    shared = graph.conv("x", 3)
    scaled = graph.affine(shared, 2.0, 1.0)
    both = graph.op("Add", graph.op("Add", scaled, shared), not_swish)
    # A graph output in the middle of a chain stays an output.
    convolved = graph.conv("x", 1)
    after = graph.affine(convolved, 3.0, -1.0)
    folded = folded_matches(graph.model(both, after, convolved), 1)
    counts = op_counts(folded)
    assert counts["Clip"] == 1 and counts["Div"] == 1 and "HardSigmoid" not in counts
    assert counts["Conv"] == 2 and counts["Mul"] == 3, counts
    assert [output.name for output in folded.graph.output] == [both, after, convolved]


def text_image(height: int, width: int) -> np.ndarray:
    """Grey grain with a few lines of text, as BGR uint8."""
    rng = np.random.default_rng(7)
    image = rng.normal(70, 12, (height, width)).clip(0, 255).astype(np.uint8)
    for row, words in enumerate(("DOE^JANE 1957", "ID 4411-208", "R")):
        cv2.putText(image, words, (8, 24 + 30 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 235, 2)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def test_the_folded_text_models_compute_what_the_pinned_ones_do() -> None:
    models = TEXT_OPTIONS.models
    image = text_image(128, 224)
    pinned, folded = DbTextDetector(models / TEXT_DETECTOR_NAME), DbTextDetector(models / TEXT_DETECTOR_FILE)
    probability = folded.probability(image)
    np.testing.assert_allclose(probability, pinned.probability(image), atol=1e-3)
    assert DbTextDetector.regions(probability), "the detector found the text"
    line = image[8:36, :]
    read = CtcTextRecognizer(models / TEXT_RECOGNIZER_FILE).read(line)
    expected = CtcTextRecognizer(models / TEXT_RECOGNIZER_NAME).read(line)
    assert read[0] == expected[0] and abs(read[1] - expected[1]) < 1e-3
    for name, file in ((TEXT_DETECTOR_NAME, TEXT_DETECTOR_FILE), (TEXT_RECOGNIZER_NAME, TEXT_RECOGNIZER_FILE)):
        before, after = op_counts(onnx.load(str(models / name))), op_counts(onnx.load(str(models / file)))
        # Every hard-swish (the models' only Clips) is one fused HardSigmoid and a Mul now.
        assert before["Clip"] and not after["Clip"], (name, after)
        assert after["HardSigmoid"] == before["HardSigmoid"] + before["Clip"], (name, before, after)
        assert sum(after.values()) < 0.7 * sum(before.values()), (name, before, after)


def test_a_folded_file_is_a_checked_model(tmp_path: Path) -> None:
    graph = GraphBuilder(2)
    source = tmp_path / "block.onnx"
    onnx.save(graph.model(graph.hard_swish(graph.affine(graph.conv("x", 3), 1.5, 0.1))), str(source))
    assert op_counts(onnx.load_from_string(folded_file(source))) == {"Conv": 1, "HardSigmoid": 1, "Mul": 1}
