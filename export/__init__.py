"""Export layer (AOTInductor, ONNX, TensorRT engines), installed as ``fastfm.export``.

Filled by the export issue.
"""
