"""The library where torchvision's MobileNetV2 goes: torchvision's own model test, fx and
feature extraction, ONNX through both exporters into ONNX Runtime, TorchScript, autocast,
FLOP counting, convert_model on models it cannot fully convert, and explicit backends
that refuse another device's tensors."""

import copy
import io
import os
import random
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.mobilenetv2 import InvertedResidual

import mnv2_kernels
from mnv2_kernels import FusedInvertedResidual, convert_model, ops

from conftest import autocast_errors, make_pair, rel_err

RECIPE_RTOL = 1e-5  # relative to the output's size (about 2.5e-10 at num_classes=50)


def seeded(seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def ours_and_torchvision(builder, width=1.0, num_classes=1000, seed=0):
    """Our model from ``builder`` and torchvision's, both built under the same seed."""
    seeded(seed)
    ours = builder(num_classes=num_classes, width_mult=width)
    seeded(seed)
    tv = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width)
    sd_ours, sd_tv = ours.state_dict(), tv.state_dict()
    assert sd_ours.keys() == sd_tv.keys()
    assert all(torch.equal(sd_ours[k], sd_tv[k]) for k in sd_tv), "the same seed must give the same weights"
    return ours, tv


BUILDERS = {
    "torchvision-MobileNetV2-with-fused-block":
        lambda **kw: torchvision.models.MobileNetV2(block=FusedInvertedResidual, **kw),
    "mnv2_kernels.mobilenet_v2": mnv2_kernels.mobilenet_v2,
}


def fused_block_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FusedInvertedResidual)]


# -- torchvision's model test ------------------------------------------------------

@pytest.mark.parametrize("builder", BUILDERS, ids=str)
def test_torchvision_model_test_recipe(builder):
    """torchvision's test_classification_model for mobilenet_v2: seed 0, 50 classes, eval,
    torch.rand(1, 3, 224, 224); then its scriptability, fx and input-backprop checks. The
    output is compared with torchvision's own model, not a stored file."""
    ours, tv = ours_and_torchvision(BUILDERS[builder], num_classes=50)
    ours.eval()
    tv.eval()
    x = torch.rand(1, 3, 224, 224)
    out = ours(x)
    expected = tv(x)
    assert out.shape == (1, 50)
    torch.testing.assert_close(out, expected, rtol=0, atol=RECIPE_RTOL * expected.abs().max().item())

    # scriptable: the scripted model calls the fused operator and survives save/load
    sm = torch.jit.script(ours)
    assert "mnv2::fused_inverted_residual" in str(sm.inlined_graph)
    with torch.no_grad():
        script_out = sm(x)
    torch.testing.assert_close(script_out, expected, rtol=0, atol=RECIPE_RTOL * expected.abs().max().item())
    buffer = io.BytesIO()
    torch.jit.save(sm, buffer)
    buffer.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(buffer)(x), script_out, rtol=0, atol=0)

    # fx: the blocks are single nodes that run the fused operator
    gm = torch.fx.symbolic_trace(ours)
    assert len(fused_block_nodes(gm)) == 17
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=RECIPE_RTOL * expected.abs().max().item())

    # input backprop
    x.requires_grad_(True)
    ours(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# -- fx and feature extraction -----------------------------------------------------

def _apply_model_layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("width", [0.25, 0.35, 0.75, 1.0, 1.4])
def test_feature_extractor_matches_torchvision(width, train):
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2, width=width)
    # torchvision accepts module names (the last node inside), nodes of its layers and the
    # classifier's; each of our nodes is one of torchvision's, or a block that torchvision
    # accepts by its name
    return_nodes = {"features.0": "stem", "features.3": "c2", "features.13": "c4", "features.17": "c5",
                    "features.18": "head", "flatten": "pooled", "classifier.1": "logits"}
    tv_nodes = get_graph_node_names(tv)[0]
    for node in get_graph_node_names(ours)[0]:
        assert node in tv_nodes or any(n.startswith(node + ".") for n in tv_nodes), node
    for m in (ours, tv):
        m.classifier[0].p = 0.0  # (so that train-mode logits compare)
    tv64 = copy.deepcopy(tv).double()
    fe_ours = create_feature_extractor(ours.train(train), return_nodes)
    fe_tv = create_feature_extractor(tv.train(train), return_nodes)
    fe_64 = create_feature_extractor(tv64.train(train), return_nodes)
    assert len(fused_block_nodes(fe_ours)) == 17
    for step in range(2):
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(step))
        got, want, ref = fe_ours(x), fe_tv(x), fe_64(x.double())
        assert got.keys() == want.keys()
        for k in want:
            assert_as_close_as_torchvision(got[k], want[k], ref[k], k)
    if train:
        assert_running_stats_as_close_as_torchvision(ours, tv, tv64)


