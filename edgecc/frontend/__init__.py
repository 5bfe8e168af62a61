"""ONNX in: loading and checking, the model signature, import into Relax, op coverage."""
