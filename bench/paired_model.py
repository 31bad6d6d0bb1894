"""The whole model against its peers, paired round by round (CPU, fp32, the fused model
on an NCHW and on a channels_last image).

    python -m bench.paired_model [--rounds 25] [--batches 1,8,32]

On a shared machine background load comes and goes over seconds, so timing each
implementation in its own block of seconds (as pytest-benchmark does) lets the load
pick the winner. Here every round times each implementation in turn, a few calls each,
in a rotating order; the round's best call per implementation gives one ratio per
round, fused / peer, and the table reports the median ratio over the rounds and how
many rounds the fused model won. The implementations are those of `make bench`
(bench/cases.py), built the same way. Prints a markdown section.
"""

import argparse
import statistics
import time

import torch

from bench.cases import forward_impls, make_model

FUSED = ["fused-cl", "fused-nchw"]
PEERS = ["onnxruntime", "openvino", "torch-compile", "torchvision-cl"]
# per round, the faster of the two inference runtimes
BEST_RUNTIME = "faster of onnxruntime and openvino"


def paired(batch: int, rounds: int):
    model, make_input = make_model()
    impls = forward_impls(model, make_input(batch), is_block=False, name="model")
    names = FUSED + [p for p in PEERS if p in impls]
    for name in names:  # warm-up (compilation, caches, first-call packing)
        for _ in range(3):
            impls[name]()
    return names, paired_best({name: impls[name] for name in names}, rounds, max(3, 24 // batch))


def paired_best(fns: dict, rounds: int, calls: int) -> dict:
    """{name: [the best of `calls` calls, per round]}: each round times every function in turn,
    in an order rotated by one each round."""
    names = list(fns)
    best = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name].append(min(times))
    return best


def ratios(best, name, peer):
    """Per round, name's best / peer's best: (median, rounds name won, rounds)."""
    r = [f / p for f, p in zip(best[name], best[peer])]
    return statistics.median(r), sum(x < 1 for x in r), len(r)


def to_markdown(batch: int, names, best) -> str:
    best = dict(best)
    runtimes = [p for p in ("onnxruntime", "openvino") if p in best]
    if runtimes:
        best[BEST_RUNTIME] = [min(t) for t in zip(*(best[p] for p in runtimes))]
        names = names + [BEST_RUNTIME]
    lines = [f"### batch {batch}: {len(best[FUSED[0]])} rounds", "",
             "| implementation | median of the rounds' best, ms | fused-cl / it | fused-nchw / it | "
             "rounds fused-cl, fused-nchw won |", "|---|---:|---:|---:|---:|"]
    for name in names:
        row = f"| {name} | {statistics.median(best[name]) * 1e3:.3f} |"
        if name in FUSED:
            lines.append(row + " | | |")
            continue
        (cl, cl_wins, n), (nchw, nchw_wins, _) = ratios(best, "fused-cl", name), ratios(best, "fused-nchw", name)
        lines.append(row + f" {cl:.2f} | {nchw:.2f} | {cl_wins}, {nchw_wins} of {n} |")
    layout, _, _ = ratios(best, "fused-nchw", "fused-cl")
    lines += ["", f"fused-nchw / fused-cl, median of the rounds: {layout:.3f}"]
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args(argv)
    out = [f"## Whole model, paired rounds ({torch.get_num_threads()} threads)", "",
           "Each round times every implementation in turn (rotating order, the best of a few "
           "calls); ratios are per round, fused / peer, then the median over the rounds.", ""]
    for batch in (int(b) for b in args.batches.split(",")):
        names, best = paired(batch, args.rounds)
        out.append(to_markdown(batch, names, best))
    print("\n".join(out))


if __name__ == "__main__":
    main()
