"""Helpers of tests/test_cuda_compile.py: compile csrc/cuda/fused_ir_cuda.cu with nvcc for
sm_80 and sm_90 without a GPU, read ptxas's resource report and the SASS, and evaluate
the file's host-side launch planning (shared-memory sizes, tiles, backward grids).

The planning is evaluated by compiling the .cu file itself into a small host program
(PLAN_DRIVER below) with -DMNV2_CUDA_PLAN_ONLY: the file then keeps only its host-pure
planning part (constants, shared-memory layouts, plan_tile, plan_split, the grid
planners), which the driver calls exactly as the launchers do. Nothing of the planning
is restated here; only the GPUs' per-SM limits (resident_ctas) are, to turn ptxas's
register counts into the occupancy the launchers get from
cudaOccupancyMaxActiveBlocksPerMultiprocessor.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "fused_ir_cuda.cu"
ARCHS = (80, 90)
# cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB on sm_90, 163 KB on sm_80
SMEM_OPTIN = {80: 166912, 90: 232448}
# shared memory per SM (cudaDevAttrMaxSharedMemoryPerMultiprocessor): 228 KB / 164 KB
SMEM_PER_SM = {80: 167936, 90: 233472}
SMEM_RESERVED_PER_CTA = 1024  # the driver's per-block reservation (sm_80 and newer)
THREADS = 256  # kThreads of the .cu file
KERNELS = ("fused_ir_fwd_kernel", "fused_ir_bwd_weights_kernel", "fused_ir_bwd_input_kernel")
DTYPES = ("fp32", "fp16", "bf16", "fp64")
# opcodes of tensor-core instructions in SASS (sm_80 / sm_90; *GMMA: wgmma on sm_90)
TENSOR_CORE_OPCODES = {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "BGMMA", "QMMA", "QGMMA"}


def cuda_home():
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    return Path("/usr/local/cuda")


def find_nvcc():
    nvcc = cuda_home() / "bin" / "nvcc"
    return nvcc if nvcc.exists() else None


def find_cuobjdump():
    """The toolkit's cuobjdump, else one on PATH, else the one Triton ships."""
    candidates = [cuda_home() / "bin" / "cuobjdump"]
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    try:
        import triton  # noqa: PLC0415

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((c for c in candidates if c.exists()), None)


def include_flags():
    """torch.utils.cpp_extension.include_paths('cuda') with CUDA_HOME set (as the Makefile's
    cuda-resources target has it): torch's headers and the toolkit's include directory."""
    from torch.utils.cpp_extension import include_paths  # noqa: PLC0415

    return [f"-I{p}" for p in include_paths()] + [f"-I{cuda_home() / 'include'}"]


def common_flags():
    """The flags of the Makefile's cuda-resources target."""
    return ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-DMNV2_WITH_CUDA", f"-I{ROOT / 'csrc'}"]


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


def compile_object(out_dir, archs=ARCHS):
    """One nvcc run for every arch (-gencode each, ptxas -v): (object path, ptxas log)."""
    nvcc = find_nvcc()
    obj = Path(out_dir) / "fused_ir_cuda.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    proc = run([str(nvcc), *common_flags(), *gencode, "-Xptxas=-v", *include_flags(),
                "-c", str(SOURCE), "-o", str(obj)])
    return obj, proc.stdout + proc.stderr


@dataclass
class KernelResources:
    kernel: str  # fused_ir_*_kernel, or the mangled name of anything else
    dtype: str  # fp32 / fp16 / bf16 / fp64, or "?"
    arch: int
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    static_smem: int = 0
    barriers: int = 0


_TYPE_CODES = {"f": "fp32", "d": "fp64", "N3c104HalfE": "fp16", "N3c108BFloat16E": "bf16"}


def kernel_of(mangled):
    """(kernel, dtype) of a mangled fused_ir_*_kernel<T, A> name."""
    m = re.search(r"\d+(fused_ir_\w+?_kernel)I(N3c104HalfE|N3c108BFloat16E|f|d)", mangled)
    if not m:
        return mangled, "?"
    return m.group(1), _TYPE_CODES[m.group(2)]


