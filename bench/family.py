"""Other model families on the fused block: torchvision's MNASNet 1.0 and timm's
EfficientNet-Lite0, converted with mnv2_kernels.convert_model, against their unconverted
selves and the inference runtimes (CPU, fp32, random weights).

    python -m bench.family [--rounds 25] [--batches 1,8] [--train-batch 8] [--resolution 224]
                           [--models mnasnet1_0,efficientnet_lite0] [--block-model efficientnet_lite0]
                           [--block-kernel 5] [--peers onnxruntime,openvino,torch-compile]
                           [--threads 2] [--write] [--out DIR]

* Whole-model inference (eval, no gradient) at each batch: the converted model on a
  channels_last and on an NCHW image, against the unconverted model eagerly (channels_last),
  torch.compile of it (Inductor, channels_last), and ONNX Runtime and OpenVINO running its
  ONNX export (bench.peers). Paired rounds as in bench.paired_model: every round times each
  implementation in turn (a rotating order, the best of a few calls), and the ratios are per
  round, converted / peer, then the median over the rounds.
* The blocks of one model whose depthwise convolution has the given kernel (EfficientNet-
  Lite0's 5x5 blocks), each on its own at its input shape in the model (batch 1): converted
  against unconverted (channels_last), ms, GFLOP/s (2 x the multiply-adds of expand,
  depthwise and project: mnv2_kernels.flops.block_macs) and the percentage of the FMA peak
  measured in the same run (build/cmake/fma_peak, before these rows and after each, the largest
  reading).
* The training step's peak memory (train mode, forward, cross-entropy, backward; no
  optimizer): the converted model, the unconverted one, and the unconverted one with every
  block under torch.utils.checkpoint. The peak is resident memory above what was resident
  before the step (mnv2_kernels.memory.peak_bytes, with malloc serving large blocks by
  mmap; Linux only).

Prints markdown with a verdict line per goal; --write also saves it as
bench/results/<machine>/family.md, and the raw numbers as family.json.
"""

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings

MMAP_THRESHOLD = "65536"

import torch  # noqa: E402
from torch import nn  # noqa: E402

import mnv2_kernels  # noqa: E402
from mnv2_kernels import flops  # noqa: E402
from mnv2_kernels.memory import peak_bytes  # noqa: E402
from mnv2_kernels.testing import randomize_batch_norm  # noqa: E402

from bench import peers  # noqa: E402
from bench.machine import machine_info, machine_slug  # noqa: E402
from bench.memory_report import checkpoint_blocks  # noqa: E402
from bench.paired_model import paired_best  # noqa: E402

CL = torch.channels_last
MB = 1e6
CONVERTED = ["converted-cl", "converted-nchw"]
PEERS = ["eager-cl", "torch-compile", "onnxruntime", "openvino"]
RUNTIMES = ["onnxruntime", "openvino"]
# per round, the faster of the two inference runtimes
BEST_RUNTIME = "faster of onnxruntime and openvino"
TRAIN_IMPLS = ["converted", "eager", "eager+checkpoint"]

# the goals this script checks
RUNTIME_BOUND = 0.9  # converted / the faster of ONNX Runtime and OpenVINO, every model and batch
FMA_BOUND = 60.0  # % of the FMA peak, every block of the given kernel
TRAIN_BOUND = 0.3  # training-step peak, converted / eager


# ---------------------------------------------------------------------------------------------
# models and their blocks

def block_types() -> tuple:
    """The inverted-residual block classes of the families measured here (those importable):
    torchvision's MNASNet block, timm's InvertedResidual and DepthwiseSeparableConv, and
    torchvision's MobileNetV2 block."""
    types = []
    try:
        from torchvision.models.mnasnet import _InvertedResidual
        from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionInvertedResidual

        types += [_InvertedResidual, TorchvisionInvertedResidual]
    except ImportError:
        pass
    try:
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

        types += [InvertedResidual, DepthwiseSeparableConv]
    except ImportError:
        pass
    return tuple(types)


def build_model(name: str) -> nn.Module:
    """torchvision's model of that name if it has one, else timm's; random weights with random
    batch-norm statistics (so that folding is exercised), eval mode. ImportError when timm is
    needed and missing."""
    import torchvision

    torch.manual_seed(0)
    if hasattr(torchvision.models, name):
        model = getattr(torchvision.models, name)()
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    randomize_batch_norm(model, torch.Generator().manual_seed(0))
    return model.eval()


