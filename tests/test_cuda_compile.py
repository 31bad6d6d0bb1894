"""Compile gate of the CUDA kernels (csrc/cuda/fused_ir_cuda.cu), without a GPU.

The file is compiled once per session with nvcc for sm_80 and sm_90 (the flags of the
Makefile's cuda-resources target, ptxas -v; object, ptxas.log and the planning driver in
pytest's temporary directory, .../ptxas-gate0/), and:

* no kernel spills or has a stack frame (ptxas's report);
* the fp16 and bf16 forward kernels run on tensor cores (HMMA / *GMMA in the SASS,
  cuobjdump -sass);
* each kernel's shared memory at the tile its launcher picks fits the opt-in limit of
  each arch for the 17 MobileNetV2 blocks at batch 1 and 64 in fp32, fp16 and bf16, and
  the launcher does not have to shrink the tile for that (the size functions are the
  file's own, evaluated by a host program built from its planning part,
  tests/cuda_ptxas.py);
* the backward grids fill the GPU: at batch 64, 128 and 256 on a 132-SM H100 (the
  occupancy from ptxas's registers and the shared memory), at least two full waves of
  CTAs without a nearly empty last one, with partial buffers within their bounds; and at
  batch 32 the partial buffers of tests/test_gpu.py::test_no_hidden_sized_allocation's
  blocks stay within that test's budget.

Skipped only when nvcc is not installed. Takes about a minute on two cores (the two
device compiles; `pytest -s` prints the times and the tables).
"""

import time

import pytest

import cuda_ptxas as cp
from conftest import BLOCK_SHAPES, make_pair

pytestmark = pytest.mark.skipif(cp.find_nvcc() is None,
                                reason=f"nvcc not found (CUDA_HOME={cp.cuda_home()}): the CUDA compile "
                                       "gate needs the CUDA toolkit")

H100_SMS = 132
BATCHES_TWO_WAVES = (64, 128, 256)
FLOAT_DTYPES = ("fp32", "fp16", "bf16")  # accumulate in fp32: 4-byte shared arrays
ELEM = {"fp32": 4, "fp16": 4, "bf16": 4, "fp64": 8}
# The bound of the partial buffers, in hidden-tensor elements (N * hidden * Ho * Wo)
# (kBigPartsDivisor in the .cu file).
BIG_PARTS_DIVISOR = 4


def blocks():
    """The 17 blocks of torchvision's MobileNetV2 at 224 x 224, in order."""
    return [cp.Block(inp, inp * t, oup, stride, h) for inp, oup, stride, t, h in BLOCK_SHAPES]


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    # a directory of this session's own: other sessions may run the gate in the same tree
    out = tmp_path_factory.mktemp("ptxas-gate")
    t0 = time.monotonic()
    obj, log = cp.compile_object(out)
    t1 = time.monotonic()
    driver = cp.build_plan_driver(out)
    t2 = time.monotonic()
    (out / "ptxas.log").write_text(log)
    resources = cp.parse_ptxas(log)
    print(f"\nnvcc sm_80 + sm_90: {t1 - t0:.0f} s, planning driver: {t2 - t1:.0f} s ({out})")
    print(cp.format_table(resources))
    return {"obj": obj, "log": log, "resources": resources, "driver": driver}


def resources_of(gate):
    return {(r.kernel, r.dtype, r.arch): r for r in gate["resources"]}


def test_ptxas_no_spills_no_stack(gate):
    rows = gate["resources"]
    table = cp.format_table(rows)
    expected = {(k, d, a) for k in cp.KERNELS for d in cp.DTYPES for a in cp.ARCHS}
    found = {(r.kernel, r.dtype, r.arch) for r in rows}
    assert found == expected, f"kernels in ptxas's report differ: missing {sorted(expected - found)}, " \
                              f"unexpected {sorted(found - expected)}\n{table}"
    assert all(r.registers > 0 and r.stack >= 0 for r in rows), f"unparsed ptxas report:\n{gate['log']}"
    bad = [r for r in rows if r.spill_stores or r.spill_loads or r.stack]
    assert not bad, "spills or stack frames (they would be local-memory traffic in the hot loops):\n" + table


def test_16bit_forward_uses_tensor_cores(gate):
    if cp.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy): cannot read the SASS")
    tc = cp.tensor_core_counts(gate["obj"])
    table = cp.format_table(gate["resources"], tc)
    print("\n" + table)
    for arch in cp.ARCHS:
        for dtype in ("fp16", "bf16"):
            key = ("fused_ir_fwd_kernel", dtype, arch)
            assert key in tc, f"no SASS for {key}\n{table}"
            assert tc[key] > 0, f"{dtype} forward for sm_{arch} has no HMMA/GMMA instruction\n{table}"


