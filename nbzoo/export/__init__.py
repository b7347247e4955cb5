"""Export to ONNX (and Ascend .om through ATC) and the offline-inference backends."""
