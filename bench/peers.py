"""Peers of the benchmark: ONNX Runtime and OpenVINO (the `peers` extra) on the
torchvision module exported to ONNX, and torch.compile (Inductor). Each factory
returns a ready-to-time callable, or None when the peer is not installed."""

import hashlib
import os
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONNX_CACHE = os.path.join(ROOT, "build", "bench-onnx")


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def available() -> dict:
    return {"onnxruntime": _have("onnxruntime") and _have("onnx"),
            "openvino": _have("openvino") and _have("onnx")}


def export_onnx(module: torch.nn.Module, example: torch.Tensor, name: str) -> str:
    """The module (eval) as ONNX with a dynamic batch dimension, cached by name and weights."""
    digest = hashlib.sha1(b"".join(t.detach().numpy().tobytes()[:4096] for t in module.state_dict().values())).hexdigest()[:12]
    path = os.path.join(ONNX_CACHE, f"{name}-{digest}.onnx")
    if not os.path.exists(path):
        os.makedirs(ONNX_CACHE, exist_ok=True)
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(module.eval(), (example.contiguous(),), path, dynamo=True, opset_version=18,
                          dynamic_shapes={"x": {0: batch}}, verbose=False)
    return path


def onnxruntime_forward(path: str, x: torch.Tensor) -> Optional[Callable]:
    if not available()["onnxruntime"]:
        return None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x.contiguous().numpy()}
    return lambda: session.run(None, feed)


def openvino_forward(path: str, x: torch.Tensor) -> Optional[Callable]:
    if not available()["openvino"]:
        return None
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    model.reshape(list(x.shape))  # static shapes: what a latency-minded user compiles
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()
    data = x.contiguous().numpy()
    return lambda: request.infer({0: data})


def compiled_forward(module: torch.nn.Module, x: torch.Tensor) -> Callable:
    """torch.compile (Inductor, default mode) of the channels_last module, inference."""
    compiled = torch.compile(module.eval().to(memory_format=torch.channels_last))
    xc = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad():
            return compiled(xc)
    return run