def test_shared_memory_fits(gate):
    """Every kernel's dynamic (plus static) shared memory fits the arch's opt-in limit at the
    tile its launcher picks, and that tile is the full one (no halving) for every block at
    batch 1 and 64 in fp32 / fp16 / bf16."""
    res = resources_of(gate)
    queries = []
    for arch in cp.ARCHS:
        for dtype in FLOAT_DTYPES:
            for batch in (1, 64):
                for b in blocks():
                    for kernel, kind in (("fused_ir_fwd_kernel", "fwd" if dtype == "fp32" else "fwd_tc"),
                                         ("fused_ir_bwd_weights_kernel", "bwd_weights"),
                                         ("fused_ir_bwd_input_kernel", "bwd_input")):
                        # the launchers' limit: the opt-in less the kernel's static shared memory
                        limit = cp.SMEM_OPTIN[arch] - res[(kernel, dtype, arch)].static_smem
                        q = cp.Query(kind, b, batch, ELEM[dtype], limit)
                        queries.append((kernel, dtype, arch, q))
    plans = cp.run_plan_driver(gate["driver"], [q for *_, q in queries])
    failures, lines = [], []
    for kernel, dtype, arch, q in queries:
        p = plans[q]
        static = res[(kernel, dtype, arch)].static_smem
        optin = cp.SMEM_OPTIN[arch]
        line = (f"{kernel:28} {dtype} sm_{arch} batch {q.batch:3} {str(q.block):22} tile {p['TH']}x{p['TW']} "
                f"(full {p['full_TH']}x{p['full_TW']}) {p['bytes'] + static:6} B of {optin}")
        lines.append(line)
        if p["bytes"] + static > optin or (p["TH"], p["TW"]) != (p["full_TH"], p["full_TW"]):
            failures.append(line)
    assert not failures, "shared memory over the opt-in limit, or the tile had to shrink:\n" + "\n".join(failures)


def plan_backward(gate, batches, sms=H100_SMS, arch=90, dtypes=FLOAT_DTYPES):
    """{(dtype, batch, block, kind): plan} of the two backward kernels, with the CTAs
    resident per SM that ptxas's registers and the planned shared memory allow."""
    res = resources_of(gate)
    kernels = {"bwd_weights": "fused_ir_bwd_weights_kernel", "bwd_input": "fused_ir_bwd_input_kernel"}
    # the tiles (hence the shared memory) first, then the grids at the occupancy they give
    tile_queries = {(d, n, b, k): cp.Query(k, b, n, ELEM[d], cp.SMEM_OPTIN[arch] - res[(kernels[k], d, arch)].static_smem)
                    for d in dtypes for n in batches for b in blocks() for k in kernels}
    tiles = cp.run_plan_driver(gate["driver"], list(tile_queries.values()))
    grid_queries = {}
    for key, q in tile_queries.items():
        r = res[(kernels[key[3]], key[0], arch)]
        cps = cp.resident_ctas(r.registers, tiles[q]["bytes"] + r.static_smem, arch)
        assert cps >= 1, f"{key}: no CTA fits an SM"
        grid_queries[key] = cp.Query(q.kind, q.block, q.batch, q.elem, q.limit, sms, cps)
    grids = cp.run_plan_driver(gate["driver"], list(grid_queries.values()))
    return {key: dict(grids[q], resident=q.sms * q.cps) for key, q in grid_queries.items()}


def describe(key, p):
    dtype, batch, b, kind = key
    shape = (f"{p['n_parts']:4} x {p['n_chunks']:2}" if kind == "bwd_weights"
             else f"{p['items']:5} x {p['n_splits']:2}")
    return (f"{kind:11} {dtype} batch {batch:3} {str(b):22} grid {shape} = {p['ctas']:5} CTAs "
            f"({p['ctas'] / p['resident']:6.2f} waves of {p['resident']}), tile {p['TH']}x{p['TW']}, "
            f"partials {p['buffer'] / p['hidden_elems']:.2f} hidden")


def buffer_at(p, kind, splits):
    """The elements of the buffer a backward grid with `splits` splits allocates (plan_split's
    buffer(splits)): the weights' single slot (ordered) or a slot per part; grad_x's one
    [N][H][W][Cin] buffer when it splits."""
    if kind == "bwd_weights":
        return p["slot"] * (1 if p["ordered"] else splits)
    return 0 if splits == 1 else p["x_elems"]


