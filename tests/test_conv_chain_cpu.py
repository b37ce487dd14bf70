"""The 1x1 maps of the factorized conv chain (tnlayers.conv_chain_cpu) against a 1x1 ``F.conv2d``, in every pair of
memory layouts: values, first and second-order gradients, and the layout each gradient comes back in."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tnlayers
from tnlayers.conv_chain_cpu import from_pixels, pixel_map, to_pixels

from _references import conv_weight

CONVS = {"tucker": tnlayers.TuckerConv2d, "tt": tnlayers.TTConv2d, "cp": tnlayers.CPConv2d,
         "tr": tnlayers.TRConv2d}
LAYOUTS = list(itertools.product([False, True], repeat=2))  # (x channels-last, y channels-last)
FORMAT = {False: torch.contiguous_format, True: torch.channels_last}


def mapped(x, matrix, bias, y_last):
    """pixel_map through the module's own layout helpers, back to (B, O, H, W)."""
    pixels, x_last = to_pixels(x)
    return from_pixels(pixel_map(pixels, matrix, bias, x_last, y_last), y_last, *x.shape[-2:])


def reference(x, matrix, bias):
    return F.conv2d(x, matrix[..., None, None], bias)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), c=st.integers(1, 7), o=st.integers(1, 7), h=st.integers(1, 5),
       w=st.integers(1, 5), x_last=st.booleans(), y_last=st.booleans(), with_bias=st.booleans())
def test_values_and_gradients_match_a_1x1_conv(batch, c, o, h, w, x_last, y_last, with_bias):
    gen = torch.Generator().manual_seed(batch * 1000 + c * 100 + o * 10 + h + w)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x = make(batch, c, h, w).to(memory_format=FORMAT[x_last]).requires_grad_()
    matrix = make(o, c).requires_grad_()
    bias = make(o).requires_grad_() if with_bias else None
    params = [t for t in (x, matrix, bias) if t is not None]
    upstream = make(batch, o, h, w)
    ours, expected = mapped(x, matrix, bias, y_last), reference(x, matrix, bias)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(torch.autograd.grad(ours, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# (out, in) channels: more out than in, and fewer (the map then computes the narrow product the other way round)
CHANNELS = [(4, 3), (2, 5)]


@pytest.mark.parametrize("x_last,y_last", LAYOUTS)
@pytest.mark.parametrize("out,channels", CHANNELS)
def test_gradcheck_and_second_order(x_last, y_last, out, channels):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 4, 5, dtype=torch.float64).to(memory_format=FORMAT[x_last]).requires_grad_()
    matrix = torch.randn(out, channels, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True)
    fn = lambda x, m, b: mapped(x, m, b, y_last)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, matrix, bias))
    assert torch.autograd.gradgradcheck(fn, (x, matrix, bias))


@pytest.mark.parametrize("x_last,y_last", LAYOUTS)
@pytest.mark.parametrize("out,channels", CHANNELS)
def test_output_and_input_gradient_keep_their_layouts(x_last, y_last, out, channels):
    """The output is stored in the layout asked for, and the input's gradient in the input's layout (what
    the custom function is for: plain bmm autograd would hand it back transposed)."""
    leaf = torch.randn(2, channels, 4, 5).to(memory_format=FORMAT[x_last]).requires_grad_()
    x = leaf * 1  # not a leaf: its gradient is seen before accumulation could restride it
    seen = []
    x.register_hook(seen.append)
    y = mapped(x, torch.randn(out, channels, requires_grad=True), None, y_last)
    assert y.is_contiguous(memory_format=FORMAT[y_last])
    y.backward(torch.randn(2, out, 4, 5).to(memory_format=FORMAT[y_last]))
    assert seen[0].is_contiguous(memory_format=FORMAT[x_last])


