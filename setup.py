"""Build of the mnv2_kernels compiled extension (mnv2_kernels._C).

Environment switches:
    MNV2_BUILD_CUDA=auto|0|1   compile csrc/cuda/*.cu. auto (default): when nvcc is found
                               and CUDA sources exist. 1: fail if nvcc is missing.
    CUDA_HOME                  CUDA toolkit root; defaults to /usr/local/cuda when that exists.
    TORCH_CUDA_ARCH_LIST       GPU architectures; defaults to "8.0;9.0".
    MNV2_DEBUG=1               -O0 -g instead of -O3.
    MNV2_PTXAS_VERBOSE=1       print ptxas's resource report (registers, spills, shared memory).
    MNV2_SANITIZE=address[,undefined]
                               instrument the CPU code with these sanitizers (-fsanitize=...):
                               a test build only (make sanitize-ext), CPU only (CUDA off),
                               objects in build/ext-<python>-<sanitizers>. Load it with
                               LD_PRELOAD=$(gcc -print-file-name=libasan.so).
    MAX_JOBS                   parallel compile jobs (ninja).

Objects are kept in build/ext-<python>, so rebuilding after an edit is incremental.

Each CPU instruction set is compiled in its own translation unit with its own
flags (csrc/core/isa/kernels_<isa>.cpp, flags in cmake/isa_flags.txt, the table
the C++ tests' CMake build reads too); the runtime dispatch in
csrc/core/dispatch.cpp picks one. torch's BuildExtension applies one set of
flags to every source, so those files are compiled separately in
build_extension and linked in as extra objects.
"""

import glob
import os
import platform
import re
import shutil
import sys

from setuptools import setup

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    # torch looks in /usr/local otherwise, and the link fails
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("MNV2_DEBUG", "0") == "1"
SANITIZE = os.environ.get("MNV2_SANITIZE", "").strip()
# -O1 under sanitizers: at -O3 the instrumented ISA files take 20x longer to compile
OPT = ["-O0", "-g"] if DEBUG else (["-O1"] if SANITIZE else ["-O3"])
SANITIZE_FLAGS = (
    [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
    + (["-fno-sanitize-recover=undefined"] if "undefined" in SANITIZE else [])
    if SANITIZE else []
)


def rel(path):
    return os.path.relpath(path, ROOT)


ISA_TABLE = os.path.join(ROOT, "cmake", "isa_flags.txt")


def isa_sources():
    """(source, flags) for every ISA translation unit of this target, from the table
    cmake/isa_flags.txt (name, architectures regex, source, flags)."""
    machine = platform.machine().lower()
    sources = []
    with open(ISA_TABLE) as table:
        for line in table:
            if not line[:1].isalpha():
                continue  # comments and blank lines
            _name, arch, source, *flags = line.split()
            if re.fullmatch(arch, machine):
                sources.append((source, flags))
    return sources


def want_cuda(cuda_sources):
    mode = os.environ.get("MNV2_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MNV2_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    if SANITIZE:
        if mode == "1":
            raise SystemExit("MNV2_SANITIZE builds the CPU code only; unset MNV2_BUILD_CUDA=1")
        return False
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        if "CUDA_HOME" in os.environ
        and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
        else None
    )
    if mode == "1":
        if nvcc is None:
            raise SystemExit("MNV2_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if not cuda_sources:
            raise SystemExit("MNV2_BUILD_CUDA=1 but there are no CUDA sources in csrc/cuda")
        return True
    return nvcc is not None and bool(cuda_sources)


class BuildWithIsaFlags(BuildExtension):
    """Compiles each ISA source with its own flags before the shared build.

    Objects go to build/ext-<python> rather than pip's throw-away temp dir, so
    that `pip install -e .` after an edit recompiles only what changed.
    """

    def finalize_options(self):
        super().finalize_options()
        tag = f"ext-py{sys.version_info[0]}{sys.version_info[1]}"
        if SANITIZE:  # never mixed with the objects of the normal build
            tag += "-" + SANITIZE.replace(",", "-")
        self.build_temp = os.path.join(ROOT, "build", tag)

    def build_extension(self, ext):
        for src, flags in getattr(ext, "isa_sources", []):
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            objects = self.compiler.compile(
                [src],
                output_dir=self.build_temp,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=list(cxx) + flags,
                depends=ext.depends,
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def extension():
    # the ISA-independent core, the CPU glue, the schemas and the Python bindings
    generic = sorted(rel(p) for pattern in ("csrc/*.cpp", "csrc/core/*.cpp", "csrc/cpu/*.cpp", "csrc/python/*.cpp")
                     for p in glob.glob(os.path.join(ROOT, pattern)))
    cuda_sources = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))
    # at::parallel_for is an inline OpenMP template: without -fopenmp it runs
    # serially. The linked libgomp.so.1 resolves to the one torch already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-Wall", "-Wno-unknown-pragmas"] + OPT + openmp + SANITIZE_FLAGS  # torch picks the C++ standard
    kwargs = dict(
        name="mnv2_kernels._C",
        extra_link_args=openmp + SANITIZE_FLAGS,
        include_dirs=[os.path.join(ROOT, "csrc")],
        depends=glob.glob(os.path.join(ROOT, "csrc/**/*.h"), recursive=True)
        + glob.glob(os.path.join(ROOT, "csrc/core/kernels/*.inl")) + [ISA_TABLE],
    )
    if want_cuda(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            sources=generic + cuda_sources,
            extra_compile_args={
                "cxx": cxx + ["-DMNV2_WITH_CUDA"],
                "nvcc": OPT + ["-DMNV2_WITH_CUDA", "-lineinfo", "--expt-relaxed-constexpr"]
                + (["-Xptxas=-v"] if os.environ.get("MNV2_PTXAS_VERBOSE") == "1" else []),
            },
            **kwargs,
        )
    else:
        ext = CppExtension(sources=generic, extra_compile_args={"cxx": cxx}, **kwargs)
    ext.isa_sources = isa_sources()
    return ext


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithIsaFlags.with_options(use_ninja=True)},
)
