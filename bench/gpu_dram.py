"""DRAM bytes of the fused forward per block, read with Nsight Compute.

    ncu --profile-from-start off --csv --page raw --clock-control none \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum \
        python -m bench.gpu_dram run > ncu.csv
    python -m bench.gpu_dram parse ncu.csv OUT/dram.json

`run` calls the operator once per (block, backend) inside a profiled region
(cudaProfilerStart/Stop), each region opened by a marker kernel
(torch.cuda._sleep, "spin_kernel"), so `parse` can attribute every kernel that
follows a marker to that call. The weights are folded beforehand, so a region
holds only the operator's own kernels.
"""

import csv
import json
import sys

import torch

import mnv2_kernels
from mnv2_kernels import ops
from mnv2_kernels.model import mobilenet_block_shapes
from mnv2_kernels.testing import randomize_batch_norm
from torchvision.models.mobilenetv2 import InvertedResidual

BATCH = 64


def calls():
    from bench.gpu_bench import backends_here

    out = []
    for i, (inp, oup, stride, t, h) in enumerate(mobilenet_block_shapes()):
        torch.manual_seed(i)
        tv = InvertedResidual(inp, oup, stride, t)
        randomize_batch_norm(tv)
        fused = mnv2_kernels.convert_model(tv).cuda().half().eval()
        with torch.no_grad():
            weights = fused.folded_weights()
        x = torch.randn(BATCH, inp, h, h, device="cuda").half().contiguous(memory_format=torch.channels_last)
        ho = (h - 1) // stride + 1
        io = (x.numel() + BATCH * oup * ho * ho) * 2 + sum(w.numel() * 2 for w in weights if w is not None)
        for b in backends_here("cuda"):
            out.append((f"block{i + 1:02d}", b, io,
                        lambda x=x, w=weights, b=b, s=stride, r=fused.use_res_connect:
                        ops.fused_inverted_residual(x, *w, s, r, b)))
    return out


def run():
    todo = calls()
    with torch.no_grad():
        for *_, fn in todo:  # compile and warm up outside the profiled regions
            fn()
        torch.cuda.synchronize()
        meta = []
        for block, backend, io, fn in todo:
            torch.cuda.profiler.start()
            torch.cuda._sleep(100)
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            meta.append({"block": block, "backend": backend, "io_bytes": io})
    print("MNV2_DRAM_META " + json.dumps(meta), file=sys.stderr)


def parse(csv_path, meta_path, out_path):
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    with open(meta_path) as f:
        meta = next(json.loads(line.split(" ", 1)[1]) for line in f if line.startswith("MNV2_DRAM_META"))

    def number(r, key):
        v = r.get(key, "0").replace(",", "")
        try:
            return float(v)
        except ValueError:
            return 0.0

    results, current = [], -1
    for r in rows:
        name = r.get("Kernel Name", "")
        if not name or name == "Kernel Name":
            continue
        if "spin" in name:
            current += 1
            if current < len(meta):
                results.append(dict(meta[current], bytes=0.0, kernels=[]))
            continue
        if 0 <= current < len(results):
            results[current]["bytes"] += number(r, "dram__bytes_read.sum") + number(r, "dram__bytes_write.sum")
            results[current]["kernels"].append(name[:80])
    # the unit row of --page raw says whether bytes are plain bytes (ncu may print Kbyte/Mbyte)
    units = rows[0] if rows and rows[0].get("Kernel Name", "") == "" else {}
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(units.get("dram__bytes_read.sum", "byte"), 1)
    for r in results:
        r["bytes"] *= scale
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"gpu_dram: {len(results)} regions -> {out_path}")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run()
    else:
        parse(sys.argv[2], sys.argv[3], sys.argv[4])
