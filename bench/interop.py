"""The model where torchvision's MobileNetV2 goes, measured: each row runs one thing a user
does with torchvision's model on ours and on torchvision's, with the same weights.

    python -m bench.interop [--device cpu|cuda] [--out DIR]

Rows: torch.fx and feature extraction, both ONNX exporters into ONNX Runtime (dynamic
batch, two batch sizes), TorchScript script and trace, FlopCounterMode, and autocast (the
error against a float64 run of torchvision's model without autocast, ours over
torchvision's). Prints a markdown table and writes it to DIR/interop.md (default
bench/results/<machine>/).
"""

import argparse
import copy
import io
import os
import warnings

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor

import mnv2_kernels
from mnv2_kernels.testing import randomize_batch_norm
from bench.machine import machine_info, machine_slug


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def models(device, width=1.0):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(num_classes=50, width_mult=width, dropout=0.0)
    randomize_batch_norm(tv, torch.Generator().manual_seed(1))
    ours = mnv2_kernels.mobilenet_v2(num_classes=50, width_mult=width, dropout=0.0)
    ours.load_state_dict(tv.state_dict())
    return ours.to(device), tv.to(device)


def fx_rows(device):
    ours, tv = models(device)
    x = torch.rand(2, 3, 128, 128, device=device)
    rows = []
    for train in (False, True):
        nodes = {"features.3": "c2", "features.13": "c4", "features.18": "head"}
        a = create_feature_extractor(copy.deepcopy(ours).train(train), nodes)(x)
        b = create_feature_extractor(copy.deepcopy(tv).train(train), nodes)(x)
        worst = max(rel(a[k], b[k]) for k in nodes.values())
        rows.append((f"create_feature_extractor, {'train' if train else 'eval'}", "works",
                     f"largest relative difference {worst:.1e}"))
    gm = torch.fx.symbolic_trace(ours.eval())
    blocks = sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), mnv2_kernels.FusedInvertedResidual)
                 for n in gm.graph.nodes)
    with torch.no_grad():
        rows.append(("torch.fx.symbolic_trace", f"works, {blocks} fused block nodes",
                     f"relative difference {rel(gm(x), tv.eval()(x)):.1e}"))
    return rows


def onnx_rows():
    import onnx
    import onnxruntime as ort

    ours, tv = models("cpu")
    ours.eval()
    tv.eval()
    rows = []
    for dynamo in (True, False):
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(ours, (torch.rand(2, 3, 128, 128),), f, dynamo=True, input_names=["x"],
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
            else:
                torch.onnx.export(ours, (torch.rand(2, 3, 128, 128),), f, dynamo=False, input_names=["x"],
                                  dynamic_axes={"x": {0: "batch"}})
        ops = sorted({n.op_type for n in onnx.load_from_string(f.getvalue()).graph.node})
        session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
        errs = []
        for batch in (1, 3):
            x = torch.rand(batch, 3, 128, 128)
            (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                errs.append(rel(torch.from_numpy(y), tv(x)))
        rows.append((f"torch.onnx.export(dynamo={dynamo}) into ONNX Runtime", "works: " + ", ".join(ops),
                     f"relative difference to torchvision at batch 1 and 3: {errs[0]:.1e}, {errs[1]:.1e}"))
    return rows


def torchscript_rows(device):
    ours, tv = models(device)
    ours.eval()
    tv.eval()
    x = torch.rand(2, 3, 128, 128, device=device)
    rows = []
    with torch.no_grad():
        want = tv(x)
        for name, make in (("torch.jit.script", lambda: torch.jit.script(ours)),
                           ("torch.jit.trace (default checks)", lambda: torch.jit.trace(ours, x))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = make()
            calls = str(m.inlined_graph).count("mnv2::fused_inverted_residual")
            rows.append((name, f"works, {calls} fused operator calls", f"relative difference {rel(m(x), want):.1e}"))
    return rows


def flop_rows(device):
    ours, tv = models(device)
    rows = []
    for train in (False, True):
        for channels_last in (False, True):
            x = torch.rand(2, 3, 224, 224, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            totals = []
            for m in (tv.train(train), ours.train(train), ours):
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    m(x)
                totals.append(counter.get_total_flops())
            rows.append((f"FlopCounterMode, {'train' if train else 'eval'}, "
                         f"{'channels_last' if channels_last else 'NCHW'}",
                         f"ours / torchvision: {totals[1] / totals[0]:.6f} (first call), "
                         f"{totals[2] / totals[0]:.6f} (second)", f"torchvision {totals[0]:,}"))
    return rows


def autocast_rows(device):
    dtypes = (torch.bfloat16,) if device == "cpu" else (torch.float16, torch.bfloat16)
    ours, tv = models(device, width=0.5)
    rows = []
    for dtype in dtypes:
        for train in (False, True):
            for channels_last in (False, True):
                x = torch.rand(8, 3, 128, 128, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    ref = copy.deepcopy(tv).double().train(train)(x.double())
                    outs = []
                    for m in (ours, tv):
                        with torch.autocast(device, dtype=dtype):
                            outs.append(copy.deepcopy(m).train(train)(x))
                ratio = rel(outs[0].float(), ref) / rel(outs[1].float(), ref)
                rows.append((f"autocast {device} {str(dtype)[6:]}, {'train' if train else 'eval'}, "
                             f"{'channels_last' if channels_last else 'NCHW'}",
                             f"output {str(outs[0].dtype)[6:]} (torchvision {str(outs[1].dtype)[6:]})",
                             f"error vs float64, ours / torchvision: {ratio:.2f}"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = fx_rows(args.device)
    if args.device == "cpu":
        rows += onnx_rows()
    rows += torchscript_rows(args.device) + flop_rows(args.device) + autocast_rows(args.device)
    machine = machine_info()
    lines = [f"# Interoperability: {machine.get('cpu', '')} {args.device}", "",
             f"`python -m bench.interop --device {args.device}`; torch {torch.__version__}, "
             f"torchvision {torchvision.__version__}.", "",
             "| what | result | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or os.path.join("bench", "results", machine_slug(machine))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "interop.md" if args.device == "cpu" else "interop_cuda.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
