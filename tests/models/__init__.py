"""facecompat.models: backbones, their specs and ONNX export."""
