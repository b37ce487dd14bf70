"""Independent references for the N-d and grouped convs: each format's stacked weight (C_out, C_in / groups, k...)
rebuilt from the cores with one torch.einsum written out here (no tnlayers network or equation code), and what
nn.Conv1d/2d/3d computes with it, which the layer must equal."""
import torch
from torch import nn

from _references import tr_full

NN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KERNEL_LETTERS = "abc"  # one einsum letter per spatial dim


def nd_conv_weight(fmt, cores, c_out, c_in_per_group, kernel, depthwise=False):
    """The stacked weight of a conv layer over ``len(kernel)`` spatial dims, as docs/design.md 'Layer layouts' says:
    TT (C_in/g, r1), (r1, prod k, r2), (r2, C_out); CP one factor per mode sharing R; Tucker-2 core (R_in, k..., R_out)
    with U_in, U_out; TR one ring core per mode of (in modes..., prod k, out modes...). ``depthwise``: no input
    modes (TT (prod k, r), (r, C_out); CP no input factor; Tucker core (k..., R_out), U_out; TR (prod k, out...))."""
    ks = KERNEL_LETTERS[:len(kernel)]
    shape = (c_out, c_in_per_group, *kernel)
    if fmt == "tt":
        if depthwise:
            return torch.einsum("ka,ao->ok", *cores).reshape(shape)
        return torch.einsum("ia,akb,bo->oik", *cores).reshape(shape)
    if fmt == "cp":
        if depthwise:
            terms = [f"{k}r" for k in ks] + ["or"]
            return torch.einsum(",".join(terms) + f"->o{ks}", *cores).unsqueeze(1)
        terms = ["ir"] + [f"{k}r" for k in ks] + ["or"]
        return torch.einsum(",".join(terms) + f"->oi{ks}", *cores)
    if fmt == "tucker":
        if depthwise:
            return torch.einsum(f"{ks}y,oy->o{ks}", *cores).unsqueeze(1)
        return torch.einsum(f"x{ks}y,ix,oy->oi{ks}", *cores)
    if fmt == "tr":
        full = tr_full(cores)  # (in modes..., prod k, out modes...)
        if depthwise:
            return full.reshape(*kernel, c_out).movedim(-1, 0).unsqueeze(1)
        return full.reshape(c_in_per_group, *kernel, c_out).movedim(-1, 0)
    raise ValueError(fmt)


def reference_conv(layer, x, cores=None, bias=None):
    """What the nn conv of the layer's arguments (its own padding and padding-mode code) computes on ``x`` with the
    weight rebuilt from ``cores`` (default: the layer's) by :func:`nd_conv_weight`; differentiable in both."""
    n = len(layer.kernel_size)
    cores = list(layer.cores) if cores is None else cores
    weight = nd_conv_weight(layer.format, cores, layer.out_channels, layer.in_channels // layer.groups,
                            layer.kernel_size, depthwise=layer.groups > 1 and layer.in_channels == layer.groups)
    dense = NN_CONV[n](layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    return dense._conv_forward(x, weight, layer.bias if bias is None else bias)
