"""Backend selection, the environment switches (MNV2_BACKEND, MNV2_CPU_ISA)
and the package without its compiled extension."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mnv2_kernels
from mnv2_kernels import backends
from conftest import make_pair, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """Runs code in a fresh interpreter (environment switches are read at import)."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    assert mnv2_kernels.get_backend() == "auto"
    assert backends.resolve(torch.randn(1, 3, 4, 4)) == "cpu"
    assert backends.resolve(torch.randn(1, 3, 4, 4, dtype=torch.float64)) == "cpu"


def test_use_backend_is_scoped_and_validated():
    with mnv2_kernels.use_backend("reference"):
        assert mnv2_kernels.get_backend() == "reference"
        with mnv2_kernels.use_backend("cpu"):
            assert mnv2_kernels.get_backend() == "cpu"
        assert mnv2_kernels.get_backend() == "reference"
    assert mnv2_kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of auto, cpu, cuda, triton, reference"):
        mnv2_kernels.set_backend("tpu")


def test_a_backend_that_cannot_run_the_tensors_raises():
    _, block = make_pair(16, 16, 1, 6)
    x = torch.randn(2, 16, 5, 5)
    with mnv2_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' cannot run .* CUDA tensors only"):
        block(x)
    with mnv2_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="neither a CUDA GPU nor TRITON_INTERPRET=1"):
        block(x)
    with pytest.raises(RuntimeError, match="int64 .* supports float32, float64, float16 and bfloat16"):
        mnv2_kernels.backends.resolve(x.long())


def test_reference_backend_runs_other_dtypes():
    tv, block = make_pair(16, 16, 1, 6)
    x = torch.randn(2, 16, 5, 5)
    with mnv2_kernels.use_backend("reference"):
        y = block.eval().bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, tv.eval().bfloat16()(x.bfloat16())) == 0.0