def assert_as_close_as_torchvision(got, tv_got, ref, what="", floor=1e-6):
    """got at most twice as far from the float64 reference as torchvision's float32 result
    (train mode on small batches amplifies rounding: there no fixed bound fits)."""
    err, tv_err = rel_err(got, ref), rel_err(tv_got, ref)
    assert err <= max(2 * tv_err, floor), (what, err, tv_err)


def assert_running_stats_as_close_as_torchvision(ours, tv, ref):
    """Every batch norm's running statistics as close to the float64 run's as torchvision's
    are: the means in units of the reference's standard deviation (a batch norm's input
    mean can be ~0, where a relative error means nothing), the variances relative."""
    ref_bns = {n: m for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}
    tv_bns = dict(tv.named_modules())
    for name, bn in ours.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        r, t = ref_bns[name], tv_bns[name]
        std = r.running_var.sqrt()
        err, tv_err = (((m.running_mean.double() - r.running_mean) / std).norm().item() for m in (bn, t))
        assert err <= max(2 * tv_err, 1e-6), (name + ".running_mean", err, tv_err)
        assert_as_close_as_torchvision(bn.running_var, t.running_var, r.running_var, name + ".running_var")
        assert bn.num_batches_tracked == t.num_batches_tracked == r.num_batches_tracked


def test_traced_graph_calls_the_fused_operator():
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2)
    ours.eval()
    fe = create_feature_extractor(ours, {"features.13": "c4"})
    nodes = fused_block_nodes(fe)
    assert [n.target for n in nodes] == [f"features.{i}" for i in range(1, 14)]
    # a node inside a block does not exist: the block is one fused node
    with pytest.raises(ValueError, match="features.14.conv.0.*is not present"):
        create_feature_extractor(ours, {"features.14.conv.0": "expanded"})


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_trace_unfused_gives_torchvision_nodes(train):
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2, width=0.5)
    ours.train(train)
    tv.train(train)
    with mnv2_kernels.trace_unfused():
        assert get_graph_node_names(ours) == get_graph_node_names(tv)
        fe_ours = create_feature_extractor(ours, {"features.14.conv.0": "expanded", "features.3.add": "res"})
    fe_tv = create_feature_extractor(tv, {"features.14.conv.0": "expanded", "features.3.add": "res"})
    fe_64 = create_feature_extractor(copy.deepcopy(tv).double(), {"features.14.conv.0": "expanded",
                                                                   "features.3.add": "res"})
    x = torch.rand(2, 3, 64, 64)
    got, want, ref = fe_ours(x), fe_tv(x), fe_64(x.double())
    for k in want:
        assert_as_close_as_torchvision(got[k], want[k], ref[k], k)
    # outside the context the blocks are fused nodes again
    assert len(fused_block_nodes(torch.fx.symbolic_trace(ours))) == 17


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fx_on_a_converted_model_and_on_one_block(train):
    seeded(0)
    tv = torchvision.models.mobilenet_v2(width_mult=0.5, dropout=0.0).train(train)
    ours = convert_model(copy.deepcopy(tv)).train(train)
    gm = torch.fx.symbolic_trace(ours)
    assert len(fused_block_nodes(gm)) == 17
    x = torch.rand(2, 3, 48, 48)
    tv64 = copy.deepcopy(tv).double()
    assert_as_close_as_torchvision(gm(x), tv(x), tv64(x.double()))
    tv_block, block = make_pair(16, 24, 2, 6)
    tv_block.train(train)
    block.train(train)
    block64 = copy.deepcopy(tv_block).double()
    gb = torch.fx.symbolic_trace(block)  # the block is the root: a call on its conv submodule
    xb = torch.randn(2, 16, 9, 9)
    assert_as_close_as_torchvision(gb(xb), tv_block(xb), block64(xb.double()))
    if train:
        assert_running_stats_as_close_as_torchvision(block, tv_block, block64)
    gb.eval()
    tv_block.eval()
    block64.eval()
    assert_as_close_as_torchvision(gb(xb), tv_block(xb), block64(xb.double()))


