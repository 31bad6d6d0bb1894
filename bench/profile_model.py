"""Where the whole model's inference time goes, layer by layer (CPU, fp32, channels_last).

    python -m bench.profile_model [--batch 1] [--repeats 200]

Times every top-level layer of mnv2_kernels.mobilenet_v2 (the stem, the 17 fused blocks, the
head convolution, then pooling + classifier) on the activations the model really feeds it, next
to torchvision's layer in channels_last. For each fused block it also times the packed operator
called directly, so the difference is the Python module's per-call cost. The best of several
rounds is kept: background load only ever adds time. Prints a markdown table.
"""

import argparse
import time

import torch
import torchvision

from mnv2_kernels import FusedInvertedResidual, ops
from mnv2_kernels.testing import randomize_batch_norm

from bench.cases import block_flops, BLOCKS

CL = torch.channels_last


def best_time(fn, repeats: int, rounds: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _op_only(block: FusedInvertedResidual, x: torch.Tensor):
    """The packed operator as the module calls it, without the module."""
    packed = block._packed_weights(x, block._state(block._parts()))
    parts = block._parts()
    op = ops.BLOCK_PACKED
    args = (packed, parts[2].out_channels, parts[4].out_channels, parts[0] is not None, block.stride,
            block.use_res_connect)
    return lambda: op(x, *args)


def profile(batch: int, repeats: int):
    import mnv2_kernels

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2().eval()
    randomize_batch_norm(tv)
    fused = mnv2_kernels.mobilenet_v2().eval()
    fused.load_state_dict(tv.state_dict())
    tv = tv.to(memory_format=CL)
    fused = fused.to(memory_format=CL)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=CL)
    rows = []
    with torch.no_grad():
        total_fused = best_time(lambda: fused(x), max(1, repeats // 20))
        total_tv = best_time(lambda: tv(x), max(1, repeats // 20))
        h = x
        for i, (f_layer, t_layer) in enumerate(zip(fused.features, tv.features)):
            f_time = best_time(lambda: f_layer(h), repeats)
            t_time = best_time(lambda: t_layer(h), repeats)
            op_time = None
            flops = None
            if isinstance(f_layer, FusedInvertedResidual):
                op_time = best_time(_op_only(f_layer, h), repeats)
                flops = block_flops(BLOCKS[i - 1], batch)
                name = f"block{i:02d}"
            else:
                name = "stem" if i == 0 else "head conv 1x1"
            rows.append((name, tuple(h.shape[1:]), f_time, op_time, t_time, flops))
            h = f_layer(h)

        def head(m):
            classify = m._classify if hasattr(m, "_classify") else m.classifier
            return lambda: classify(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))
        rows.append(("pool + classifier", tuple(h.shape[1:]), best_time(head(fused), repeats), None,
                     best_time(head(tv), repeats), None))
        # what the model runs instead of the first two rows: one operator (ops.stem_block)
        stem_block = best_time(lambda: fused._stem_and_first_block(x), repeats)
        two = best_time(lambda: tv.features[1](tv.features[0](x)), repeats)
        rows.append((STEM_ROW, tuple(x.shape[1:]), stem_block, None, two, None))
        # and instead of the last two: the head with the pooling, then the classifier
        h_head = fused.features[:-1](x)
        head_pool, classify = _head_steps(fused, h_head)
        pooled = head_pool(h_head)
        rows.append((HEAD_ROW, tuple(h_head.shape[1:]), best_time(lambda: head_pool(h_head), repeats),
                     None, best_time(lambda: torch.flatten(torch.nn.functional.adaptive_avg_pool2d(
                         tv.features[-1](h_head), 1), 1), repeats), None))
        rows.append((CLASSIFIER_ROW, tuple(pooled.shape[1:]), best_time(lambda: classify(pooled), repeats),
                     None, best_time(lambda: tv.classifier(pooled), repeats), None))
        in_model = in_model_times(fused, x, max(20, repeats // 4))
        # the whole model once more, after the layers (the better of the two readings)
        total_fused = min(total_fused, best_time(lambda: fused(x), max(1, repeats // 20)))
    rows = [r + (in_model.get(r[0]),) for r in rows]
    return rows, total_fused, total_tv


def whole_model_lines(rows, total_fused: float, batch: int, threads: int) -> list:
    """The whole model in one call against the sum of its layers alone as operators (the
    packed operator of each block, the fused stem and head rows), and its FLOP rate
    against the FMA peak measured now (build/cmake/fma_peak)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.run import measure_fma_peak

    model_rows = [r for r in rows if (r[0].startswith("block") and r[0] != "block01")
                  or r[0] in (STEM_ROW, HEAD_ROW, CLASSIFIER_ROW)]
    ops_sum = sum(r[3] if r[3] is not None else r[2] for r in model_rows)
    tv = torchvision.models.mobilenet_v2().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tv(torch.zeros(batch, 3, 224, 224))
    flops = counter.get_total_flops()
    rate = flops / total_fused / 1e9
    peak = measure_fma_peak(threads)
    lines = [f"Whole model in one call: {total_fused * 1e3:.2f} ms, {total_fused / ops_sum:.2f}x the sum of its "
             f"layers alone as operators ({ops_sum * 1e3:.2f} ms; both the best of 7 rounds).",
             f"{flops / 1e9:.2f} GFLOP per call: {rate:.0f} GFLOP/s"
             + (f", {100 * rate / peak:.0f}% of the FMA peak measured now ({peak:.0f} GFLOP/s, {threads} threads)."
                if peak else " (no FMA peak: build/cmake/fma_peak not built).")]
    return lines


STEM_ROW = "stem + block01, fused (the model's path)"
HEAD_ROW = "head conv + pool, fused (the model's path)"
CLASSIFIER_ROW = "classifier (the model's path)"


def _head_steps(fused, h):
    """The model's last two steps on the head's input h, as its inference plan runs them:
    the head conv with the average pooling in one operator, then the classifier."""
    from mnv2_kernels.model import _linear_packed

    head = fused.features[-1]
    packed, cout, act = head._pointwise_args(h, head._state())
    classifier = fused._classifier_args(h.new_empty((1, cout)))
    return (lambda t: ops.pointwise_conv_mean(t, packed, cout, act)), (lambda t: _linear_packed(t, *classifier))


def in_model_times(fused, x, passes: int):
    """Median time of each layer the model runs, timed in model order inside whole passes
    (so each layer finds the caches as the layers before it left them), by row name."""
    import statistics

    feats = list(fused.features)
    head_pool, classify = _head_steps(fused, fused.features[:-1](x))
    steps = [(STEM_ROW, fused._stem_and_first_block)]
    steps += [(f"block{i:02d}", feats[i]) for i in range(2, len(feats) - 1)]
    steps += [(HEAD_ROW, head_pool), (CLASSIFIER_ROW, classify)]
    times = {name: [] for name, _ in steps}
    for p in range(passes + 2):
        h = x
        for name, fn in steps:
            start = time.perf_counter()
            h = fn(h)
            if p >= 2:  # two warm-up passes
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def to_markdown(rows, total_fused, total_tv, batch: int) -> str:
    # the layers the model runs: the fused stem + block01 replaces the first two rows, the
    # fused head + pool and the classifier the last two module rows
    model_rows = [r for r in rows if (r[0].startswith("block") and r[0] != "block01")
                  or r[0] in (STEM_ROW, HEAD_ROW, CLASSIFIER_ROW)]
    summed = sum(r[2] for r in model_rows)
    by_name = {r[0]: r for r in rows}
    lines = [
        f"## Whole model, batch {batch}: where the time goes (fused model {total_fused * 1e3:.2f} ms, "
        f"torchvision channels_last {total_tv * 1e3:.2f} ms)",
        "",
        "Each layer timed alone on its real input (best of 7 rounds). *op only*: the packed operator "
        "called directly; module - op is the Python module's per-call cost. The model runs the stem "
        "and block01 as one operator, and the head conv with the pooling as another, then the "
        "classifier (the last three rows); the shares and the sums count those rows instead of the "
        "module rows they replace. (The whole model runs as one C++ call: no Python between layers.)",
        "",
        "*in model*: the median time of the layer timed in model order inside whole passes, where "
        "its weights and input come from wherever the layers before it left them (L3 or DRAM) "
        "rather than from the cache a repeated call warms.",
        "",
        "| layer | input | fused ms | op only ms | module - op us | share of model | GFLOP/s | "
        "torchvision-cl ms | fused / tv | in model ms | in model / alone |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names_in = {r[0] for r in model_rows}

    def r_in(name):
        return name in names_in

    for name, shape, f, op, t, flops, inm in rows:
        lines.append(
            f"| {name} | {'x'.join(map(str, shape))} | {f * 1e3:.3f} | "
            + (f"{op * 1e3:.3f} | {(f - op) * 1e6:.1f}" if op is not None else " | ")
            + (f" | {100 * f / summed:.1f}% | " if r_in(name) else " | | ") + (f"{flops / f / 1e9:.1f}" if flops else "")
            + f" | {t * 1e3:.3f} | {f / t:.2f} | "
            + (f"{inm * 1e3:.3f} | {inm / f:.2f} |" if inm is not None else " | |"))
    blocks = [r for r in model_rows if r[3] is not None]
    overhead = sum(r[2] - r[3] for r in blocks)
    lines += [
        "",
        f"Sum of the layers the model runs: {summed * 1e3:.2f} ms; blocks 2-17 "
        f"{sum(r[2] for r in blocks) * 1e3:.2f} ms, of which Python module overhead {overhead * 1e3:.3f} ms; "
        f"stem + block01 fused {by_name[STEM_ROW][2] * 1e3:.3f} ms (apart: {(rows[0][2] + rows[1][2]) * 1e3:.3f} ms); "
        f"head conv + pool fused + classifier {(by_name[HEAD_ROW][2] + by_name[CLASSIFIER_ROW][2]) * 1e3:.3f} ms "
        f"(module by module: {(by_name['head conv 1x1'][2] + by_name['pool + classifier'][2]) * 1e3:.3f} ms).",
        f"Timed inside the model the same layers sum to {sum(r[6] for r in model_rows) * 1e3:.2f} ms "
        "(medians).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    rows, tf, tt = profile(args.batch, args.repeats)
    print(to_markdown(rows, tf, tt, args.batch))
    print("\n".join(whole_model_lines(rows, tf, args.batch, torch.get_num_threads())))


if __name__ == "__main__":
    main()