def source_of(name: str) -> str:
    import torchvision

    return "torchvision" if hasattr(torchvision.models, name) else "timm"


def count_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, block_types()) for m in model.modules())


def count_converted(model: nn.Module) -> int:
    return sum(isinstance(m, mnv2_kernels.FusedInvertedResidual) for m in model.modules())


def convert(model: nn.Module):
    """(a converted deep copy of model, convert_model's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = mnv2_kernels.convert_model(copy.deepcopy(model))
    return converted, [str(w.message) for w in caught]


def checkpoint_family_blocks(model: nn.Module) -> nn.Module:
    """Every block (block_types()) wrapped in torch.utils.checkpoint, in place: in training
    its activations are recomputed in backward instead of kept."""
    return checkpoint_blocks(model, block_types())


def block_geometry(block: nn.Module) -> dict:
    """A block's channels, stride and kernel, read from its convolutions: the depthwise one
    (groups == in_channels), a 1x1 expansion before it if any, the projection last."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    dw = next(c for c in convs if c.groups > 1 and c.groups == c.in_channels)
    return {"cin": convs[0].in_channels, "hidden": dw.in_channels, "cout": convs[-1].out_channels,
            "stride": dw.stride[0], "kernel": dw.kernel_size[0], "has_expand": convs.index(dw) > 0}


def block_inputs(model: nn.Module, resolution: int):
    """[(path, block, input shape)] of every block of model on one resolution x resolution image."""
    shapes, handles = {}, []
    types = block_types()
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, types)]
    def record(path):
        def hook(module, args):
            shapes.setdefault(path, tuple(args[0].shape))  # returns None: the input is unchanged
        return hook

    for path, m in blocks:
        handles.append(m.register_forward_pre_hook(record(path)))
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return [(path, m, shapes[path]) for path, m in blocks]


# ---------------------------------------------------------------------------------------------
# timing

def _forward(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            return module(x)
    return run


def warm_up(fns: dict, calls: int = 3, optional=()) -> dict:
    """Runs each function a few times (compilation, weight packing, first-call allocations).
    A function in optional that raises is dropped from fns; {name: why} of those dropped."""
    failed = {}
    for name in list(fns):
        try:
            for _ in range(calls):
                fns[name]()
        except Exception as e:  # a peer that cannot run this model: reported, not fatal
            if name not in optional:
                raise
            traceback.print_exc(file=sys.stderr)
            failed[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            del fns[name]
    return failed


def ratio_stats(best: dict, name: str, other: str):
    """Per round, name's best / other's best: (median, rounds name won, rounds)."""
    r = [a / b for a, b in zip(best[name], best[other])]
    return statistics.median(r), sum(x < 1 for x in r), len(r)


def with_best_runtime(best: dict) -> dict:
    """best plus, per round, the faster of ONNX Runtime and OpenVINO (when either ran)."""
    runtimes = [p for p in RUNTIMES if p in best]
    if not runtimes:
        return dict(best)
    return {**best, BEST_RUNTIME: [min(t) for t in zip(*(best[p] for p in runtimes))]}


# ---------------------------------------------------------------------------------------------
# the three measurements

def time_split(model: nn.Module, resolution: int, calls: int = 30) -> dict:
    """Where the converted model's batch-1 time goes: the whole model (channels_last, best of
    `calls`) and the sum of its converted blocks each timed alone at its input in the model;
    the rest is the layers outside the blocks (stem, head, pooling, classifier) and the calls
    between them."""
    converted, _ = convert(model)
    converted = converted.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    blocks = [m for m in converted.modules() if isinstance(m, mnv2_kernels.FusedInvertedResidual)]
    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone())) for b in blocks]
    with torch.no_grad():
        converted(x)
    for h in handles:
        h.remove()

    def best(fn):
        with torch.no_grad():
            for _ in range(3):
                fn()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return min(times)

    whole = best(lambda: converted(x))
    in_blocks = sum(best(lambda b=b, xi=xi: b(xi)) for b, xi in zip(blocks, inputs))
    return {"whole": whole, "blocks": in_blocks, "rest": whole - in_blocks, "count": len(blocks)}


