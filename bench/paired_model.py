"""The whole model against its peers, paired round by round (CPU, fp32, channels_last).

    python -m bench.paired_model [--rounds 25] [--batches 1,8]

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

FUSED = "fused-cl"
PEERS = ["onnxruntime", "openvino", "torch-compile", "torchvision-cl"]


def paired(batch: int, rounds: int):
    model, make_input = make_model()
    impls = forward_impls(model, make_input(batch), is_block=False, name="model")
    names = [FUSED] + [p for p in PEERS if p in impls]
    for name in names:  # warm-up (compilation, caches, first-call packing)
        for _ in range(3):
            impls[name]()
    calls = max(3, 24 // batch)
    best = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = impls[name]
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name].append(min(times))
    return names, best


def to_markdown(batch: int, names, best) -> str:
    fused = best[FUSED]
    lines = [f"### batch {batch}: {len(fused)} rounds", "",
             "| implementation | median of the rounds' best, ms | fused / it, median of the rounds | "
             "rounds the fused model won |", "|---|---:|---:|---:|"]
    for name in names:
        row = f"| {name} | {statistics.median(best[name]) * 1e3:.3f} |"
        if name == FUSED:
            lines.append(row + " | |")
            continue
        ratios = [f / p for f, p in zip(fused, best[name])]
        wins = sum(r < 1 for r in ratios)
        lines.append(row + f" {statistics.median(ratios):.2f} | {wins} of {len(ratios)} |")
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--batches", default="1,8")
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