def parse_ptxas(log):
    """ptxas -v's report: one KernelResources per (entry function, arch)."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            kernel, dtype = kernel_of(m.group(1))
            cur = KernelResources(kernel, dtype, int(m.group(2)))
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur.static_smem = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            cur.barriers = int(b.group(1)) if b else 0
    return out


def tensor_core_counts(obj):
    """{(kernel, dtype, arch): number of tensor-core instructions} from cuobjdump -sass."""
    proc = run([str(find_cuobjdump()), "-sass", str(obj)])
    counts, arch, key = {}, None, None
    for line in proc.stdout.splitlines():
        m = re.search(r"code for sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            kernel, dtype = kernel_of(m.group(1))
            key = (kernel, dtype, arch)
            counts[key] = 0
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", line)
        if m and key is not None and m.group(1) in TENSOR_CORE_OPCODES:
            counts[key] += 1
    return counts


def resident_ctas(registers, smem_bytes, arch):
    """CTAs of 256 threads resident per SM (sm_80 / sm_90): registers are allocated per warp
    in units of 256 out of 64K, shared memory per CTA plus its 1 KB reservation out of the
    SM's, at most 2048 threads and 32 CTAs."""
    warp_regs = -(-registers * 32 // 256) * 256
    by_regs = (65536 // warp_regs) // (THREADS // 32)
    by_smem = SMEM_PER_SM[arch] // (smem_bytes + SMEM_RESERVED_PER_CTA)
    return min(by_regs, by_smem, 2048 // THREADS, 32)


def format_table(rows, tc=None):
    head = f"{'kernel':30} {'dtype':5} {'arch':6} {'regs':>4} {'spill st':>8} {'spill ld':>8} " \
           f"{'stack':>5} {'smem':>5}" + (f" {'TC ops':>6}" if tc is not None else "")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r.kernel, DTYPES.index(r.dtype) if r.dtype in DTYPES else 9, r.arch)):
        line = (f"{r.kernel:30} {r.dtype:5} sm_{r.arch:<3} {r.registers:4} {r.spill_stores:8} "
                f"{r.spill_loads:8} {r.stack:5} {r.static_smem:5}")
        if tc is not None:
            line += f" {tc.get((r.kernel, r.dtype, r.arch), '-'):>6}"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- planning
PLAN_DRIVER = r"""
// Host-only driver of the launch planning of csrc/cuda/fused_ir_cuda.cu (its host-pure
// part, -DMNV2_CUDA_PLAN_ONLY). One query per stdin line:
//   KIND cin hidden cout stride H W N has_expand residual elem limit sms cps
// KIND: fwd (FFMA layout), fwd_tc (tensor-core layout), bwd_weights, bwd_input; elem: bytes
// of the accumulation type; limit: opt-in shared memory per block; sms, cps: SMs and CTAs
// resident per SM (the backward grids). Prints, as the launchers compute them:
//   TH TW tiles_h tiles_w bytes full_TH full_TW full_bytes [grid...]
// full_*: the tile before any halving (no shared-memory limit). The backward kernels add
//   bwd_weights: n_parts n_chunks buffer slot hidden_elems ordered
//   bwd_input:   items n_splits buffer x_elems hidden_elems n_chunks
#define MNV2_CUDA_PLAN_ONLY
#include "cuda/fused_ir_cuda.cu"

#include <cstdint>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>

using namespace mnv2;
using namespace mnv2::cuda;

template <typename F>
void tile(const Geo& g, int h, int w, int64_t elem, int64_t limit, F floats, bool balance,
          TilePlan& t, TilePlan& full) {
  t = plan_tile(g, h, w, elem, limit, floats, balance);
  full = plan_tile(g, h, w, elem, std::numeric_limits<int64_t>::max() / 16, floats, balance);
}

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string kind;
    BlockShape s{};
    int has_expand = 0, residual = 0, sms = 0, cps = 0;
    int64_t elem = 0, limit = 0;
    in >> kind >> s.cin >> s.hidden >> s.cout >> s.stride >> s.in_h >> s.in_w >> s.batch >>
        has_expand >> residual >> elem >> limit >> sms >> cps;
    if (!in) {
      std::cerr << "bad query: " << line << "\n";
      return 2;
    }
    s.has_expand = has_expand != 0;
    s.residual = residual != 0;
    Geo g = geo_of(s);
    TilePlan t{}, full{};
    if (kind == "fwd") {
      tile(g, g.Ho, g.Wo, elem, limit, fwd_smem_floats<false>, false, t, full);
    } else if (kind == "fwd_tc") {
      tile(g, g.Ho, g.Wo, elem, limit, fwd_smem_floats<true>, false, t, full);
    } else if (kind == "bwd_weights") {
      if (bwdw_ordered(g, elem, limit)) {
        tile(g, g.Ho, g.Wo, elem, limit, bwdw_ordered_smem_floats, true, t, full);
      } else {
        tile(g, g.Ho, g.Wo, elem, limit, bwdw_smem_floats, true, t, full);
      }
    } else if (kind == "bwd_input") {
      tile(g, g.H, g.W, elem, limit, bwdx_smem_floats, true, t, full);
    } else {
      std::cerr << "bad kind: " << kind << "\n";
      return 2;
    }
    std::cout << t.TH << ' ' << t.TW << ' ' << t.tiles_h << ' ' << t.tiles_w << ' ' << t.bytes
              << ' ' << full.TH << ' ' << full.TW << ' ' << full.bytes;
    g.TH = t.TH;
    g.TW = t.TW;
    g.tiles_h = t.tiles_h;
    g.tiles_w = t.tiles_w;
    if (kind == "bwd_weights") {
      const GradOffsets go = grad_offsets(s.cin, s.hidden, s.cout, s.has_expand);
      const bool ordered = bwdw_ordered(g, elem, limit);
      const WeightsGrid w = plan_bwd_weights_grid(sms, cps, g, go, ordered);
      std::cout << ' ' << w.n_parts << ' ' << w.n_chunks << ' ' << w.buffer << ' ' << go.total
                << ' ' << hidden_elems(g) << ' ' << int(ordered);
    } else if (kind == "bwd_input") {
      const InputGrid x = plan_bwd_input_grid(sms, cps, g);
      std::cout << ' ' << x.items << ' ' << x.n_splits << ' ' << x.buffer << ' '
                << int64_t(g.N) * g.H * g.W * g.Cin << ' ' << hidden_elems(g) << ' '
                << ceil_div(g.hidden, KC);
    }
    std::cout << '\n';
  }
  return 0;
}
"""


def build_plan_driver(out_dir):
    """The planning driver, compiled (host code only) with nvcc: its path."""
    src = Path(out_dir) / "plan_driver.cu"
    exe = Path(out_dir) / "plan_driver"
    src.write_text(PLAN_DRIVER)
    run([str(find_nvcc()), "-std=c++20", "-O1", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
         str(src), "-o", str(exe)])
    return exe


@dataclass(frozen=True)
class Block:
    """One block of the network: cin -> hidden -> cout, stride, input side."""
    cin: int
    hidden: int
    cout: int
    stride: int
    side: int

    @property
    def has_expand(self):
        return self.hidden != self.cin

    @property
    def residual(self):
        return self.stride == 1 and self.cin == self.cout

    @property
    def out_side(self):
        return (self.side - 1) // self.stride + 1

    def __str__(self):
        return f"{self.cin}-{self.hidden}-{self.cout}-s{self.stride}-{self.side}x{self.side}"


@dataclass(frozen=True)
class Query:
    kind: str  # fwd, fwd_tc, bwd_weights, bwd_input
    block: Block
    batch: int
    elem: int  # bytes of the accumulation type
    limit: int  # opt-in shared memory per block
    sms: int = 0
    cps: int = 0  # CTAs resident per SM

    def line(self):
        b = self.block
        return (f"{self.kind} {b.cin} {b.hidden} {b.cout} {b.stride} {b.side} {b.side} {self.batch} "
                f"{int(b.has_expand)} {int(b.residual)} {self.elem} {self.limit} {self.sms} {self.cps}")


def run_plan_driver(exe, queries):
    """{query: dict of the driver's answer}, one driver run for all the queries."""
    proc = run([str(exe)], input="\n".join(q.line() for q in queries) + "\n")
    answers = proc.stdout.splitlines()
    assert len(answers) == len(queries), (len(answers), len(queries))
    out = {}
    for q, a in zip(queries, answers):
        v = list(map(int, a.split()))
        d = dict(zip(("TH", "TW", "tiles_h", "tiles_w", "bytes", "full_TH", "full_TW", "full_bytes"), v[:8]))
        if q.kind == "bwd_weights":
            d.update(zip(("n_parts", "n_chunks", "buffer", "slot", "hidden_elems", "ordered"), v[8:]))
            d["ctas"] = d["n_parts"] * d["n_chunks"]
        elif q.kind == "bwd_input":
            d.update(zip(("items", "n_splits", "buffer", "x_elems", "hidden_elems", "n_chunks"), v[8:]))
            d["ctas"] = d["items"] * d["n_splits"]
        out[q] = d
    return out