def inference_case(name: str, model: nn.Module, batch: int, resolution: int, rounds: int, peer_names) -> dict:
    """The whole model at one batch: paired rounds of the converted model (channels_last and
    NCHW input) and its peers. Peers not installed or failing are listed under "missing"."""
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    xc = x.contiguous(memory_format=CL)
    converted_cl, _ = convert(model)
    converted_nchw, _ = convert(model)
    fns = {"converted-cl": _forward(converted_cl.to(memory_format=CL), xc),
           "converted-nchw": _forward(converted_nchw, x.contiguous()),
           "eager-cl": _forward(copy.deepcopy(model).to(memory_format=CL), xc)}
    missing = {}
    if "torch-compile" in peer_names:
        fns["torch-compile"] = peers.compiled_forward(copy.deepcopy(model), x)
    runtimes = [p for p in RUNTIMES if p in peer_names]
    if runtimes:
        available = peers.available()
        installed = [p for p in runtimes if available[p]]
        for p in runtimes:
            if not available[p]:
                missing[p] = "not installed (pip install .[peers])"
        onnx_path = None
        if installed:
            try:
                # the export has a dynamic batch but a fixed image size: the name carries both
                onnx_path = peers.export_onnx(copy.deepcopy(model), x, f"family-{name}-{resolution}")
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                for p in installed:
                    missing[p] = f"ONNX export failed: {type(e).__name__}"
        if onnx_path is not None:
            factories = {"onnxruntime": peers.onnxruntime_forward, "openvino": peers.openvino_forward}
            for p in installed:
                try:
                    fns[p] = factories[p](onnx_path, x)
                except Exception as e:
                    traceback.print_exc(file=sys.stderr)
                    missing[p] = f"failed: {type(e).__name__}"
    missing.update(warm_up(fns, optional=PEERS[1:]))
    best = paired_best(fns, rounds, calls=max(3, 24 // batch))
    return {"batch": batch, "rounds_best_s": best, "missing": missing}


def inference_ratios(case: dict) -> dict:
    """{converted name: {peer: (median ratio, rounds won, rounds)}} of one inference case."""
    best = with_best_runtime(case["rounds_best_s"])
    return {c: {p: ratio_stats(best, c, p) for p in best if p not in CONVERTED} for c in CONVERTED}


def block_case(path: str, block: nn.Module, shape, rounds: int) -> dict:
    """One block at its input shape: converted against unconverted, both channels_last."""
    g = block_geometry(block)
    # converted inside a container: convert_model replaces the blocks it finds in a model
    converted = convert(nn.Sequential(block))[0][0]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=CL)
    fns = {"converted-cl": _forward(converted.to(memory_format=CL), x),
           "eager-cl": _forward(copy.deepcopy(block).to(memory_format=CL), x)}
    warm_up(fns)
    macs = flops.block_macs(shape, g["hidden"], g["cout"], g["stride"], g["has_expand"], g["kernel"])
    ho = (shape[2] - 1) // g["stride"] + 1
    name = (f"{path} {g['cin']}->{g['cout']} e{g['hidden'] / g['cin']:g} k{g['kernel']} s{g['stride']} "
            f"{shape[2]}x{shape[3]}->{ho}x{ho}")
    best = paired_best(fns, rounds, calls=20)
    return {"block": name, "path": path, "input_shape": list(shape), **g, "flops": 2 * macs,
            "converted": isinstance(converted, mnv2_kernels.FusedInvertedResidual), "rounds_best_s": best}


def train_case(model: nn.Module, batch: int, resolution: int) -> dict:
    """{implementation: training-step peak bytes} of one model at one batch."""
    x = torch.randn(batch, 3, resolution, resolution,
                    generator=torch.Generator().manual_seed(3)).contiguous(memory_format=CL)
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(4))
    builders = {"converted": lambda: convert(model)[0],
                "eager": lambda: copy.deepcopy(model),
                "eager+checkpoint": lambda: checkpoint_family_blocks(copy.deepcopy(model))}
    peaks = {}
    for name, build in builders.items():
        m = build().train().to(memory_format=CL)

        def step():
            out = m(x)
            torch.nn.functional.cross_entropy(out, labels).backward()
            m.zero_grad(set_to_none=True)

        step()  # warm-up (first-call allocations, weight packing)
        peaks[name] = peak_bytes(step)
        del m, step
        gc.collect()
    return peaks


