"""Contractions of a layer's cores, planned once with opt_einsum and reused on every call.

Two ways to apply a tensorized layer to an input:
- dense: contract the cores into the weight, then one ``F.linear``/``F.conv2d``;
- factorized: contract the input through the cores. For a conv, cores holding input modes form one 1x1
  conv (a small matrix), the cores holding the spatial modes (and mode-less cores such as a Tucker core) form a small
  kernel applied by one conv, and cores holding output modes form the 1x1 map after it. Bonds shared by
  the input side, the kernel and the output side (CP's rank) make the conv depthwise (groups);
  bonds passing from input side to output side around the kernel (a tensor ring's closing bond) are
  folded into the batch.
Each plan carries opt_einsum's FLOP estimate, which ``"auto"`` starts from (see :mod:`tnlayers.strategy`).

opt_einsum only plans: a :class:`Contraction` runs its pairwise steps as plain torch ops (each step's permutes,
reshapes and one matmul, worked out once: :mod:`tnlayers.pairwise_step`), so ``torch.compile(fullgraph=True)``
traces a layer's forward without entering opt_einsum (or numpy).
A tensor ring's weight, where that path would hold an intermediate larger than the weight, is contracted
in chunks of its closing bond instead (:mod:`tnlayers.ring_weight`).
Design notes: docs/design.md, 'Contraction planning'.
"""
from __future__ import annotations

from functools import lru_cache, partial
from math import prod
from typing import Sequence, Tuple

import opt_einsum
import torch
import torch.nn.functional as F

from .formats.network import Network, einsum_equation, mode_label
from .conv_chain_cpu import from_pixels, is_channels_last, pixel_map, to_pixels
from .pairwise_step import PairStep
from .ring_weight import RingWeight, ring_order

__all__ = ["Contraction", "expression", "LinearPlan", "ConvPlan", "CONV_FUNCTIONS"]

_BATCH = "_batch"  # label of the input's batch axis (never clashes with m*/r*)
NOMINAL_ROWS = 1024  # batch size a linear layer's factorized path is planned for when it cannot be re-planned
RING_CHUNKED_ABOVE = 1 << 20  # entries: a ring's weight path holding more than this and the weight is chunked


def pairwise_steps(equation: str, path: Sequence[Sequence[int]]) -> Tuple[Tuple[Tuple[int, ...], str], ...]:
    """The pairwise einsums that carry out ``equation`` along ``path`` (opt_einsum's documented return: a
    list of tuples of positions in the working list), as ``(positions descending, step equation)``.

    Built here rather than read from ``PathInfo.contraction_list``, whose tuple layout opt_einsum does not
    document. Same rule as opt_einsum's own executor: an intermediate keeps the labels still needed (by
    the output or an operand not yet contracted), in the order they first appear among its inputs; the
    last step writes the output's labels."""
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    if not arrow or "." in equation:
        raise ValueError(f"expected an explicit equation without ellipsis ('ab,bc->ac'), got {equation!r}")
    work = inputs.split(",")
    steps = []
    for n, positions in enumerate(path):
        positions = tuple(sorted(positions, reverse=True))
        picked = [work.pop(i) for i in positions]
        if n == len(path) - 1:
            result = output
        else:
            joined = "".join(picked)
            needed = set(output).union(*work)
            result = "".join(sorted(set(joined) & needed, key=joined.find))
        work.append(result)
        steps.append((positions, ",".join(picked) + "->" + result))
    if len(work) != 1:
        raise ValueError(f"path {path!r} leaves {len(work)} operands of {equation!r}, not one")
    return tuple(steps)


class Contraction:
    """An einsum over fixed operand shapes, as opt_einsum's pairwise steps: ``(positions, equation)``,
    the operands at ``positions`` (descending) popped from the working list and their einsum appended.

    Of opt_einsum it uses only ``contract_path(..., shapes=True)`` (opt_einsum >= 3.3), the returned path
    and the FLOP estimate ``PathInfo.opt_cost``; tests/test_contract_upstream.py checks both against the
    installed opt_einsum."""

    def __init__(self, equation: str, shapes: Tuple[Tuple[int, ...], ...]):
        path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="auto")
        self.equation = equation
        self.cost = int(info.opt_cost)
        self.steps = pairwise_steps(equation, path)
        # two operands: permutes, reshapes and one mm/bmm, worked out here (torch.einsum would parse the
        # equation and unsqueeze both operands on every call); one operand: torch.einsum as it is
        self._run = tuple((positions, PairStep(step) if len(positions) == 2 else partial(torch.einsum, step))
                          for positions, step in self.steps)
        size = {label: n for term, shape in zip(equation.split("->")[0].split(","), shapes)
                for label, n in zip(term, shape)}
        # entries of the largest tensor a step makes (the result included): what the contraction holds at most
        self.largest = max([prod(size[c] for c in step.split("->")[1]) for _, step in self.steps]
                           + [prod(shape) for shape in shapes])

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        work = list(operands)
        for positions, step in self._run:
            picked = [work.pop(i) for i in positions]
            work.append(step(*picked))
        return work[0]


