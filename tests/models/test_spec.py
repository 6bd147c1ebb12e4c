"""Model spec: validation, preprocessing that matches the training pipeline, and output interpretation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import BINARY, SPEC_TEMPLATE, write_spec
from PIL import Image

from service.errors import ConfigurationError
from service.models.preprocess import to_model_tensor
from service.models.spec import DomainSpec, ModelSpec

ROOT = Path(__file__).resolve().parents[2]


def test_default_spec_describes_the_xception_model() -> None:
    raw = ModelSpec.model_validate(__import__("yaml").safe_load(SPEC_TEMPLATE.read_text()))
    assert (raw.input.width, raw.input.height, raw.input.resize) == (150, 150, "nearest_exact")
    assert raw.input.scale_coefficients == pytest.approx((1 / 127.5, -1.0))
    assert raw.output.class_names[1] == raw.output.positive_class == "PNEUMONIA"


def test_weights_resolved_relative_to_the_spec(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, BINARY))
    assert spec.weights == (tmp_path / "w.keras").resolve()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("x/127.5-1", "log(x)"), "unsupported scale"),
        (("positive_class: PNEUMONIA", "positive_class: COVID"), "not one of class_names"),
        (("kind: logits", "kind: probits"), "output.kind"),
        (("negative_threshold: 0.6", "negative_threshold: 0.9"), "must not be above"),
        (("name: binary", "name: binary\nsurprise: 1"), "surprise"),
    ],
)
def test_invalid_specs_are_configuration_errors(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        ModelSpec.load(write_spec(tmp_path, BINARY.replace(*change)))
    assert message in str(raised.value)
    assert str(raised.value).startswith("MODEL_URI:")


def test_missing_weights_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"weights file .* does not exist"):
        ModelSpec.load(write_spec(tmp_path, BINARY, weights=False))
    with pytest.raises(ConfigurationError, match="cannot read"):
        ModelSpec.load(tmp_path / "absent.yaml")


def test_json_specs_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "w.keras").write_bytes(b"x")
    (tmp_path / "s.json").write_text(
        '{"name": "j", "weights": "w.keras", "input": {"width": 8, "height": 8},'
        ' "output": {"kind": "softmax", "class_names": ["a", "b", "c"]}}'
    )
    assert ModelSpec.load(tmp_path / "s.json").output.kind == "softmax"


def test_nearest_exact_preprocessing_matches_pil_nearest(tmp_path: Path) -> None:
    """The default model was trained on PIL NEAREST resizes; OpenCV's nearest_exact must give the same pixels."""
    spec = ModelSpec.load(write_spec(tmp_path, BINARY))
    rng = np.random.default_rng(1)
    for shape in [(1000, 1234), (151, 149), (2048, 1500)]:
        bgr = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ours = to_model_tensor(spec, bgr)
        pil = np.asarray(Image.fromarray(bgr[:, :, ::-1]).resize((150, 150), Image.Resampling.NEAREST))
        expected = pil.astype(np.float32) / 127.5 - 1.0
        assert ours.shape == (150, 150, 3)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_grayscale_input(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, BINARY.replace("color_mode: rgb", "color_mode: grayscale")))
    assert to_model_tensor(spec, np.full((20, 30, 3), 255, np.uint8)).shape == (150, 150, 1)
    assert to_model_tensor(spec, np.full((20, 30), 255, np.uint8)).shape == (150, 150, 1)


@pytest.mark.parametrize("color_mode", ["rgb", "bgr", "grayscale"])
@pytest.mark.parametrize("resize", ["nearest_exact", "linear", "area", "cubic"])
def test_one_channel_images_give_the_same_tensor_as_their_three_channel_expansion(
    tmp_path: Path, color_mode: str, resize: str
) -> None:
    """Gray X-rays skip the full-size expansion to BGR; the model must see exactly the same tensor."""
    text = BINARY.replace("color_mode: rgb", f"color_mode: {color_mode}").replace("nearest_exact", resize)
    spec = ModelSpec.load(write_spec(tmp_path, text))
    gray = np.random.default_rng(2).integers(0, 256, (411, 377), dtype=np.uint8)
    np.testing.assert_array_equal(to_model_tensor(spec, gray), to_model_tensor(spec, np.dstack([gray] * 3)))


@pytest.mark.parametrize("fraction", ["0", "-0.5", "1.5"])
def test_center_crop_must_be_a_fraction(tmp_path: Path, fraction: str) -> None:
    with pytest.raises(ConfigurationError, match=r"input\.center_crop"):
        ModelSpec.load(write_spec(tmp_path, BINARY.replace("scale:", f"center_crop: {fraction}, scale:")))


def crop_box(input_size: tuple[int, int], center_crop: float | None, height: int, width: int) -> tuple[int, ...]:
    """The part of a height x width image that a spec with this input size (width, height) and crop resizes."""
    spec = ModelSpec.model_validate({
        "name": "crop", "weights": "w.onnx", "output": {"kind": "logits", "class_names": ["a"]},
        "input": {"width": input_size[0], "height": input_size[1], "center_crop": center_crop},
    })
    return spec.input.crop_box(height, width)


