"""Pixels, in the worker processes only (OpenCV, Pillow, ONNX Runtime): the web process never imports this package.

- `codec`: decode untrusted uploads (format sniffing, limits), convert for the model, encode outputs.
- `detection`: find burned-in text precisely: `text` proposes, `ocr_models` decide and read markers.
- `text`: propose burned-in text lines (a fast line search; on textured anatomy, more than the text).
- `ocr_models`: PP-OCR's learned text detector and recognizer, run with ONNX Runtime.
- `redact`: make the text in those boxes unreadable.
- `stamp`: stamp the label and risk where no text is.
- `patient_text`: burn patient-like text into images (the demo's and the tests' inputs).
"""
