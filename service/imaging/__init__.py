"""Pixels, in the worker processes only (OpenCV, Pillow): the web process never imports this package.

- `codec`: decode untrusted uploads (format sniffing, limits), convert for the model, encode outputs.
- `text`: find burned-in text lines.
- `redact`: make the text in those boxes unreadable.
- `stamp`: stamp the label and risk where no text is.
- `patient_text`: burn patient-like text into images (the demo's and the tests' inputs).
"""
