"""int8 artifacts: calibration, the accuracy gate, and one backend per runtime (ONNX Runtime, PT2E/AOTInductor)."""
