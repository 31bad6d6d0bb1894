"""Dilated (atrous) depthwise steps on the CPU kernel, as DeepLab's output strides 16 and 8
make them: torchvision expresses an atrous MobileNetV2 block by setting its depthwise
convolution's stride to 1 and its dilation and padding to d, in place. The fused block
reads its stride and dilation from that convolution on every call.

Blocks after that surgery against torchvision's (outputs, every gradient and the running
statistics, fp32 and float64, eval and train, NCHW and channels_last), the operators with
a dilation (gradcheck, opcheck, FLOPs), the memory contract, the inference caches and the
whole-model plan following surgery made after they were recorded, and clear errors for
geometries the kernels do not compute.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mnv2_kernels
from mnv2_kernels import ops
from conftest import FP32_RTOL, make_pair, rel_err
from test_blocks import LAYOUTS, _block_errors, _compare_block, _input
from test_memory import assert_nothing_hidden_sized
from test_ops import sample_inputs

# (inp, oup, stride built, t, dilation, stride after the surgery, H, W, N); a block built
# with stride 2 keeps no residual when made stride 1, as in torchvision
DILATED = [
    (96, 96, 1, 6, 2, 1, 10, 10, 2),   # DeepLab OS16: blocks 14-17 at dilation 2
    (160, 160, 1, 6, 4, 1, 7, 9, 2),   # OS8: the last blocks at dilation 4
    (96, 160, 2, 6, 2, 1, 9, 9, 1),    # the stride-2 block turned stride 1
    (32, 32, 1, 1, 2, 1, 13, 7, 2),    # t == 1
    (8, 8, 1, 6, 4, 1, 3, 5, 3),       # sides shorter than the taps' reach
    (16, 24, 2, 6, 2, 2, 9, 13, 2),    # stride 2 and dilation 2 together
    (12, 12, 1, 6, 3, 1, 1, 1, 3),     # one pixel (3 images: 2 values per channel give batch norm
                                       # gradients of zero, measured as rounding noise)
]


def case_id(c):
    inp, oup, s, t, d, ds, h, w, n = c
    return f"{inp}-{oup}-s{s}to{ds}-t{t}-d{d}-{h}x{w}-n{n}"


def dilate(block, dilation, stride=1):
    """torchvision's atrous surgery on a block's depthwise convolution, in place."""
    dw = block.conv[-3][0]
    dw.stride = (stride, stride)
    dw.dilation = (dilation, dilation)
    dw.padding = (dilation, dilation)
    return block


def dilated_pair(case, dtype=torch.float32, fmt=torch.contiguous_format):
    inp, oup, stride, t, d, dw_stride, *_ = case
    tv, fused = make_pair(inp, oup, stride, t, seed=sum(case), dtype=dtype)
    return dilate(tv, d, dw_stride).to(memory_format=fmt), dilate(fused, d, dw_stride).to(memory_format=fmt)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", DILATED, ids=case_id)
def test_dilated_block_matches_torchvision(case, mode, layout, cpu_backend):
    inp, *_, h, w, n = case
    fmt = LAYOUTS[layout]
    _compare_block(lambda: dilated_pair(case, fmt=fmt), lambda seed: _input(n, inp, h, w, fmt, seed),
                   train=mode == "train")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", DILATED, ids=case_id)
def test_dilated_block_matches_torchvision_float64(case, mode, layout, cpu_backend):
    inp, *_, h, w, n = case
    fmt = LAYOUTS[layout]
    tv, fused = dilated_pair(case, torch.float64, fmt)
    x = _input(n, inp, h, w, fmt, dtype=torch.float64)
    assert not _block_errors(tv, fused, x, train=mode == "train", tol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dilated_backward_with_bands_narrower_than_the_reach(threads, cpu_backend):
    """At batch 1 the backward splits rows into bands, one per thread: at dilation 4 a band
    of 2 output rows shares input rows with the band before the previous one too."""
    case = (16, 16, 1, 6, 4, 1, 6, 5, 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tv, fused = dilated_pair(case, torch.float64)
        x = _input(1, 16, 6, 5, torch.contiguous_format, dtype=torch.float64)
        for train in (False, True):
            assert not _block_errors(tv, fused, x, train=train, tol=1e-10)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize("sample", [(2, 4, 7, 6, 4, 6, 1, True, torch.contiguous_format),
                                    (1, 4, 7, 5, 5, 6, 2, False, torch.channels_last),
                                    (2, 3, 5, 4, 3, 1, 1, True, torch.channels_last)],
                         ids=["res-nchw", "s2-cl", "t1-cl"])
def test_gradcheck_and_opcheck_dilated(sample, dilation):
    args = sample_inputs(sample, torch.float64, requires_grad=True) + (dilation,)
    fn = lambda *a: torch.ops.mnv2.fused_inverted_residual(*a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual.default, sample_inputs(sample) + (dilation,))
    x, we, be, wd, bd, wp, bp, stride, residual = sample_inputs(sample)
    y = torch.ops.mnv2.fused_inverted_residual(x, we, be, wd, bd, wp, bp, stride, residual, dilation)
    from mnv2_kernels.reference import inverted_residual
    assert rel_err(y, inverted_residual(x, we, be, wd, bd, wp, bp, stride, residual, dilation)) <= FP32_RTOL
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual_backward.default,
                          (gy, x, we, be, wd, bd, wp, bp, stride, residual, dilation))
    packed = ops.pack_weights(we, be, wd, bd, wp, bp)
    packed_args = (x, packed, wd.shape[0], wp.shape[0], we is not None, stride, residual, dilation)
    torch.library.opcheck(torch.ops.mnv2.fused_inverted_residual_packed.default, packed_args)
    assert torch.equal(torch.ops.mnv2.fused_inverted_residual_packed(*packed_args), y)
    torch.library.opcheck(torch.ops.mnv2.depthwise_moments.default, (x, we, be, wd, stride, dilation))


@pytest.mark.parametrize("dilation", [2, 4])
def test_depthwise_moments_dilated_match_pytorch(dilation):
    from mnv2_kernels import moments

    x, we, be, wd, *_ = sample_inputs((2, 4, 9, 7, 4, 6, 1, True, torch.channels_last), torch.float64,
                                      requires_grad=True)
    mean, var = ops.depthwise_moments(x, we, be, wd, 1, dilation)
    ref_mean, ref_var = moments.depthwise_moments_torch(x, we, be, wd, 1, dilation)
    assert rel_err(mean, ref_mean) <= 1e-12 and rel_err(var, ref_var) <= 1e-12
    g_mean, g_var = torch.randn_like(mean), torch.randn_like(var)
    got = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), (x, we, be, wd))
    want = moments.depthwise_moments_backward_torch(x, we, be, wd, 1, g_mean, g_var, dilation)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-10


def test_flops_of_a_dilated_block_are_torchvisions(cpu_backend):
    """A dilated depthwise step has the same taps and output size: the same count."""
    tv, fused = dilated_pair(DILATED[0])
    x = torch.randn(2, 96, 10, 10)
    counts = []
    for block in (tv.eval(), fused.eval()):
        with FlopCounterMode(display=False) as fc:
            block(x)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dilated_block_allocates_and_saves_nothing_hidden_sized(train, cpu_backend):
    case = (96, 96, 1, 6, 2, 1, 14, 14, 8)
    _, fused = dilated_pair(case)
    x = torch.randn(8, 96, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert_nothing_hidden_sized(fused, x, train)


def test_cached_inference_follows_surgery_made_after_it(cpu_backend):
    """The packed inference path records a block's decisions; setting the depthwise
    convolution's stride, dilation and padding afterwards changes no tensor, and the next
    call still follows it."""
    tv, fused = make_pair(96, 96, 1, 6, seed=3)
    tv.eval()
    fused.eval()
    x = _input(1, 96, 9, 9, torch.channels_last)
    with torch.no_grad():
        for d in (1, 2, 4, 1):
            dilate(tv, d)
            dilate(fused, d)
            for _ in range(2):  # recorded, then replayed
                assert rel_err(fused(x), tv(x)) <= FP32_RTOL, d


def _ops_run(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = model(x)
    return y, {e.name for e in prof.events() if e.name.startswith("mnv2::")}


def test_whole_model_plan_runs_dilated_blocks_and_follows_surgery(cpu_backend):
    """mobilenet_v2 with the last blocks dilated as DeepLab's output stride 16 makes them:
    the one-call model path runs them (dilation among its block arguments), and surgery
    after the plan was recorded is followed on the next call."""
    torch.manual_seed(0)
    ours = mnv2_kernels.mobilenet_v2(width_mult=0.5).eval()
    import torchvision

    tv = torchvision.models.mobilenet_v2(width_mult=0.5).eval()
    tv.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 96, 96)

    def output_stride_16(model, rate):
        for i in range(14, 18):
            dilate(model.features[i], rate)

    with torch.no_grad():
        for rate in (2, 4, 1):
            output_stride_16(ours, rate)
            output_stride_16(tv, rate)
            want = tv(x)
            ours(x)  # module by module: records the plan
            got, ran = _ops_run(ours, x)
            assert ran == {"mnv2::mobilenet_v2_packed"}, (rate, ran)
            assert rel_err(got, want) <= FP32_RTOL, rate


@pytest.mark.parametrize("geometry, match", [
    (dict(padding=(1, 1), dilation=(2, 2)), "padding d"),
    (dict(dilation=(2, 1), padding=(2, 1)), "same in both"),
    (dict(dilation=(32, 32), padding=(32, 32)), "dilation d of 1 to 31"),
    (dict(stride=(3, 3)), "stride 1 or 2"),
])
def test_geometry_the_kernels_do_not_compute_is_a_clear_error(geometry, match, cpu_backend):
    _, fused = make_pair(16, 16, 1, 6)
    dw = fused.conv[1][0]
    for k, v in geometry.items():
        setattr(dw, k, v)
    x = torch.randn(1, 16, 8, 8)
    for train in (True, False):
        fused.train(train)
        with pytest.raises(ValueError, match=match):
            fused(x)
    with pytest.raises(TypeError, match=match):
        type(fused).around(fused.conv, 1, True, 16)


@pytest.mark.parametrize("dilation", [0, -1, 32])
def test_operators_reject_a_dilation_out_of_range(dilation):
    args = sample_inputs((1, 4, 5, 5, 4, 6, 1, True, torch.contiguous_format))
    with pytest.raises(RuntimeError, match="dilation must be between 1 and 31"):
        torch.ops.mnv2.fused_inverted_residual(*args, dilation)
    x, we, be, wd = args[:4]
    with pytest.raises(RuntimeError, match="dilation must be between 1 and 31"):
        torch.ops.mnv2.depthwise_moments(x, we, be, wd, 1, dilation)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_dilated_block_reads_the_surgery(cpu_backend):
    """TorchScript's forward (the fused operator on folded weights in eval mode) takes the
    stride and dilation from the depthwise convolution too."""
    tv, fused = dilated_pair(DILATED[0])
    tv.eval()
    fused.eval()
    scripted = torch.jit.script(fused)
    x = _input(2, 96, 10, 10, torch.contiguous_format)
    with torch.no_grad():
        assert rel_err(scripted(x), tv(x)) <= FP32_RTOL
