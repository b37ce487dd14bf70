"""set_batched_weights: the weights of same-shape layers rebuilt in one contraction give the values and gradients of
the dense ops on the reference weights (plain einsum, tests/_references.py), only to the layers used, and never a
weight built from cores that changed since."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tnlayers
from tnlayers.contract import _Plan
from tnlayers.layers import batched_weights
from _references import conv_weight, linear_weight

FORMATS = ["tt", "tr", "cp", "tucker"]
F64 = torch.float64


class Net(nn.Module):
    """``n`` same-shape convs (tanh between), a conv of another shape, and a linear pair; ``skip``: a conv the
    forward leaves out; ``twice``: a conv applied twice; ``touch``: a conv whose first core the forward
    scales in place just before calling it (``through_data``: through ``.data``, no version counter moves)."""

    def __init__(self, fmt, n=3, channels=6, rank=3, skip=None, twice=None, touch=None, through_data=False):
        super().__init__()
        make = lambda c_in, c_out: tnlayers.TensorizedConv2d(  # noqa: E731
            c_in, c_out, 3, padding=1, rank=rank, format=fmt, strategy="dense", dtype=F64)
        self.convs = nn.ModuleList(make(channels, channels) for _ in range(n))
        self.wide = make(channels, 2 * channels)
        self.heads = nn.ModuleList(tnlayers.TensorizedLinear(8, 8, rank=2, format=fmt, strategy="dense", dtype=F64)
                                   for _ in range(2))
        self.fmt, self.skip, self.twice, self.touch, self.through_data = fmt, skip, twice, touch, through_data

    def conv(self, layer, x, reference):
        if not reference:
            return layer(x)
        out, c_in = layer.weight.shape[:2]
        return F.conv2d(x, conv_weight(self.fmt, list(layer.cores), out, c_in, 3, 3), layer.bias, padding=1)

    def forward(self, x, reference=False):
        for i, layer in enumerate(self.convs):
            if i == self.skip:
                continue
            if i == self.touch:
                with torch.no_grad():
                    (layer.cores[0].data if self.through_data else layer.cores[0]).mul_(1.5)
            x = torch.tanh(self.conv(layer, x, reference))
            if i == self.twice:
                x = torch.tanh(self.conv(layer, x, reference))
        x = self.conv(self.wide, x, reference).mean((2, 3))[:, :8]
        for head in self.heads:
            x = torch.tanh(F.linear(x, linear_weight(self.fmt, list(head.cores), 8, 8), head.bias) if reference
                           else head(x))
        return x


@pytest.fixture
def builds(monkeypatch):
    """Counts of per-layer (``weight``) and batched (``weights``) rebuilds."""
    counts = {"weight": 0, "weights": 0}
    for name in counts:
        original = getattr(_Plan, name)

        def counted(self, *args, _name=name, _original=original):
            counts[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(_Plan, name, counted)
    return counts


def batched_net(fmt, seed, channels=6, **options):
    """(net, x): a Net whose layers already chose their strategy (dense) on x, then batching turned on."""
    torch.manual_seed(seed)
    net = Net(fmt, channels=channels, **options)
    x = torch.randn(2, channels, 5, 5, dtype=F64)
    net(x)  # each layer's first call decides its strategy (dense here): batching starts from the next
    tnlayers.set_batched_weights(net)
    return net, x


def grads_of(net, x, reference):
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = net(x, reference=reference)
    y.square().sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in net.parameters()]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_batched_rebuilds_match_the_reference(fmt, builds):
    torch.manual_seed(0)
    net = Net(fmt)
    x = torch.randn(2, 6, 5, 5, dtype=F64)
    net(x)  # each layer's first call decides its strategy (dense here)
    assert tnlayers.set_batched_weights(net) == 6
    builds.update(weight=0, weights=0)
    y, got = grads_of(net, x, reference=False)
    # the three same-shape convs in one contraction, the two linears in another; the wide conv alone
    assert builds == {"weight": 1, "weights": 2}
    want_y, want = grads_of(copy.deepcopy(net), x, reference=True)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-12)
    assert_same(got, want)


@pytest.mark.parametrize("fmt", ["tr", "cp"])
def test_a_layer_the_forward_leaves_out_gets_no_gradient(fmt, builds):
    net, x = batched_net(fmt, n=4, skip=2, seed=1)
    builds.update(weight=0, weights=0)
    _, got = grads_of(net, x, reference=False)
    assert builds["weights"] == 2
    assert all(c.grad is None for c in net.convs[2].cores)  # as without batching: optimizers skip it
    _, want = grads_of(copy.deepcopy(net), x, reference=True)
    assert_same(got, want)
    before = [c.detach().clone() for c in net.convs[2].cores]
    torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1).step()
    assert all(torch.equal(c, b) for c, b in zip(net.convs[2].cores, before))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_layer_called_twice_and_cores_written_during_the_forward(fmt):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 5, 5, dtype=F64)
    for options in ({"twice": 1}, {"touch": 1}, {"touch": 1, "through_data": True}):
        net = Net(fmt, **options)
        net(x)
        tnlayers.set_batched_weights(net)
        ref = copy.deepcopy(net)
        y, got = grads_of(net, x, reference=False)
        want_y, want = grads_of(ref, x, reference=True)  # (``touch`` scales the same core in both)
        torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-12)
        assert_same(got, want)


def test_backward_twice_with_retain_graph_accumulates_like_the_reference():
    net, x = batched_net("tr", seed=3)
    ref = copy.deepcopy(net)
    for model, reference in ((net, False), (ref, True)):
        loss = model(x, reference=reference).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same([p.grad for p in net.parameters()], [p.grad for p in ref.parameters()])


def test_no_graph_means_no_batched_build(builds):
    net, x = batched_net("tt", seed=4)
    builds.update(weight=0, weights=0)
    with torch.no_grad():
        y = net(x)
    assert builds["weights"] == 0
    torch.testing.assert_close(y, net(x, reference=True).detach(), rtol=1e-10, atol=1e-12)
    for core in net.parameters():
        core.requires_grad_(False)
    builds.update(weight=0, weights=0)
    net(x)  # frozen cores: the weight cache, no graph to batch
    assert builds["weights"] == 0


def test_a_forward_that_raises_leaves_no_weight_behind():
    net, x = batched_net("tr", seed=5)
    with pytest.raises(ValueError):
        net(torch.randn(2, 5, 5, 5, dtype=F64))  # wrong channel count: the first conv raises
    layer = net.convs[1]
    layer.cores[0].data.mul_(3.0)  # through .data: the version counter does not move
    y = layer(x)
    want = F.conv2d(x, conv_weight("tr", list(layer.cores), 6, 6, 3, 3), layer.bias, padding=1)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


def test_enable_twice_disable_and_deepcopy(builds):
    net, x = batched_net("cp", seed=6)
    tnlayers.set_batched_weights(net)
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1
    twin = copy.deepcopy(net)
    assert tnlayers.set_batched_weights(net, False) == 6
    assert len(net._forward_pre_hooks) == 0 and len(net._forward_hooks) == 0
    builds.update(weight=0, weights=0)
    net(x).sum().backward()
    assert builds == {"weight": 6, "weights": 0}
    twin(x).sum().backward()  # the copy keeps its own batching
    assert builds["weights"] == 2
    tnlayers.set_batched_weights(twin, False)
    assert len(twin._forward_pre_hooks) == 0 and len(twin._forward_hooks) == 0
    assert tnlayers.set_batched_weights(nn.Linear(2, 2)) == 0


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_double_backward_through_batched_weights(fmt):
    """A gradient penalty (create_graph=True, then backward through the gradients) as with per-layer rebuilds."""
    net, x = batched_net(fmt, skip=2, seed=7)
    ref = copy.deepcopy(net)
    for model, reference in ((net, False), (ref, True)):
        cores = list(model.convs[0].cores) + list(model.heads[1].cores)
        grads = torch.autograd.grad(model(x, reference=reference).square().sum(), cores, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
    assert_same([p.grad for p in net.parameters()], [p.grad for p in ref.parameters()])


def test_inside_torch_compile_each_layer_rebuilds(monkeypatch):
    net, x = batched_net("tucker", seed=8)
    want = net(x, reference=True).detach()

    def refused(*args):
        raise AssertionError("a batched rebuild inside torch.compile")
    monkeypatch.setattr(_Plan, "weights", refused)
    compiled = torch.compile(net, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):  # the hooks leave no state for a guard to watch
        for _ in range(3):
            y = compiled(x)
            y.sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


class Checkpointed(nn.Module):
    """Three same-shape TR convs, each inside an activation checkpoint."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.convs = nn.ModuleList(tnlayers.TRConv2d(8, 8, 3, padding=1, rank=3, strategy="dense", dtype=F64)
                                   for _ in range(3))
        self.use_reentrant = use_reentrant

    def forward(self, x, reference=False):
        for conv in self.convs:
            if reference:
                w = conv_weight("tr", list(conv.cores), 8, 8, 3, 3)
                x = torch.tanh(F.conv2d(x, w, conv.bias, padding=1))
            else:
                x = torch.utils.checkpoint.checkpoint(lambda t, c=conv: torch.tanh(c(t)), x,
                                                      use_reentrant=self.use_reentrant)
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_layers_inside_activation_checkpoints(use_reentrant):
    if not use_reentrant and batched_weights._TOP_HOOKS is None:
        pytest.skip("torch < 2.8: a non-reentrant checkpoint cannot be detected (see the next test)")
    torch.manual_seed(10)
    net = Checkpointed(use_reentrant)
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    net(x.requires_grad_())  # (a reentrant checkpoint differentiates only if an input requires grad)
    x = x.detach()
    tnlayers.set_batched_weights(net)
    y, got = grads_of(net, x, reference=False)
    want_y, want = grads_of(copy.deepcopy(net), x, reference=True)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-12)
    assert_same(got, want)