def test_backward_grids_fill_two_waves(gate):
    """On a 132-SM H100 at batch 64, 128 and 256: every MobileNetV2 block's weight gradients
    are combined in the ordered mode (one slot at any split count), and both backward kernels
    launch at least two full waves of CTAs (2 rounds at 1.9 waves pass) wherever the buffer
    that needs stays within its bound (a quarter of the hidden tensor) and the units allow,
    with no nearly empty last round (at most 20 % of the rounds' slots idle) unless the
    bound forbids the next split, and buffers within the bound."""
    plans = plan_backward(gate, BATCHES_TWO_WAVES)
    table = "\n".join(describe(k, p) for k, p in plans.items() if k[0] == "fp32")
    print("\n" + table)
    failures, short = [], []
    for key, p in plans.items():
        _, batch, b, kind = key
        resident, ctas = p["resident"], p["ctas"]
        rounds = -(-ctas // resident)
        idle = (rounds * resident - ctas) / (rounds * resident)
        cap = p["hidden_elems"] // BIG_PARTS_DIVISOR
        outer = p["n_chunks"] if kind == "bwd_weights" else p["items"]
        inner = batch * p["tiles_h"] * p["tiles_w"] if kind == "bwd_weights" else p["n_chunks"]
        splits = p["n_parts"] if kind == "bwd_weights" else p["n_splits"]
        two_waves = -(-2 * resident // outer)
        reachable = two_waves <= inner and buffer_at(p, kind, two_waves) <= cap
        if kind == "bwd_weights" and not p["ordered"]:
            failures.append(describe(key, p) + " (private slots)")
        if ctas < 2 * resident and reachable and not (rounds == 2 and ctas >= 1.9 * resident):
            failures.append(describe(key, p))
        elif ctas < 2 * resident:
            short.append(describe(key, p))
        if ctas >= 2 * resident and idle > 0.2:
            # a nearly empty last round, unless one more split would pass the bound
            (failures if buffer_at(p, kind, splits + 1) <= cap else short).append(describe(key, p))
        if p["buffer"] > max(cap, p["slot"] if kind == "bwd_weights" else 0):
            failures.append(describe(key, p))
    print("short of two waves, or with a nearly empty last round, as the buffer bound or the "
          "units require:\n" + "\n".join(short))
    assert not failures, "backward grids short of two full waves, with a nearly empty last wave, " \
                         "over the buffer bound, or not ordered:\n" + "\n".join(failures) + \
                         "\nall:\n" + table


def test_backward_partials_bounded(gate):
    """At every batch the partial buffers stay within a quarter of the hidden tensor (the
    weight partials: or a single slot): nothing hidden-sized is allocated."""
    plans = plan_backward(gate, (1, 2, 8, 32, 64, 256), dtypes=("fp32",))
    failures = []
    for key, p in plans.items():
        bound = p["hidden_elems"] // BIG_PARTS_DIVISOR
        if key[3] == "bwd_weights":
            bound = max(bound, p["slot"])
        if p["buffer"] > bound:
            failures.append(describe(key, p))
    assert not failures, "partial buffers over their bounds:\n" + "\n".join(failures)


def test_memory_gate_blocks_keep_small_partials(gate):
    """tests/test_gpu.py::test_no_hidden_sized_allocation (blocks 2, 4 and 17 at batch 32,
    fp16) allows the backward half a hidden tensor plus 16 bytes per parameter beyond its
    outputs. The fp32 partials (weights and grad_x), the reduced weight slot and the fp16
    weight gradients must leave a fifth of that for everything else."""
    plans = plan_backward(gate, (32,), dtypes=("fp16",))
    failures = []
    for index in (1, 3, 16):
        inp, oup, stride, t, h = BLOCK_SHAPES[index]
        b = cp.Block(inp, inp * t, oup, stride, h)
        w = plans[("fp16", 32, b, "bwd_weights")]
        x = plans[("fp16", 32, b, "bwd_input")]
        _, fused = make_pair(inp, oup, stride, t)
        params = sum(p.numel() for p in fused.parameters())
        allowance = w["hidden_elems"] * 2 / 2 + 16 * params
        # private slots: plus their sum; then the weight gradients in fp16
        summed = 4 * w["slot"] if not w["ordered"] and w["n_parts"] > 1 else 0
        used = 4 * (w["buffer"] + x["buffer"]) + summed + 2 * w["slot"]
        line = f"{b}: {used / 1e6:.2f} MB of {allowance / 1e6:.2f} MB ({describe(('fp16', 32, b, 'bwd_weights'), w)})"
        print(line)
        if used > 0.8 * allowance:
            failures.append(line)
    assert not failures, "\n".join(failures)
