"""`emo-edge export`: checkpoint + pools + budget -> a verified ONNX bundle (see pipeline.py)."""