def test_no_graph_without_gradients():
    x, matrix = torch.randn(2, 3, 4, 4), torch.randn(5, 3)
    pixels, x_last = to_pixels(x)
    y = pixel_map(pixels, matrix, None, x_last, True)
    assert y.grad_fn is None
    torch.testing.assert_close(from_pixels(y, True, 4, 4), reference(x, matrix, None))


def test_input_in_neither_layout_is_copied_to_channels_last():
    base = torch.randn(2, 3, 8, 5)
    x = base[:, :, ::2]  # strided: neither NCHW- nor channels-last-contiguous
    pixels, x_last = to_pixels(x)
    assert x_last and pixels.is_contiguous()
    torch.testing.assert_close(from_pixels(pixels, x_last, 4, 5), x, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", CONVS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_factorized_conv_output_and_input_gradient_follow_the_input_layout(fmt, memory_format):
    """Like nn.Conv2d: the output in the input's layout; and the input's gradient in it too, so the layer
    below gets no transposed gradient from the chain's channels-last middle."""
    layer = CONVS[fmt](6, 8, 3, padding=1, rank=3, strategy="factorized")
    leaf = torch.randn(2, 6, 7, 7).to(memory_format=memory_format).requires_grad_()
    x = leaf * 1
    seen = []
    x.register_hook(seen.append)
    y = layer(x)
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(torch.randn_like(y))
    assert seen[0].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("fmt", ["tucker", "cp", "tr"])
def test_factorized_conv_compiles_with_fullgraph_and_trains(fmt):
    """Compiled whole (inside torch.compile the chain's 1x1 steps are 1x1 convs): fwd+bwd against F.conv2d with the
    reference weight."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = CONVS[fmt](6, 8, 3, padding=1, rank=3, strategy="factorized")
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    params = [x, *layer.cores, layer.bias]
    got = torch.autograd.grad(compiled(x).square().sum(), params)
    expected = F.conv2d(x, conv_weight(fmt, list(layer.cores), 8, 6, 3, 3), layer.bias, padding=1)
    for g, e in zip(got, torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_last,y_last", [(False, True), (True, False)])
def test_pixel_map_function_compiles_with_fullgraph(x_last, y_last):
    """The GEMM autograd function itself traces whole (users may call it under compile): against matmul + bias."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, requires_grad=True)  # logical (B, C, P)
    matrix, bias = torch.randn(4, 5, requires_grad=True), torch.randn(4, requires_grad=True)
    stored = x.mT.contiguous() if x_last else x  # channels-last is stored (B, P, C)

    def run(stored, matrix, bias):
        y = pixel_map(stored, matrix, bias, x_last, y_last)
        return y.mT if y_last else y
    got_y = torch.compile(run, fullgraph=True, backend="aot_eager")(stored, matrix, bias)
    got = torch.autograd.grad(got_y.square().sum(), (x, matrix, bias))
    want_y = matrix @ x + bias[:, None]
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, torch.autograd.grad(want_y.square().sum(), (x, matrix, bias))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_torch_func_per_sample_gradients_match_a_loop():
    """torch.func works through the chain as through nn.Conv2d: per-sample core gradients by vmap(grad(...))
    against a Python loop over the samples with the reference conv."""
    torch.manual_seed(0)
    layer = CONVS["tucker"](4, 6, 3, padding=1, rank=2, strategy="factorized", dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def loss(p, sample):
        return torch.func.functional_call(layer, p, (sample[None],)).square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    names = list(params)
    for i in range(x.shape[0]):
        leaves = [params[n].clone().requires_grad_() for n in names]
        cores = [leaves[names.index(f"cores.{k}")] for k in range(len(layer.cores))]
        y = F.conv2d(x[i:i + 1], conv_weight("tucker", cores, 6, 4, 3, 3), leaves[names.index("bias")], padding=1)
        for name, g in zip(names, torch.autograd.grad(y.square().sum(), leaves)):
            torch.testing.assert_close(per_sample[name][i], g, rtol=1e-10, atol=1e-12)
