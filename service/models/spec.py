"""The model spec: what a classifier expects as input and what its output means.

A spec file (YAML or JSON) describes a Keras image classifier well enough to run it without reading its code:
input size, colour mode, resize interpolation, pixel scaling, output kind, class names, the positive class whose
probability is the "risk", and the thresholds that turn risk into a label. This module knows no TensorFlow: the
web process uses it to validate the spec at start-up; workers use it to preprocess and to interpret outputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import ConfigurationError

if TYPE_CHECKING:
    import numpy as np

BACKEND_SUFFIXES = {"keras": ".keras", "onnx": ".onnx"}
_NUMBER = r"\d+(?:\.\d+)?"
_SCALE_PATTERN = re.compile(rf"^x(?:\s*([/*])\s*({_NUMBER}))?(?:\s*([+-])\s*({_NUMBER}))?$")


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_StrictModel):
    """How an image becomes the model's input tensor."""

    width: int = Field(gt=0, le=4096)
    height: int = Field(gt=0, le=4096)
    color_mode: Literal["rgb", "bgr", "grayscale"] = "rgb"
    resize: Literal["nearest_exact", "nearest", "linear", "area", "cubic"] = "nearest_exact"
    #: Pixel scaling as an expression of x (0..255): "x/127.5-1", "x/255", "x", "x*0.5+0.1".
    scale: str = "x/255"
    #: Before resizing, keep only the centre of the image: of the largest central region with the input's aspect
    #: ratio, this fraction of each side (ImageNet evaluation's 0.875, i.e. 224 of 256). None resizes the whole image,
    #: whatever its aspect ratio (what the default model was trained on).
    center_crop: float | None = Field(default=None, gt=0.0, le=1.0)

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: str) -> str:
        if not _SCALE_PATTERN.match(value.strip()):
            raise ValueError(f"unsupported scale {value!r}; use a form like 'x/127.5-1', 'x/255' or 'x*0.5+0.1'")
        return value.strip()

    @property
    def scale_coefficients(self) -> tuple[float, float]:
        """(multiplier, offset) such that input = x * multiplier + offset."""
        match = _SCALE_PATTERN.match(self.scale)
        assert match is not None  # validated above
        operator, operand, sign, offset = match.groups()
        multiplier = 1.0
        if operator == "/":
            multiplier = 1.0 / float(operand)
        elif operator == "*":
            multiplier = float(operand)
        shift = 0.0 if offset is None else float(offset) * (-1.0 if sign == "-" else 1.0)
        return multiplier, shift

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    def crop_box(self, image_height: int, image_width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the part of an image that is resized into the input: all of it without
        `center_crop`. A square input takes the central square of `center_crop` times the shorter side, with the
        rounding and offsets of the TensorFlow ImageNet evaluation (EfficientNet's `_decode_and_center_crop`)."""
        if self.center_crop is None:
            return 0, 0, image_height, image_width
        aspect = self.width / self.height
        region_height, region_width = (
            (image_height, image_height * aspect) if image_width >= image_height * aspect
            else (image_width / aspect, image_width)
        )
        height = max(1, int(self.center_crop * region_height))
        width = max(1, int(self.center_crop * region_width))
        return (image_height - height + 1) // 2, (image_width - width + 1) // 2, height, width


class OutputSpec(_StrictModel):
    """What the model's output vector means."""

    #: logits: raw scores (softmax applied, or sigmoid for a single unit); softmax/sigmoid: already probabilities.
    kind: Literal["logits", "softmax", "sigmoid"]
    class_names: list[str] = Field(min_length=1)
    #: The class whose probability is the risk; None for a plain multi-class classifier (top-k labels only).
    positive_class: str | None = None
    top_k: int = Field(default=3, ge=1)


class LabelSpec(_StrictModel):
    """Turns the risk into the label that is stamped (original demo: > 0.80 Pneumonia, < 0.60 Normal)."""

    positive: str = "Positive"
    negative: str = "Negative"
    uncertain: str = "Unsure"
    #: Risk at or above this is positive (and, with ANONYMIZE_WHEN=positive, anonymized).
    positive_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    #: Risk below this is negative; in between is uncertain.
    negative_threshold: float = Field(default=0.6, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> LabelSpec:
        if self.negative_threshold > self.positive_threshold:
            raise ValueError("negative_threshold must not be above positive_threshold")
        return self


class DomainSpec(_StrictModel):
    """What the model was made for, judged from a DICOM object's header. JPEG and PNG carry no such facts: they
    are always assessed. An image outside the domain is still de-identified and written, but not classified."""

    #: DICOM Modality values (0008,0060) the model accepts, e.g. [CR, DX]; empty: any.
    modalities: list[str] = []
    #: BodyPartExamined values (0018,0015), e.g. [CHEST]; empty: any. A header without the attribute (common in
    #: real data) is judged by its modality alone.
    body_parts: list[str] = []

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper_case(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]

    def refusal(self, modality: str, body_part: str) -> str | None:
        """Why an image of this modality and body part is outside the domain; None when it is inside.

        The reason travels in both outputs' metadata, the anonymized copy's too, so it names only what the spec or
        the standard spells: a header value is shown only when it is a modality the standard defines (a hostile or
        careless header can hold anything, a name included), a body part never.
        """
        if self.modalities and modality not in self.modalities:
            shown = f"modality {modality}" if modality in _STANDARD_MODALITIES else "an unlisted modality"
            return f"{shown} is not one the model was made for ({', '.join(self.modalities)})"
        if self.body_parts and body_part and body_part not in self.body_parts:
            return f"the body part examined is not one the model was made for ({', '.join(self.body_parts)})"
        return None


#: Modality defined terms (DICOM PS3.3 C.7.3.1.1.1) of images and image-like objects.
_STANDARD_MODALITIES = frozenset({
    "AR", "BDUS", "BMD", "CR", "CT", "DG", "DX", "ES", "GM", "IO", "IVOCT", "IVUS", "LS", "MG", "MR", "NM", "OAM",
    "OCT", "OP", "OPM", "OPT", "OPV", "OT", "PT", "PX", "RF", "RG", "RTIMAGE", "SM", "SRF", "TG", "US", "XA", "XC",
})


#: The label of an image outside the model's domain (a CT for a chest X-ray model).
NOT_ASSESSED = "not-assessed"


@dataclass(frozen=True)
class Prediction:
    """One image's interpreted model output."""

    label: str
    #: Probability of the positive class; None for a classifier without one.
    risk: float | None
    is_positive: bool
    #: The top-k (class name, probability) pairs, most probable first.
    top: list[tuple[str, float]] = field(default_factory=list)
    #: Why the model did not assess the image (outside its domain); None when it did.
    not_assessed_reason: str | None = None

    @classmethod
    def not_assessed(cls, reason: str) -> Prediction:
        return cls(label=NOT_ASSESSED, risk=None, is_positive=False, not_assessed_reason=reason)

    @property
    def stamp_text(self) -> str:
        if self.not_assessed_reason is not None:
            return f"Not assessed: {self.not_assessed_reason}"
        if self.risk is not None:
            return f"{self.label}, risk={self.risk * 100:.1f}%"
        name, probability = self.top[0]
        return f"{name} {probability * 100:.1f}%"


class ModelSpec(_StrictModel):
    """A whole spec file. `weights` is resolved relative to the spec file."""

    name: str
    version: str = "unversioned"
    #: keras: a `.keras` file run by TensorFlow; onnx: an exported `.onnx` file run by ONNX Runtime.
    backend: Literal["keras", "onnx"] = "keras"
    weights: Path
    input: InputSpec
    output: OutputSpec
    labels: LabelSpec = LabelSpec()
    domain: DomainSpec = DomainSpec()

    @model_validator(mode="after")
    def _positive_class_known(self) -> ModelSpec:
        if self.output.positive_class is not None and self.output.positive_class not in self.output.class_names:
            raise ValueError(f"positive_class {self.output.positive_class!r} is not one of class_names")
        return self

    @classmethod
    def load(cls, path: Path | str) -> ModelSpec:
        """Read and validate a spec file; every problem is a ConfigurationError naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigurationError(f"MODEL_URI: cannot read {path}: {error.strerror}") from None
        spec = cls.parse(text, source=str(path), is_json=path.suffix == ".json")
        weights = spec.weights if spec.weights.is_absolute() else (path.parent / spec.weights).resolve()
        if not weights.is_file():
            hint = " (run `xray-pipeline model fetch` for the default model)" if "pneumonia" in spec.name else ""
            raise ConfigurationError(f"MODEL_URI: {path}: weights file {weights} does not exist{hint}")
        return spec.model_copy(update={"weights": weights})

    @classmethod
    def parse(cls, text: str, *, source: str, is_json: bool = False) -> ModelSpec:
        """Validate a spec document; `weights` stays as written, relative to wherever `source` lives.

        Separate from `load` because a spec fetched from S3 names weights that are not downloaded yet.
        """
        try:
            raw = json.loads(text) if is_json else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as error:
            raise ConfigurationError(f"MODEL_URI: {source} is not valid YAML/JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigurationError(f"MODEL_URI: {source} must hold a mapping")
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in issue['loc'])}: {issue['msg']}" for issue in error.errors()
            )
            raise ConfigurationError(f"MODEL_URI: {source}: {problems}") from None

    def for_backend(self, backend: str | None) -> ModelSpec:
        """The same model on another backend: its weights beside the spec's own, with that backend's suffix."""
        if backend is None or backend == self.backend:
            return self
        weights = self.weights.with_suffix(BACKEND_SUFFIXES[backend])
        if not weights.is_file():
            hint = " (run `xray-pipeline model export --onnx`)" if backend == "onnx" else ""
            raise ConfigurationError(f"MODEL_BACKEND: {backend} needs {weights}, which does not exist{hint}")
        return self.model_copy(update={"backend": backend, "weights": weights})

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """One output vector -> class probabilities, aligned with class_names."""
        # Imported here: only workers interpret outputs, and numpy would be ~17 MB of the web process's memory.
        import numpy as np

        scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        if self.output.kind == "logits":
            if scores.size == 1:
                scores = 1.0 / (1.0 + np.exp(-scores))
            else:
                shifted = np.exp(scores - scores.max())
                scores = shifted / shifted.sum()
        # A single sigmoid unit with two class names is P(second class).
        if scores.size == 1 and len(self.output.class_names) == 2:
            scores = np.array([1.0 - scores[0], scores[0]])
        if scores.size != len(self.output.class_names):
            raise ValueError(
                f"model output has {scores.size} values but the spec names {len(self.output.class_names)} classes"
            )
        return scores

    def interpret(self, raw: np.ndarray) -> Prediction:
        """One output vector -> label, risk and top-k."""
        import numpy as np

        probabilities = self.probabilities(raw)
        order = np.argsort(-probabilities)[: self.output.top_k]
        top = [(self.output.class_names[i], float(probabilities[i])) for i in order]
        if self.output.positive_class is None:
            return Prediction(label=top[0][0], risk=None, is_positive=False, top=top)
        risk = float(probabilities[self.output.class_names.index(self.output.positive_class)])
        if risk >= self.labels.positive_threshold:
            label, positive = self.labels.positive, True
        elif risk < self.labels.negative_threshold:
            label, positive = self.labels.negative, False
        else:
            label, positive = self.labels.uncertain, False
        return Prediction(label=label, risk=risk, is_positive=positive, top=top)