def test_mnv2_backend_environment_variable():
    out = run_python("import mnv2_kernels; print(mnv2_kernels.get_backend())", MNV2_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    out = run_python("import mnv2_kernels", MNV2_BACKEND="gpu")
    assert out.returncode != 0 and "unknown backend 'gpu'" in out.stderr


ISA_CHECK = """
    import torch, mnv2_kernels
    from conftest import make_pair, rel_err
    print(mnv2_kernels.cpu_isa())
    for shape in [(16, 24, 2, 6), (24, 24, 1, 6), (32, 16, 1, 1)]:
        tv, fused = make_pair(*shape)
        for train in (False, True):
            x = torch.randn(2, shape[0], 11, 11, requires_grad=True)
            xf = x.detach().clone().requires_grad_()
            ref, got = tv.train(train)(x), fused.train(train)(xf)
            gy = torch.randn_like(ref)  # not sum(): through a train-mode BN its gradient is zero
            ref.backward(gy); got.backward(gy)
            assert rel_err(got, ref) <= 1e-4 and rel_err(xf.grad, x.grad) <= 1e-4, shape
    print("ok")
"""


@pytest.mark.parametrize("isa", mnv2_kernels.build_info()["cpu_isas_runnable"])
def test_every_runnable_isa_matches_torchvision(isa):
    out = run_python(ISA_CHECK, MNV2_CPU_ISA=isa)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [isa, "ok"]


def test_asking_for_an_isa_this_machine_cannot_run_is_a_clear_error():
    info = mnv2_kernels.build_info()
    code = "import torch, mnv2_kernels; mnv2_kernels.FusedInvertedResidual(8, 8, 1, 6).eval()(torch.randn(1, 8, 4, 4))"
    out = run_python(code, MNV2_CPU_ISA="sse9")
    assert out.returncode != 0 and "MNV2_CPU_ISA=sse9 is not one of scalar, avx2, avx512, neon" in out.stderr
    missing = [i for i in ("avx512", "avx2", "neon") if i not in info["cpu_isas_runnable"]]
    for isa in missing:
        out = run_python(code, MNV2_CPU_ISA=isa)
        expected = ("this CPU does not support that ISA" if isa in info["cpu_isas_compiled"]
                    else "this build has no kernels for that ISA")
        assert out.returncode != 0 and expected in out.stderr, out.stderr


def test_without_the_compiled_extension_the_reference_backend_works_and_says_so_once():
    code = """
        import sys, warnings
        sys.modules["mnv2_kernels._C"] = None  # as if it had never been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mnv2_kernels
            import torch
            from conftest import make_pair, rel_err
            tv, fused = make_pair(24, 24, 1, 6)
            x = torch.randn(2, 24, 7, 7)
            for train in (False, True, False):
                assert rel_err(fused.train(train)(x), tv.train(train)(x)) <= 1e-6
        messages = [str(w.message) for w in caught if "mnv2_kernels" in str(w.message)]
        print(len(messages)); print(messages[0])
        print(mnv2_kernels.build_info()["extension"])
    """
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    count, message, has_extension = out.stdout.strip().split("\n")
    assert count == "1"
    assert "compiled extension is not available" in message and "'reference' backend" in message
    assert has_extension == "False"


def test_importing_the_package_first_loads_the_extension():
    # _C links against torch's libraries: the package must load torch before it
    out = run_python("import mnv2_kernels; print(mnv2_kernels.build_info()['extension'])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and "not available" not in out.stderr


def test_build_info_reports_the_isa_in_use():
    info = mnv2_kernels.build_info()
    assert info["extension"] is True
    assert mnv2_kernels.cpu_isa() in info["cpu_isas_runnable"]
    assert "scalar" in info["cpu_isas_runnable"]


def test_cpu_plans_follow_the_machines_caches():
    """build_info() reports the caches the CPU kernel plans for and its register tile;
    cpu_plans() gives each block's plan. MNV2_CACHE_KIB stands in for another machine's
    caches: a small L2 gives smaller hidden chunks, a large one larger, and with each the
    model matches torchvision and repeats bitwise."""
    code = """
        import json, torch, torchvision, mnv2_kernels
        from conftest import randomize_bn, rel_err
        torch.manual_seed(0)
        tv = torchvision.models.mobilenet_v2(width_mult=0.5)
        randomize_bn(tv)
        tv.eval()
        m = mnv2_kernels.mobilenet_v2(width_mult=0.5)
        m.load_state_dict(tv.state_dict())
        m.eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            y = m(x)
            ok = rel_err(y, tv(x)) <= 1e-4 and torch.equal(m(x), y) and torch.equal(m(x), y)
        info = mnv2_kernels.build_info()
        plans = mnv2_kernels.cpu_plans(mnv2_kernels.mobilenet_v2(), (1, 3, 224, 224), threads=2)
        print(json.dumps({"info": info, "chunks": [p["hidden_chunk"] for p in plans],
                          "blocks": [p["block"] for p in plans], "shapes": [p["shape"] for p in plans], "ok": ok}))
    """
    results = {}
    for kib in ("32,128,1024", "48,2048,4096"):
        proc = run_python(code, MNV2_CACHE_KIB=kib)
        assert proc.returncode == 0, proc.stderr
        results[kib] = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    small, large = results["32,128,1024"], results["48,2048,4096"]
    for r, l2 in ((small, 128), (large, 2048)):
        assert r["ok"]
        caches = r["info"]["cpu_caches"]
        assert caches == {"l1d": 32 * 1024 if l2 == 128 else 48 * 1024, "l2": l2 * 1024,
                          "l3_per_core": (1024 if l2 == 128 else 4096) * 1024, "source": "MNV2_CACHE_KIB"}
        assert r["info"]["cpu_forward_cache_budget_bytes"] == max(128 * 1024, l2 * 1024 * 5 // 8)
        assert "rows x 2 vectors" in r["info"]["cpu_gemm_tile"]
        assert r["blocks"] == [f"features.{i}" for i in range(1, 18)]
        assert r["shapes"][0] == "32->32->16 s1 112x112" and r["shapes"][-1] == "160->960->320 s1 7x7"
    assert all(a <= b for a, b in zip(small["chunks"], large["chunks"]))
    assert sum(small["chunks"]) < sum(large["chunks"])
    proc = run_python("import mnv2_kernels; mnv2_kernels.mobilenet_v2().eval()(__import__('torch').randn(1, 3, 32, 32))",
                      MNV2_CACHE_KIB="1,2")
    assert proc.returncode != 0 and "MNV2_CACHE_KIB=1,2: expected three positive sizes in KiB" in proc.stderr