def test_where_a_checkpoint_cannot_be_detected_it_refuses_loudly(monkeypatch):
    """Older torch has no way to see a non-reentrant checkpoint: its recompute then differs from its forward,
    which torch.utils.checkpoint refuses (CheckpointError), never a silent wrong gradient."""
    monkeypatch.setattr(batched_weights, "_TOP_HOOKS", None)
    torch.manual_seed(11)
    net = Checkpointed(use_reentrant=False)
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    net(x)
    tnlayers.set_batched_weights(net)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        net(x).sum().backward()


def test_under_autocast_the_batched_weights_are_the_per_layer_ones():
    torch.manual_seed(9)
    net = Net("tr").float()
    x = torch.randn(2, 6, 5, 5)
    net(x)
    plain = copy.deepcopy(net)
    tnlayers.set_batched_weights(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = net(x), plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bad, error", [((None,), "expects an nn.Module, got NoneType"),
                                        ((nn.Linear(2, 2), 1), "enabled must be a bool, got int")])
def test_set_batched_weights_refuses_bad_arguments(bad, error):
    with pytest.raises(TypeError, match=error):
        tnlayers.set_batched_weights(*bad)


@pytest.mark.filterwarnings("ignore:.*more than the")  # ranks above the useful ones: a warning, still a layer
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FORMATS), n=st.integers(2, 4), channels=st.sampled_from([4, 6, 8, 12]),
       rank=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_batched_gradients_match_the_reference_for_any_shape(fmt, n, channels, rank, seed):
    torch.manual_seed(seed)
    net = Net(fmt, n=n, channels=channels, rank=rank)
    x = torch.randn(2, channels, 4, 4, dtype=F64)
    net(x)
    tnlayers.set_batched_weights(net)
    y, got = grads_of(net, x, reference=False)
    want_y, want = grads_of(copy.deepcopy(net), x, reference=True)
    torch.testing.assert_close(y, want_y, rtol=1e-9, atol=1e-11)
    assert_same(got, want)
