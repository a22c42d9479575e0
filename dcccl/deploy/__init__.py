"""Taking a finished run to devices and users: the ONNX and TorchScript bundles, predictions on image files."""
