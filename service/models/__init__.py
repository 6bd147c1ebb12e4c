"""The model: what it is and what its outputs mean (`spec`), where its weights come from and how they are checked
(`source`), and how it is loaded and called in a worker (`backends`, Keras or ONNX Runtime)."""