def train_rows(model_names, batch: int, resolution: int) -> dict:
    """{model: peaks} of the training step, in this process (see train_peaks_in_fresh_process)."""
    mmap_large_blocks()
    train = {}
    for name in model_names:
        try:
            train[name] = train_case(build_model(name), batch, resolution)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            train[name] = {"error": f"failed: {type(e).__name__}"}
        gc.collect()
    return train


def train_peaks_in_fresh_process(model_names, batch: int, resolution: int, threads: int) -> dict:
    """The training-step peaks measured in a new process started with malloc serving large
    blocks by mmap: in this one, the heap that the timings left behind would absorb part of
    each step's allocations, and the timings themselves must not run with that setting."""
    import subprocess

    code = (f"import json, torch; from bench import family; torch.set_num_threads({threads}); "
            f"print(json.dumps(family.train_rows({list(model_names)!r}, {batch}, {resolution})))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        return {name: {"error": "failed: the measuring process exited with an error"} for name in model_names}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mmap_large_blocks() -> None:
    """What MALLOC_MMAP_THRESHOLD_ does, from now on: glibc's mallopt(M_MMAP_THRESHOLD) makes
    malloc serve large blocks by mmap, so resident memory follows the live tensors. Called
    after the timings: every large allocation then costs page faults, which would slow the
    PyTorch implementations (a new output tensor per layer) more than the runtimes (arenas)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") == MMAP_THRESHOLD or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, int(MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def fma_peak(threads: int):
    """The FMA loop's GFLOP/s (bench.run.measure_fma_peak), or None when it is not built."""
    from bench.run import measure_fma_peak

    return measure_fma_peak(threads)


# ---------------------------------------------------------------------------------------------
# markdown

def _ms(seconds) -> str:
    return f"{seconds * 1e3:.3f}"


def inference_markdown(model_name: str, case: dict) -> list:
    best = with_best_runtime(case["rounds_best_s"])
    ratios = inference_ratios(case)
    lines = [f"### {model_name}, batch {case['batch']}: {len(best['converted-cl'])} rounds", "",
             "| implementation | median of the rounds' best, ms | converted-cl / it | converted-nchw / it | "
             "rounds converted-cl, converted-nchw won |", "|---|---:|---:|---:|---:|"]
    for name in CONVERTED + [p for p in PEERS if p in best or p in case["missing"]] + [BEST_RUNTIME]:
        if name in case["missing"]:
            lines.append(f"| {name} | {case['missing'][name]} | | | |")
            continue
        if name not in best:
            continue
        row = f"| {name} | {_ms(statistics.median(best[name]))} |"
        if name in CONVERTED:
            lines.append(row + " | | |")
            continue
        (cl, cl_won, n), (nchw, nchw_won, _) = ratios["converted-cl"][name], ratios["converted-nchw"][name]
        lines.append(row + f" {cl:.2f} | {nchw:.2f} | {cl_won}, {nchw_won} of {n} |")
    layout, _, _ = ratio_stats(best, "converted-nchw", "converted-cl")
    return lines + ["", f"converted-nchw / converted-cl, median of the rounds: {layout:.3f}", ""]


def blocks_markdown(rows: list, peak) -> list:
    head = ["block", "converted", "converted ms", "eager-cl ms", "converted / eager, median of rounds",
            "converted GFLOP/s", "eager GFLOP/s"]
    if peak:
        head += ["converted % of FMA peak", "eager % of FMA peak"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        best = r["rounds_best_s"]
        c, e = statistics.median(best["converted-cl"]), statistics.median(best["eager-cl"])
        gc_, ge = r["flops"] / c / 1e9, r["flops"] / e / 1e9
        cells = [r["block"], "yes" if r["converted"] else "no", _ms(c), _ms(e),
                 f"{ratio_stats(best, 'converted-cl', 'eager-cl')[0]:.2f}", f"{gc_:.1f}", f"{ge:.1f}"]
        if peak:
            cells += [f"{100 * gc_ / peak:.0f}%", f"{100 * ge / peak:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _div(a, b):
    """a / b, or None when b is 0 (a peak too small to see)."""
    return a / b if b else None


def _fmt(r) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def train_markdown(train: dict) -> list:
    lines = ["| model | implementation | peak MB | peak / eager | peak / eager+checkpoint |",
             "|---|---|---:|---:|---:|"]
    for model_name, peaks in train.items():
        if "error" in peaks:
            lines.append(f"| {model_name} | {peaks['error']} | | | |")
            continue
        for impl in TRAIN_IMPLS:
            p = peaks[impl]
            lines.append(f"| {model_name} | {impl} | {p / MB:.0f} | {_fmt(_div(p, peaks['eager']))} | "
                         f"{_fmt(_div(p, peaks['eager+checkpoint']))} |")
    return lines + [""]


def goals_markdown(inference: dict, blocks: list, peak, train: dict, block_kernel: int, block_model: str) -> list:
    lines = ["## Goals", ""]

    def check(label, items, bound, at_least=False, digits=3):
        """A verdict line: every item within bound (at most, or at least)."""
        if not items:
            lines.append(f"- {label}: not measured")
            return
        misses = [f"{k} ({v:.{digits}f})" for k, v in items if (v < bound if at_least else v > bound)]
        worst = (min if at_least else max)(v for _, v in items)
        lines.append(f"- {label} {'>=' if at_least else '<='} {bound:g}: worst {worst:.{digits}f} -> "
                     + ("met" if not misses else "missed by " + ", ".join(misses)))

    for layout in CONVERTED:
        items = []
        for model_name, cases in inference.items():
            for case in cases:
                r = inference_ratios(case)[layout]
                if BEST_RUNTIME in r:
                    items.append((f"{model_name} b{case['batch']}", r[BEST_RUNTIME][0]))
        check(f"whole model, {layout} / the faster of ONNX Runtime and OpenVINO (median of the rounds)",
              items, RUNTIME_BOUND)
    items = []
    if peak:
        for r in blocks:
            t = statistics.median(r["rounds_best_s"]["converted-cl"])
            items.append((r["path"], 100 * r["flops"] / t / 1e9 / peak))
    check(f"{block_model}'s {block_kernel}x{block_kernel} blocks, converted, % of the FMA peak"
          + ("" if peak else " (FMA peak not measured: build/cmake/fma_peak missing)"), items, FMA_BOUND,
          at_least=True, digits=1)
    check("training-step peak, converted / eager",
          [(m, _div(p["converted"], p["eager"])) for m, p in train.items()
           if "error" not in p and p["eager"]], TRAIN_BOUND)
    return lines + [""]


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--models", default="mnasnet1_0,efficientnet_lite0",
                        help="torchvision or timm model names (whole model and training rows)")
    parser.add_argument("--block-model", default="efficientnet_lite0", help="the model whose blocks get rows")
    parser.add_argument("--block-kernel", type=int, default=5, help="the depthwise kernel of the blocks with rows")
    parser.add_argument("--peers", default="onnxruntime,openvino,torch-compile",
                        help="peers of the whole-model rows, comma-separated (empty: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="also write bench/results/<machine>/family.md and .json")
    parser.add_argument("--out", default=None, help="the folder --write writes to (default: bench/results/<machine>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]
    peer_names = [p for p in args.peers.split(",") if p]
    unknown = set(peer_names) - set(PEERS[1:])
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {PEERS[1:]}")
    machine = machine_info()
    res = args.resolution

    models, skipped, conversion = {}, {}, {}
    for name in dict.fromkeys(args.models.split(",") + [args.block_model]):
        try:
            models[name] = build_model(name)
        except ImportError as e:
            skipped[name] = f"not available ({e}; pip install timm)"
            continue
        converted, messages = convert(models[name])
        conversion[name] = {"source": source_of(name), "blocks": count_blocks(models[name]),
                            "converted": count_converted(converted), "warnings": messages}
        for m in messages:
            print(f"{name}: {m}", file=sys.stderr)
    model_names = [n for n in args.models.split(",") if n in models]

    inference = {}
    for name in model_names:
        inference[name] = [inference_case(name, models[name], b, res, args.rounds, peer_names) for b in batches]
        gc.collect()

    peak_readings, blocks = [], []
    if args.block_model in models:
        # measured before the block rows and after each; the largest counts (a core busy with
        # another job halves a reading, and a shared machine's load comes and goes)
        peak_readings.append(fma_peak(args.threads))
        for path, block, shape in block_inputs(models[args.block_model], res):
            if block_geometry(block)["kernel"] == args.block_kernel:
                blocks.append(block_case(path, block, shape, args.rounds))
                peak_readings.append(fma_peak(args.threads))
    readings = [p for p in peak_readings if p]
    peak = max(readings) if readings else None

    split = {name: time_split(models[name], res) for name in model_names}

    train = train_peaks_in_fresh_process(model_names, args.train_batch, res, args.threads)

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    lines = ["# Model families on the fused block: converted against the unconverted model and its peers "
             "(CPU, fp32)", "",
             f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, timm {timm_version}, "
             f"fused kernels: {machine['cpu_isa']}; FMA peak "
             + (f"{peak:.1f} GFLOP/s (the largest of {len(readings)} readings, the smallest {min(readings):.1f})"
                if peak else "not measured")
             + f". Random weights (batch-norm statistics randomised), {res}x{res}. *converted* is "
             "mnv2_kernels.convert_model of the model; *eager* is the unconverted model.", "",
             "Conversion: " + "; ".join(f"{n} ({c['source']}): {c['converted']} of {c['blocks']} blocks converted"
                                        + (" (its converted rows time the unconverted model)"
                                           if not c["converted"] else "")
                                        for n, c in conversion.items())
             + "".join(f"; {n}: {why}" for n, why in skipped.items()) + ".", ""]
    lines += goals_markdown(inference, blocks, peak, train, args.block_kernel, args.block_model)
    lines += ["## Whole-model inference, paired rounds", "",
              "Eval mode, no gradient. Each round times every implementation in turn (rotating order, the best "
              "of a few calls); ratios are per round, converted / peer, then the median over the rounds. "
              "eager-cl and torch-compile (Inductor, default mode) run the unconverted model on a channels_last "
              "model and input; ONNX Runtime and OpenVINO run its ONNX export on the NCHW input with the same "
              "thread count.", ""]
    for name in model_names:
        for case in inference[name]:
            lines += inference_markdown(name, case)
    lines += ["## Where the converted model's batch-1 time goes", "",
              "The whole converted model (channels_last, the best of 30 calls) against the sum of its fused "
              "blocks, each timed alone (best of 30) at its input in the model; the rest is the layers outside "
              "the blocks, which run as the model's own modules (stem, head, pooling, classifier).", "",
              "| model | whole ms | fused blocks ms | rest ms | rest / whole |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} ({v['count']} blocks) | {v['whole'] * 1e3:.2f} | {v['blocks'] * 1e3:.2f} | "
              f"{v['rest'] * 1e3:.2f} | {v['rest'] / v['whole']:.2f} |" for n, v in split.items()]
    lines += [""]
    if args.block_model in models:
        lines += [f"## {args.block_model}'s {args.block_kernel}x{args.block_kernel} blocks, batch 1", "",
                  f"Each block on its own at its input shape in the model ({res}x{res} image), channels_last, "
                  f"{args.rounds} paired rounds of the best of 20 calls; ms is the median of the rounds. GFLOP/s "
                  "counts 2 x the multiply-adds of expand, depthwise (k x k) and project.", ""]
        lines += blocks_markdown(blocks, peak)
    lines += [f"## Training-step peak memory, batch {args.train_batch} at {res}x{res}", "",
              "Train mode, channels_last, forward, cross-entropy and backward (no optimizer); resident memory "
              "above what was resident before the step (model and input excluded), MB = 1e6 bytes. "
              "eager+checkpoint wraps every block in torch.utils.checkpoint.", ""]
    lines += train_markdown(train)
    text = "\n".join(lines)
    print(text, end="")
    if args.write:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", machine_slug(machine))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "family.md"), "w") as f:
            f.write(text)
        raw = {"machine": machine, "timm": timm_version, "settings": vars(args), "conversion": conversion,
               "skipped": skipped, "fma_peak_gflops": {"readings": peak_readings, "used": peak},
               "inference": {n: [{**c, "ratios": inference_ratios(c)} for c in cases]
                             for n, cases in inference.items()},
               "blocks": blocks, "time_split_s": split, "train_peak_bytes": train,
               "goals": {"runtime_bound": RUNTIME_BOUND, "fma_percent_bound": FMA_BOUND, "train_bound": TRAIN_BOUND}}
        with open(os.path.join(out, "family.json"), "w") as f:
            json.dump(raw, f, indent=1)
        print(f"written to {os.path.relpath(out)}/family.md and family.json")
    return text


if __name__ == "__main__":
    main()