@pytest.mark.parametrize("shape", [(300, 451), (400, 600), (451, 300), (224, 224), (257, 1000), (3, 2)])
def test_center_crop_of_a_square_input_is_tensorflows_imagenet_evaluation_crop(shape: tuple[int, int]) -> None:
    """EfficientNet's `_decode_and_center_crop`: a square of int(224 / (224 + 32) * shorter side), offsets rounded
    up; the ImageNet model's weights were measured with it."""
    height, width = shape
    side = int(224 / (224 + 32) * min(height, width))
    assert crop_box((224, 224), 0.875, height, width) == ((height - side + 1) // 2, (width - side + 1) // 2, side,
                                                          side)


def test_center_crop_of_a_wide_input_keeps_its_aspect_ratio_and_none_keeps_the_whole_image() -> None:
    wide = (200, 100)
    assert crop_box(wide, 1.0, 300, 300) == (75, 0, 150, 300)  # the widest 2:1 band of a square
    assert crop_box(wide, 1.0, 100, 500) == (0, 150, 100, 200)  # the middle of a wider image, full height
    assert crop_box(wide, 0.5, 100, 200) == (25, 50, 50, 100)
    # The default: the whole image, squeezed to the input's shape.
    assert crop_box(wide, None, 123, 456) == (0, 0, 123, 456)


def test_center_crop_preprocessing_resizes_only_the_centre(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, BINARY.replace("scale:", "center_crop: 0.5, scale:")))
    image = np.zeros((300, 400, 3), np.uint8)
    image[75:225, 125:275] = 255  # the central square of half the shorter side: all the model sees
    np.testing.assert_array_equal(to_model_tensor(spec, image), np.ones((150, 150, 3), np.float32))
    uncropped = ModelSpec.load(write_spec(tmp_path, BINARY))
    assert to_model_tensor(uncropped, image).min() == -1.0  # without the crop, the black border is in


def test_binary_labels_follow_the_thresholds(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, BINARY))

    def for_risk(risk: float):
        return spec.interpret(np.log(np.array([1 - risk, risk])))  # logits whose softmax is (1-risk, risk)

    assert (for_risk(0.973).label, round(for_risk(0.973).risk, 6)) == ("Pneumonia", 0.973)
    assert for_risk(0.973).stamp_text == "Pneumonia, risk=97.3%"
    assert for_risk(0.8).is_positive and for_risk(0.8).label == "Pneumonia"  # "at or above"
    assert for_risk(0.7).label == "Unsure" and not for_risk(0.7).is_positive
    assert for_risk(0.6).label == "Unsure"
    assert for_risk(0.2).label == "Normal"


def test_sigmoid_single_unit(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, BINARY.replace("kind: logits", "kind: sigmoid")))
    prediction = spec.interpret(np.array([0.9]))
    assert prediction.risk == pytest.approx(0.9)
    assert prediction.top == [("PNEUMONIA", pytest.approx(0.9)), ("NORMAL", pytest.approx(0.1))]
    logits = ModelSpec.load(write_spec(tmp_path, BINARY))
    assert logits.interpret(np.array([0.0])).risk == pytest.approx(0.5)


def test_multiclass_top_k_without_positive_class(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, """
name: imagenet-ish
weights: w.keras
input: {width: 224, height: 224}
output: {kind: softmax, class_names: [cat, dog, fox, owl], top_k: 3}
"""))
    prediction = spec.interpret(np.array([0.1, 0.6, 0.25, 0.05]))
    assert prediction.risk is None and not prediction.is_positive
    assert prediction.label == "dog"
    assert [name for name, _ in prediction.top] == ["dog", "fox", "cat"]
    assert prediction.stamp_text == "dog 60.0%"


def test_output_size_must_match_class_names(tmp_path: Path) -> None:
    spec = ModelSpec.load(write_spec(tmp_path, BINARY))
    with pytest.raises(ValueError, match="3 values but the spec names 2"):
        spec.interpret(np.zeros(3))


def test_the_domain_says_why_an_image_is_outside_it_naming_only_standard_terms() -> None:
    domain = DomainSpec(modalities=["cr", "DX"], body_parts=["chest"])
    assert domain.refusal("CR", "CHEST") is None and domain.refusal("DX", "") is None  # no body part: by modality
    assert domain.refusal("CT", "CHEST") == "modality CT is not one the model was made for (CR, DX)"
    # Header values can hold anything, a name included: a modality the standard does not define is not echoed,
    # nor is any body part (the reason goes into the anonymized copy's metadata).
    assert domain.refusal("DOEJANE", "CHEST") == "an unlisted modality is not one the model was made for (CR, DX)"
    knee = domain.refusal("CR", "KNEE JANE DOE")
    assert knee is not None and "KNEE" not in knee and "JANE" not in knee
    assert DomainSpec().refusal("CT", "KNEE") is None  # a spec without a domain assesses everything