@lru_cache(maxsize=4096)
def expression(equation: str, shapes: Tuple[Tuple[int, ...], ...]):
    """(Contraction, FLOP estimate) for an equation and operand shapes; the path is searched once per
    (equation, shapes), so identical layers share it."""
    contraction = Contraction(equation, shapes)
    return contraction, contraction.cost


def autocast_dtype(device_type: str):
    """The dtype autocast computes in on this device type, or None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _under_autocast(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Under autocast, give every operand the autocast dtype: the pairwise einsum steps refuse mixed
    dtypes, and their first product would already come back in the lower precision."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


class _Plan:
    """What every layer plan shares: the modes' roles and the contraction of cores into the weight."""

    def __init__(self, net: Network, roles: Sequence[str]):
        self.net = net
        labels = [mode_label(i) for i in range(len(roles))]
        self.in_modes = [m for m, r in zip(labels, roles) if r == "in"]
        self.out_modes = [m for m, r in zip(labels, roles) if r == "out"]
        self.spatial_modes = [m for m, r in zip(labels, roles) if r == "spatial"]
        self.shapes = tuple(tuple(s) for s in net.shapes)
        order = self.out_modes + self.in_modes + self.spatial_modes
        self._weight_expr, self.weight_cost = expression(net.equation(order), self.shapes)
        # a tensor ring whose pairwise path holds more than the weight, and more than a few MiB: chunked over
        # its closing bond instead (small layers keep the few einsums, which run faster than the chunks)
        ring = ring_order(net, order)
        if ring is not None and self._weight_expr.largest > max(prod(net.modes), RING_CHUNKED_ABOVE):
            chunked = RingWeight(net, ring)
            if chunked.largest < self._weight_expr.largest:
                self._weight_expr, self.weight_cost = chunked, chunked.cost

    _batched_equation = None  # the weight's equation with a leading batch label, made by the first weights() call

    def size(self, labels) -> int:
        return prod([self.net.sizes[label] for label in labels])

    @property
    def batchable(self) -> bool:
        """Whether :meth:`weights` applies: the weight is one planned contraction (not a chunked ring)."""
        return isinstance(self._weight_expr, Contraction)

    def weights(self, stacked: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weights of several layers of this plan at once: ``stacked[k]`` holds core k of each layer along
        a leading batch axis; returns (layers, out, in, *spatial modes), each slice what :meth:`weight` gives
        for that layer's cores. One contraction with a batch label: every pairwise step a ``bmm``."""
        if self._batched_equation is None:
            order = self.out_modes + self.in_modes + self.spatial_modes
            self._batched_equation = einsum_equation([(_BATCH, *labels) for labels in self.net.cores],
                                                     (_BATCH, *order))
        stacked = _under_autocast(stacked)
        contraction, _ = expression(self._batched_equation, tuple(tuple(t.shape) for t in stacked))
        return self._shaped(contraction(*stacked).contiguous(), lead=1)

    def weight(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """Cores -> weight of shape (out, in, *spatial modes), out/in flattened row-major."""
        return self._shaped(self._weight_expr(*_under_autocast(cores)).contiguous())  # the layout kernels read

    def _shaped(self, w: torch.Tensor, lead: int = 0) -> torch.Tensor:
        """(*lead axes, out modes..., in modes..., spatial...) -> (*lead axes, out, in, *spatial), flattened row-major."""
        spatial = w.shape[w.dim() - len(self.spatial_modes):]
        return w.reshape(*w.shape[:lead], self.size(self.out_modes), self.size(self.in_modes), *spatial)


class LinearPlan(_Plan):
    """y[b, out] = sum_in W[out, in] x[b, in], with W given by the cores."""

    def __init__(self, net: Network, roles: Sequence[str]):
        super().__init__(net, roles)
        self._equation = einsum_equation([(_BATCH, *self.in_modes), *net.cores], (_BATCH, *self.out_modes))
        self._nominal = self._factorized_expr(NOMINAL_ROWS)

    def _factorized_expr(self, batch: int):
        """The path depends on the batch size: planned per size in eager mode; a traced forward (no
        planning while tracing) uses the one planned at construction for ``NOMINAL_ROWS`` rows."""
        if torch.compiler.is_compiling():
            return self._nominal
        x_shape = (batch, *(self.net.sizes[m] for m in self.in_modes))
        return expression(self._equation, (x_shape, *self.shapes))

    def costs(self, batch: int) -> Tuple[int, int]:
        """(dense, factorized) FLOP estimates for a batch of ``batch`` rows."""
        dense = self.weight_cost + 2 * batch * self.size(self.in_modes) * self.size(self.out_modes)
        if torch.compiler.is_compiling():  # the nominal plan's cost, scaled (it grows about linearly in rows)
            return dense, self._nominal[1] * batch // NOMINAL_ROWS
        return dense, self._factorized_expr(batch)[1]

    def factorized(self, x2d: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = x2d.shape[0]
        expr, _ = self._factorized_expr(batch)
        xs = x2d.reshape(batch, *(self.net.sizes[m] for m in self.in_modes))
        return expr(*_under_autocast([xs, *cores])).reshape(batch, self.size(self.out_modes))


CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dims
# whether the kernel conv of a 1-, 2-, 3-D chain gets channels-last input. Measured (one thread, 32-64 channels,
# Tucker/CP/TT, fwd+bwd and inference): 3-D 0.40-0.97x the time of channels-first; 1-D 0.65-1.50x, mostly slower
_MIDDLE_CHANNELS_LAST = {1: False, 2: True, 3: True}


class ConvPlan(_Plan):
    """ConvNd through the cores: input-side 1x1 maps -> one (grouped) kernel conv -> output-side 1x1 maps, for 1, 2
    or 3 spatial dims (the length of ``kernel_size``). With ``groups`` > 1 the cores hold the stacked weight
    (C_out, C_in / groups, k...), and the three steps are grouped convs. A layout with no input modes (a depthwise
    conv's, one input channel per group) has no such chain (``supported`` False): it runs dense."""

    def __init__(self, net: Network, roles: Sequence[str], kernel_size: Tuple[int, ...], groups: int = 1):
        super().__init__(net, roles)
        self.kernel_size = tuple(kernel_size)
        self.groups = groups
        role_of = dict(zip([mode_label(i) for i in range(len(roles))], roles))
        sides = {"in": [], "out": [], "kernel": []}
        # No input modes (a depthwise conv's layout): any chain applies the kernel to each channel before the
        # channel map, rank x the dense conv's work at least (measured 10-90x its time): dense only.
        self.supported = "in" in roles
        if not self.supported:
            return
        for k, labels in enumerate(net.cores):
            core_roles = {role_of[label] for label in labels if label in role_of}
            if len(core_roles) > 1:  # a core mixing input/output/spatial modes: no such factorized chain
                self.supported = False
                return
            side = core_roles.pop() if core_roles else "kernel"
            sides["kernel" if side == "spatial" else side].append(k)
        self.sides = sides
        bonds = net.bonds
        held = {side: {label for k in ks for label in net.cores[k]} for side, ks in sides.items()}
        self.pass_ = [b for b in bonds if b in held["in"] and b in held["out"] and b not in held["kernel"]]
        self.depth = [b for b in bonds if b in held["in"] and b in held["out"] and b in held["kernel"]]
        self.into = [b for b in bonds if b in held["in"] and b in held["kernel"] and b not in held["out"]]
        self.outof = [b for b in bonds if b in held["out"] and b in held["kernel"] and b not in held["in"]]
        self.mid_in = [*self.pass_, *self.depth, *self.into]  # channels after the input-side map
        self.mid_out = [*self.pass_, *self.depth, *self.outof]  # channels before the output-side map
        # Each side contracts into one small matrix, applied to the activations as a 1x1 map (_pointwise),
        # whatever the number of cores on that side.
        self._in_expr, self.in_cost = self._side(sides["in"], self.mid_in + self.in_modes)
        self._out_expr, self.out_cost = self._side(sides["out"], self.out_modes + self.mid_out)
        self._kernel_expr, self.kernel_cost = self._side(
            sides["kernel"], self.depth + self.outof + self.into + self.spatial_modes)

    def _side(self, cores, output):
        eq = einsum_equation([self.net.cores[k] for k in cores], output)
        return expression(eq, tuple(self.shapes[k] for k in cores))

    def costs(self, batch: int, *sizes: int) -> Tuple[int, int]:
        """(dense, factorized) FLOP estimates for an input (batch, C_in, *in sizes) giving the out sizes:
        ``sizes`` are the input's spatial sizes then the output's (``costs(batch, h, w, h_out, w_out)``)."""
        n = len(self.kernel_size)
        if len(sizes) != 2 * n:
            raise ValueError(f"costs takes {n} input and {n} output spatial sizes, got {sizes!r}")
        pixels, pixels_out, taps, g = prod(sizes[:n]), prod(sizes[n:]), prod(self.kernel_size), self.groups
        c_in, c_out = self.size(self.in_modes), self.size(self.out_modes)  # c_in: channels per group
        dense = self.weight_cost + 2 * batch * pixels_out * c_in * c_out * taps
        if not self.supported:
            return dense, None
        maps = 2 * batch * (g * pixels * c_in * self.size(self.mid_in) + pixels_out * self.size(self.mid_out) * c_out)
        conv = 2 * batch * g * self.size(self.pass_) * pixels_out * self.size(self.depth) \
            * self.size(self.outof) * self.size(self.into) * taps
        return dense, self.in_cost + self.kernel_cost + self.out_cost + maps + conv

    def factorized(self, x: torch.Tensor, cores: Sequence[torch.Tensor], conv_args: dict, bias=None) -> torch.Tensor:
        """``x``: (B, C_in, *spatial), already padded if the padding mode is not zeros. The bias goes into the
        last 1x1 conv (one pass over the output fewer than adding it after)."""
        batch, c_in, spatial, n = x.shape[0], x.shape[1], x.shape[2:], x.dim() - 2
        x, *cores = _under_autocast([x, *cores])
        pick = lambda side: [cores[k] for k in self.sides[side]]  # noqa: E731
        passing, depth = self.size(self.pass_), self.size(self.depth)
        kernel = self._kernel_expr(*pick("kernel")).reshape(depth * self.size(self.outof), self.size(self.into),
                                                            *self.kernel_size)
        m_out = self._out_expr(*pick("out")).reshape(self.size(self.out_modes), self.size(self.mid_out))
        bias = None if bias is None else bias.to(x.dtype)
        if self.groups > 1:
            return self._grouped(x, pick, kernel, m_out, conv_args, bias)
        m_in = self._in_expr(*pick("in")).reshape(self.size(self.mid_in), c_in)
        # Channels-last into the kernel conv, unless a ring's passing bond is folded into the batch (needs
        # channels-first).
        t = _pointwise(x, m_in, None, channels_last=passing == 1 and _MIDDLE_CHANNELS_LAST[n])
        if passing > 1:
            t = t.reshape(batch * passing, depth * self.size(self.into), *spatial)
        y = CONV_FUNCTIONS[n](t, kernel, None, groups=depth, **conv_args)
        if passing > 1:
            y = y.reshape(batch, self.size(self.mid_out), *y.shape[2:])
        x_last = n > 1 and is_channels_last(x)  # (nn.Conv1d gives channels-first output whatever its input)
        return _pointwise(y, m_out, bias, channels_last=x_last)  # in the input's layout, as nn.Conv2d

    def _grouped(self, x, pick, kernel, m_out, conv_args, bias):
        """groups > 1: three grouped convs, the small matrices and the kernel repeated per group. (Folding the
        groups into the batch instead, B*groups images of C_in/groups channels, ran 5-50x slower on oneDNN.)"""
        n, g, passing, depth = x.dim() - 2, self.groups, self.size(self.pass_), self.size(self.depth)
        ones = (1,) * n
        m_in = self._in_expr(*pick("in")).reshape(self.size(self.mid_in), x.shape[1] // g)
        t = CONV_FUNCTIONS[n](x, m_in.repeat(g, 1).reshape(g * m_in.shape[0], m_in.shape[1], *ones), groups=g)
        # channels (group, pass, depth, into): one kernel group per (group, pass, depth), the kernel shared
        y = CONV_FUNCTIONS[n](t, kernel.repeat(g * passing, *(1,) * (n + 1)), None, groups=g * passing * depth,
                              **conv_args)
        return CONV_FUNCTIONS[n](y, m_out.reshape(*m_out.shape, *ones), bias, groups=g)


def _pointwise(x: torch.Tensor, matrix: torch.Tensor, bias, channels_last: bool) -> torch.Tensor:
    """1x1 map of (B, C, *spatial) by a (C_out, C) matrix, the result in the layout asked for.

    On CPU, from or to channels-first: one batched GEMM over the pixels (:mod:`tnlayers.conv_chain_cpu`). A
    factorized Conv2d's fwd+bwd runs 7-20% faster than with oneDNN's 1x1 convs, and the k x k conv gets channels-last
    input without a copy. Not ``torch.matmul``: broadcasting a 2-D matrix, it copies the input to fold the batch,
    2-4x slower. Channels-last to channels-last, oneDNN's 1x1 conv is ~10% faster than the GEMMs (inference);
    on CUDA cuDNN's 1x1 conv reads either layout in place (a GEMM there is unmeasured). Inside ``torch.compile``
    the 1x1 conv too: inductor traces the GEMMs' autograd.Function into a graph that trained 1.6-1.7x slower than
    eager (TT-ResNet-20 at 0.1, batch 128, 32x32), the 1x1 convs into one 0.7-0.8x eager."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or (channels_last and not x.is_contiguous()):
        return CONV_FUNCTIONS[x.dim() - 2](x, matrix.reshape(*matrix.shape, *(1,) * (x.dim() - 2)), bias)
    pixels, x_last = to_pixels(x)
    return from_pixels(pixel_map(pixels, matrix, bias, x_last, channels_last), channels_last, *x.shape[2:])
