"""A tensorized embedding's layout, from its constructor arguments alone: the index modes covering
``num_embeddings`` (padded up to a product when it has no balanced factorization), the modes of
``embedding_dim``, and the network: for TT, TR and Tucker over the merged modes ``i_k * j_k`` (the TT-matrix /
TT-Rec layout: TT core k is (r_{k-1}, i_k j_k, r_k)), for CP over the separate modes (i_1, ..., i_d, j_1, ...,
j_d) (tensorly-torch's CP embedding: a lookup is then a product of gathered rows and one matrix product with
the dim factors; merged, each row needed its own Khatri-Rao product, 2-3x slower at equal parameters). A pure
function of the arguments, as ``layout.py`` is for Linear and Conv2d.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from math import prod
from numbers import Integral, Real
from types import ModuleType
from typing import Optional, Sequence, Tuple, Union

from ..formats.network import Network
from ..shapes import as_int, check_shape, resolve_rank, tensorize_dim
from .base import build_network, warn_if_larger_than_dense
from .layout import layer_format

__all__ = ["EmbeddingLayout", "embedding_layout", "index_shape", "dim_shape", "DEFAULT_MODES", "SEPARATE_MODES", "check_padding_idx",
           "check_positive", "check_flag", "embedding_std"]

SEPARATE_MODES = ("cp",)  # formats whose network is over (i_1, ..., i_d, j_1, ..., j_d), not i_k * j_k
DEFAULT_MODES = 3  # index and dim modes paired: (i_1, j_1), (i_2, j_2), (i_3, j_3), as in TT-Rec
_EXACT_SLACK = 1.5  # an exact factorization is kept unless its modes sum to more than this times a padded one's


@dataclass(frozen=True)
class EmbeddingLayout:
    fmt: ModuleType
    network: Network  # over the merged modes i_k * j_k, or (i..., j...) for SEPARATE_MODES
    in_shape: Tuple[int, ...]  # index modes (i_1, ..., i_d): product >= num_embeddings
    out_shape: Tuple[int, ...]  # dim modes (j_1, ..., j_d): product == embedding_dim
    roles: Tuple[str, ...]  # "merged", or "index"/"dim" per mode (none is spatial: a Tucker rank factors all)


def _ceil_root(n: int, k: int) -> int:
    """The least f with f ** k >= n (integers only: a float root is off by one near perfect powers)."""
    f = max(1, round(n ** (1.0 / k)))
    while f ** k < n:
        f += 1
    while f > 1 and (f - 1) ** k >= n:
        f -= 1
    return f


def _balanced_cover(n: int, d: int) -> Tuple[int, ...]:
    """d near-equal factors whose product is the least such product >= n that this greedy finds."""
    shape, rest = [], n
    for k in range(d, 0, -1):
        f = _ceil_root(rest, k)
        shape.append(f)
        rest = -(-rest // f)
    return tuple(sorted(shape, reverse=True))


def index_shape(num_embeddings: int, modes: int = DEFAULT_MODES) -> Tuple[int, ...]:
    """Index modes for ``num_embeddings`` rows: its balanced exact factorization (1s filling missing modes)
    unless that is lopsided (a large prime factor), then near-equal modes whose product exceeds it a little
    (the rows past ``num_embeddings`` are never looked up).

        >>> index_shape(1_000_000), index_shape(50257), index_shape(30000), index_shape(10, 2)
        ((100, 100, 100), (37, 37, 37), (40, 30, 25), (5, 2))
    """
    exact = tensorize_dim(num_embeddings, modes)
    exact = exact + (1,) * (modes - len(exact))
    padded = _balanced_cover(num_embeddings, modes)
    return exact if sum(exact) <= _EXACT_SLACK * sum(padded) else padded


def dim_shape(embedding_dim: int, modes: int = DEFAULT_MODES) -> Tuple[int, ...]:
    """Modes of ``embedding_dim``: ``tnlayers.tensorize_dim``'s, 1s filling missing modes.

        >>> dim_shape(256), dim_shape(768), dim_shape(3)
        ((8, 8, 4), (12, 8, 8), (3, 1, 1))
    """
    shape = tensorize_dim(embedding_dim, modes)
    return shape + (1,) * (modes - len(shape))


def _check_in_shape(shape, num_embeddings: int) -> Tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) == 0:
        raise TypeError(f"in_shape must be a non-empty sequence of positive ints, got {shape!r}")
    if any(isinstance(n, bool) or not isinstance(n, Integral) or n < 1 for n in shape):
        raise ValueError(f"in_shape must hold positive ints, got {tuple(shape)!r}")
    if prod(shape) < num_embeddings:
        raise ValueError(f"in_shape={tuple(shape)!r} has product {prod(shape)}, fewer than num_embeddings="
                         f"{num_embeddings}: the index modes must cover every row (a larger product is allowed: "
                         f"the rows past num_embeddings are never looked up)")
    return tuple(int(n) for n in shape)


def embedding_layout(owner: str, fixed_format: Optional[str], format: Optional[str], num_embeddings: int,
                     embedding_dim: int, rank, in_shape, out_shape) -> EmbeddingLayout:
    """The layout of embedding class ``owner`` (its name, for messages), whose class fixes ``fixed_format``
    (None for ``TensorizedEmbedding``). Sizes are positive ints (checked by the caller). Warns once per
    configuration when the factorization is larger than the dense table."""
    fmt = layer_format(owner, fixed_format, format)
    outs = None if out_shape is None else check_shape(out_shape, embedding_dim, "out_shape")
    ins = None if in_shape is None else _check_in_shape(in_shape, num_embeddings)
    if ins is None:
        ins = index_shape(num_embeddings, DEFAULT_MODES if outs is None else len(outs))
    if outs is None:
        outs = dim_shape(embedding_dim, len(ins))
    if len(ins) != len(outs):
        raise ValueError(f"in_shape {ins} and out_shape {outs} must have as many modes (index mode k and dim mode k "
                         f"are one mode of the network); pad the shorter with 1s")
    if len(ins) < 2:
        raise ValueError(f"in_shape {ins} and out_shape {outs} must have at least 2 modes each to be factorized")
    if fmt.NAME in SEPARATE_MODES:
        modes, roles = ins + outs, ("index",) * len(ins) + ("dim",) * len(outs)
    else:
        modes, roles = tuple(i * j for i, j in zip(ins, outs)), ("merged",) * len(ins)
    dense = num_embeddings * embedding_dim
    rank = resolve_rank(rank, lambda r: fmt.network(modes, fmt.layer_rank(r, roles)).num_params, dense,
                        where=f" for {owner}")
    net = build_network(fmt, modes, rank, roles, dense, "dense nn.Embedding")
    warn_if_larger_than_dense(owner, net, net.num_params, dense, "dense nn.Embedding")
    return EmbeddingLayout(fmt, net, ins, outs, roles)


# -- nn.Embedding's other arguments ---------------------------------------------------------------------
def check_padding_idx(value, n: int) -> Optional[int]:
    """nn.Embedding's rule: None, or an int in [-n, n) (negative counts from the end)."""
    if value is None:
        return None
    index = as_int(value)
    if index is None:
        raise TypeError(f"padding_idx must be None or an int, got {value!r}")
    if not -n <= index < n:
        raise ValueError(f"padding_idx must be within num_embeddings: in [-{n}, {n}), got {index}")
    return index % n


def check_positive(value, name: str, allow_none: bool) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {'None or ' if allow_none else ''}a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def embedding_std(value) -> Union[str, float]:
    """``weight_std``: "nn" (nn.Embedding's N(0, 1): std 1) or a number > 0; He's fan-in rule has no meaning
    for a lookup table."""
    if isinstance(value, str):
        if value != "nn":
            raise ValueError(f"weight_std of an embedding must be 'nn' (nn.Embedding's N(0, 1) init) or a number "
                             f"> 0, got {value!r}")
        return value
    return check_positive(value, "weight_std", allow_none=False)
