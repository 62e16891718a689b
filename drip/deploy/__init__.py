"""A trained detector outside Drip's training: ``export`` (ONNX or TorchScript files that describe
themselves) and ``onnx_infer`` (``drip infer`` on an ONNX file with ONNX Runtime, no PyTorch).
"""