# -- ONNX ----------------------------------------------------------------------------

STANDARD_ONNX_DOMAINS = {"", "ai.onnx"}


def _export(model, x, dynamo):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if dynamo:
            torch.onnx.export(model, (x,), f, dynamo=True, input_names=["x"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
        else:
            torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return f.getvalue()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["model", "converted", "block"])
def test_onnx_export_runs_in_onnx_runtime(kind, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if kind == "block":
        tv, ours = make_pair(24, 24, 1, 6)
        shape = (2, 24, 14, 14)
    else:
        seeded(0)
        tv = torchvision.models.mobilenet_v2(num_classes=50)
        ours = (mnv2_kernels.mobilenet_v2(num_classes=50) if kind == "model"
                else convert_model(copy.deepcopy(tv)))
        ours.load_state_dict(tv.state_dict())
        shape = (2, 3, 96, 96)
    tv.eval()
    ours.eval()
    blob = _export(ours, torch.rand(shape), dynamo)
    graph = onnx.load_from_string(blob).graph
    assert {n.domain for n in graph.node} <= STANDARD_ONNX_DOMAINS
    assert "Conv" in {n.op_type for n in graph.node}
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, *shape[1:])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = tv(x)
        assert rel_err(torch.from_numpy(y), want) < 1e-5


def test_onnx_export_of_an_exported_program():
    """A torch.export program holds the fused operator; the ONNX exporter decomposes it."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    tv, ours = make_pair(16, 24, 2, 6)
    ours.eval()
    tv.eval()
    x = torch.randn(2, 16, 10, 10)
    ep = torch.export.export(ours, (x,))
    assert any("mnv2" in str(n.target) for n in ep.graph.nodes)
    program = torch.onnx.export(ep, (x,), dynamo=True, verbose=False)
    blob = program.model_proto.SerializeToString()
    assert {n.domain for n in onnx.load_from_string(blob).graph.node} <= STANDARD_ONNX_DOMAINS
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(y), tv(x)) < 1e-5


# -- TorchScript -----------------------------------------------------------------------

def _save_load(m):
    buffer = io.BytesIO()
    torch.jit.save(m, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cfg", [(16, 24, 2, 6), (24, 24, 1, 6), (32, 16, 1, 1)], ids=str)
def test_torchscript_block(cfg, channels_last):
    tv, ours = make_pair(*cfg)
    tv.eval()
    ours.eval()
    x = _apply_model_layout(torch.randn(2, cfg[0], 11, 11), channels_last)
    with torch.no_grad():
        want = tv(x)
    traced = torch.jit.trace(ours, x)  # with its default check_trace
    scripted = torch.jit.script(ours)
    assert "mnv2::fused_inverted_residual" in str(scripted.inlined_graph)
    assert "mnv2::fused_inverted_residual" in str(traced.inlined_graph)
    for m in (traced, scripted, _save_load(traced), _save_load(scripted)):
        with torch.no_grad():
            assert rel_err(m(x), want) < 1e-5
    # the scripted block in train mode computes batch statistics as torchvision's
    scripted.train()
    tv.train()
    assert rel_err(scripted(x), tv(x)) < 1e-5


def test_torchscript_trace_of_the_model():
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2, width=0.5, num_classes=50)
    ours.eval()
    tv.eval()
    x = torch.rand(2, 3, 64, 64)
    traced = torch.jit.trace(ours, x)
    assert str(traced.inlined_graph).count("mnv2::fused_inverted_residual") == 17
    traced = _save_load(traced)
    with torch.no_grad():
        assert rel_err(traced(x), tv(x)) < 1e-5
        x2 = torch.rand(2, 3, 64, 64)
        assert rel_err(traced(x2), tv(x2)) < 1e-5


# -- autocast ----------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cfg", [(16, 24, 2, 6), (24, 24, 1, 6), (32, 16, 1, 1)], ids=str)
def test_autocast_cpu_block(cfg, channels_last, train):
    tv, ours = make_pair(*cfg)
    x = _apply_model_layout(torch.randn(4, cfg[0], 12, 12), channels_last)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got_dtype, tv_dtype, err, tv_err = autocast_errors(tv, ours, x, "cpu", torch.bfloat16, train)
        # (a residual block of a float32 input adds it in float32: x + bfloat16 block)
        assert got_dtype == tv_dtype == (torch.float32 if tv.use_res_connect else torch.bfloat16)
        assert err <= 2 * tv_err, (err, tv_err)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_autocast_cpu_model(channels_last, train):
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2, width=0.5, num_classes=50)
    for m in (ours, tv):
        m.classifier[0].p = 0.0  # (dropout would make train-mode outputs incomparable)
        mnv2_kernels.testing.randomize_batch_norm(m, torch.Generator().manual_seed(3))
    ours.load_state_dict(tv.state_dict())
    x = _apply_model_layout(torch.rand(4, 3, 64, 64), channels_last)
    with torch.no_grad():
        for _ in range(2):  # the second call: the inference caches must not bypass autocast
            got_dtype, tv_dtype, err, tv_err = autocast_errors(tv, ours, x, "cpu", torch.bfloat16, train)
            assert got_dtype == tv_dtype == torch.bfloat16
            assert err <= 2 * tv_err, (err, tv_err)
    # and with gradients, backward included
    model = copy.deepcopy(ours).train(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bfloat16_model_runs_on_the_cpu(train):
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2, width=0.5, num_classes=50)
    for m in (ours, tv):
        m.classifier[0].p = 0.0
    ref = copy.deepcopy(tv).double().train(train)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        want = ref(x.double())
        got = copy.deepcopy(ours).bfloat16().train(train)(x.bfloat16())
        tv_got = copy.deepcopy(tv).bfloat16().train(train)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) <= 2 * rel_err(tv_got.float(), want)


# -- FLOPs -------------------------------------------------------------------------

def _flops(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_flop_count_is_torchvisions(channels_last, train):
    ours, tv = ours_and_torchvision(mnv2_kernels.mobilenet_v2, width=0.75)
    ours.train(train)
    tv.train(train)
    x = _apply_model_layout(torch.rand(2, 3, 96, 96), channels_last)
    want = _flops(tv, x)
    with torch.no_grad():
        assert [_flops(ours, x) for _ in range(3)] == [want] * 3  # first and later calls: the plan
    assert _flops(ours, x) == want  # with gradients


def test_every_operator_has_a_flop_formula_or_counts_none_by_design():
    from torch.utils.flop_counter import flop_registry

    uncounted = {"pack_weights", "pack_pointwise", "channel_moments", "project_moments", "depthwise_moments",
                 "depthwise_moments_backward"}  # packing, and batch-norm statistics (torch counts none)
    names = {name for name in dir(torch.ops.mnv2) if not name.startswith("_")
             and isinstance(getattr(torch.ops.mnv2, name), torch._ops.OpOverloadPacket)}
    counted = {name for name in names if getattr(torch.ops.mnv2, name) in flop_registry
               or getattr(torch.ops.mnv2, name).default in flop_registry}
    assert names - uncounted == counted, (names - uncounted) ^ counted


# -- convert_model ---------------------------------------------------------------------

def _fused_count(model):
    return sum(isinstance(m, FusedInvertedResidual) for m in model.modules())


def test_convert_model_leaves_an_odd_block_and_names_it():
    seeded(0)
    tv = torchvision.models.mobilenet_v2()
    tv.features[5].conv[1][2] = nn.ReLU(inplace=True)  # not a ReLU6: cannot be fused
    odd = tv.features[5]
    with pytest.warns(UserWarning, match=r"1 of 17 blocks left unfused in MobileNetV2:\n  features.5: .*ReLU6"):
        model = convert_model(tv)
    assert model.features[5] is odd and _fused_count(model) == 16
    x = torch.rand(1, 3, 64, 64)
    seeded(0)
    ref = torchvision.models.mobilenet_v2()
    ref.features[5].conv[1][2] = nn.ReLU(inplace=True)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(model.eval()(x), ref.eval()(x)) < 1e-5


def test_convert_model_strict_raises_before_any_change():
    seeded(0)
    tv = torchvision.models.mobilenet_v2()
    tv.features[5].conv[1][2] = nn.ReLU(inplace=True)
    with pytest.raises(ValueError, match="features.5"):
        convert_model(tv, strict=True)
    assert _fused_count(tv) == 0


def test_convert_model_leaves_quantizable_blocks():
    q = torchvision.models.quantization.mobilenet_v2()
    with pytest.warns(UserWarning, match="(?s)nothing to convert in QuantizableMobileNetV2: .*QuantizableInvertedResidual"):
        assert convert_model(q) is q
    assert _fused_count(q) == 0
    with pytest.raises(ValueError, match="QuantizableInvertedResidual"):
        convert_model(q, strict=True)


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.shufflenet_v2_x0_5], ids=str)
def test_convert_model_with_nothing_to_convert_says_so(builder):
    model = builder()
    with pytest.warns(UserWarning, match="nothing to convert in .*: it has no inverted-residual block"):
        assert convert_model(model) is model
    with pytest.raises(ValueError, match="it has no inverted-residual block"):
        convert_model(model, strict=True)


def test_convert_model_of_a_fully_convertible_model_is_silent():
    tv = torchvision.models.mobilenet_v2(width_mult=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_model(tv)
        block = convert_model(InvertedResidual(16, 24, 2, 6))
    assert _fused_count(tv) == 17 and isinstance(block, FusedInvertedResidual)


# -- explicit backends -------------------------------------------------------------

@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_explicit_gpu_backend_refuses_cpu_tensors(name):
    if os.environ.get("TRITON_INTERPRET") == "1" and name == "triton":
        pytest.skip("the Triton interpreter runs CPU tensors")
    tv, block = make_pair(16, 16, 1, 6)
    x = torch.randn(2, 16, 5, 5)
    args = (x, *block.eval().folded_weights(), 1, True)
    with mnv2_kernels.use_backend(name):
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run a torch.float32 tensor on cpu"):
            ops.fused_inverted_residual(*args)
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"), torch.no_grad():
            block(x)
    with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"):
        ops.fused_inverted_residual(*args, backend=name)


# -- checkpointing -------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_activation_checkpointing_gives_the_same_gradients(train):
    _, block = make_pair(24, 24, 1, 6)
    block.train(train)
    x = torch.randn(2, 24, 9, 9)
    grads = []
    for checkpointed in (False, True):
        model = copy.deepcopy(block)
        xi = x.clone().requires_grad_()
        y = (torch.utils.checkpoint.checkpoint(model, xi, use_reentrant=False) if checkpointed else model(xi))
        y.square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
