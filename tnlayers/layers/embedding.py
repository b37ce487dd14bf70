"""TensorizedEmbedding: ``nn.Embedding`` whose table is a tensor network, looked up without building the table;
and the named TTEmbedding, TREmbedding, CPEmbedding, TuckerEmbedding.

What nn.Embedding's arguments mean here (the table cannot be written row by row: it is the cores' product):
- ``padding_idx``: that row is returned as zeros and passes no gradient (the output is masked). ``.weight``
  shows it as zeros too; the cores' product itself is not zero there.
- ``max_norm``: looked-up rows whose ``norm_type``-norm exceeds it are scaled to it at lookup time, with
  nn.Embedding's factor ``max_norm / (norm + 1e-7)`` and, as nn's in-place renormalization under no_grad,
  without a gradient through the factor: the output equals nn.Embedding's on the same table, and so does the
  gradient that reaches the table. The cores are never modified, so ``.weight`` keeps the unscaled rows.
- ``scale_grad_by_freq``: each row's gradient is divided by its count in the batch, as nn's.
- ``sparse=True``: refused (the cores' gradients are dense and small: there is no sparse table to update).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._autograd import signature_stored
from ..init import init_cores_
from ..shapes import positive_int
from ..strategy import ModuleChoices, check_strategy, chooser, timing_run
from ..types import Device, DType, Rank, Shape
from .embedding_layout import check_flag, check_padding_idx, check_positive, embedding_layout, embedding_std
from .embedding_plan import EmbeddingPlan, bucket
from .tensorized import TensorizedLayer

__all__ = ["TensorizedEmbedding", "TTEmbedding", "TREmbedding", "CPEmbedding", "TuckerEmbedding"]


@signature_stored  # (apply: ~30 us less per call)
class _ScaleRows(torch.autograd.Function):
    """rows * forward_scale on the way forward, grad * grad_scale on the way back (either may be None): the
    constant factors of nn.Embedding's max_norm (no gradient through it) and scale_grad_by_freq."""

    @staticmethod
    def forward(rows, forward_scale, grad_scale):
        return rows * forward_scale if forward_scale is not None else rows.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.grad_scale = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.grad_scale is None else grad * ctx.grad_scale), None, None


class TensorizedEmbedding(TensorizedLayer):
    """``nn.Embedding(num_embeddings, embedding_dim, ...)`` whose table is a tensor network in ``format``.

    Layout (TT-Rec's): ``num_embeddings`` is covered by index modes ``in_shape`` (i_1, ..., i_d) (default:
    3 balanced modes; a product above num_embeddings when it has no balanced factorization: rows past it are
    refused as nn.Embedding refuses them), ``embedding_dim`` = prod of ``out_shape`` (j_1, ..., j_d), and the
    network is over the merged modes i_k * j_k (TT core k: (r_{k-1}, i_k j_k, r_k); CP's over the separate modes
    (i_1, ..., i_d, j_1, ..., j_d)). A lookup gathers each
    index's slices of the cores and contracts them (``strategy="factorized"``): its cost grows with the
    cores, not with the table. ``"dense"`` rebuilds the table and indexes it (not kept between calls by
    default, unlike the other layers' weight: ``cache_weight = True`` keeps it between no-grad calls);
    ``"auto"``/``"flops"`` choose per call from the number of indices (:mod:`tnlayers.strategy`). Repeated indices are looked up once. ``rank``: int, per-bond sequence, or
    float in (0, 1] (fraction of num_embeddings x embedding_dim). ``weight_std``: the table's std at init,
    ``"nn"`` (default: 1, nn.Embedding's N(0, 1)) or a number. ``padding_idx``, ``max_norm``,
    ``norm_type`` and ``scale_grad_by_freq``: as nn.Embedding, computed at lookup time (module docstring).

    Example::

        >>> import torch, tnlayers
        >>> emb = tnlayers.TensorizedEmbedding(1000, 64, format="tt", rank=8)  # = tnlayers.TTEmbedding(1000, 64, rank=8)
        >>> emb.in_shape, emb.out_shape, [tuple(c.shape) for c in emb.cores]
        ((10, 10, 10), (4, 4, 4), [(40, 8), (8, 40, 8), (8, 40)])
        >>> emb(torch.tensor([[1, 2, 3], [4, 5, 999]])).shape
        torch.Size([2, 3, 64])
    """

    KIND = "embedding"
    # No inference cache of the table by default: it would hold the memory the factorization saves (1 GB for a
    # 1,000,000 x 256 table). ``layer.cache_weight = True`` trades that memory for nn.Embedding's lookup speed.
    cache_weight = False

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, device: Device = None, dtype: DType = None, *, rank: Rank,
                 format: Optional[str] = None, in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None,
                 strategy: str = "auto", weight_std: Union[float, str] = "nn"):
        super().__init__()
        self.num_embeddings = positive_int(num_embeddings, "num_embeddings")
        self.embedding_dim = positive_int(embedding_dim, "embedding_dim")
        self.padding_idx = check_padding_idx(padding_idx, self.num_embeddings)
        self.max_norm = check_positive(max_norm, "max_norm", allow_none=True)
        self.norm_type = check_positive(norm_type, "norm_type", allow_none=False)
        self.scale_grad_by_freq = check_flag(scale_grad_by_freq, "scale_grad_by_freq")
        if check_flag(sparse, "sparse"):
            raise ValueError(f"{type(self).__name__} does not support sparse=True: the gradient reaches the cores, "
                             f"which are small and dense (there is no table whose rows a sparse gradient would "
                             f"update); use sparse=False with any optimizer")
        self.sparse = False
        check_strategy(strategy)
        self.weight_std = embedding_std(weight_std)
        layout = embedding_layout(type(self).__name__, self.FORMAT, format, self.num_embeddings, self.embedding_dim,
                                  rank, in_shape, out_shape)
        self.in_shape, self.out_shape, self.roles = layout.in_shape, layout.out_shape, layout.roles
        self.dense_params = self.num_embeddings * self.embedding_dim
        self._init_cores(layout.network, device, dtype)
        self.strategy = strategy
        self._choices = ModuleChoices((type(self).__name__, self.network.cores, tuple(sorted(self.network.sizes.items())),
                                       self.in_shape, self.out_shape, self.num_embeddings))
        self.register_parameter("bias", None)
        self.plan = EmbeddingPlan(self.network, self.in_shape, self.out_shape, self.num_embeddings)
        self.reset_parameters()

    # -- the table ---------------------------------------------------------------------------------------
    def _weight_shape(self):
        return (self.num_embeddings, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The table the layer looks rows up in, (num_embeddings, embedding_dim), rebuilt from the cores (for
        small tables, export and checks: a lookup never builds it); the ``padding_idx`` row as zeros."""
        self._check_materialized("weight")
        return self._mask_padding(self.plan.table(self.core_parameters()), self.padding_idx)

    def reset_parameters(self) -> None:
        """Random cores whose table has std ``weight_std`` (default ``"nn"``: 1, as nn.Embedding's N(0, 1))."""
        init_cores_(self.cores, self.network, 1.0 if self.weight_std == "nn" else self.weight_std)

    def _weight_to_modes(self, weight: torch.Tensor) -> torch.Tensor:
        return self.plan.to_modes(weight)

    @staticmethod
    def _mask_padding(table: torch.Tensor, row: Optional[int], dim: int = 0) -> torch.Tensor:
        """``table`` with the padding row (``dim=0``) or column (``dim=1``, logits) zero, out of place: that
        entry then passes no gradient."""
        if row is None:
            return table
        return table.index_fill(dim, torch.tensor([row], device=table.device), 0)

    # -- lookup ------------------------------------------------------------------------------------------
    def _check_indices(self, indices) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor of indices, got {type(indices).__name__}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{type(self).__name__} expects integer indices (torch.long or torch.int), got dtype "
                            f"{indices.dtype}")
        self._check_materialized("forward")

    def _check_range(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        low, high = torch.stack(torch.aminmax(indices)).tolist()  # one read of both ends
        if low < 0 or high >= self.num_embeddings:
            bad = low if low < 0 else high
            raise IndexError(f"{type(self).__name__}: index {bad} is out of range for num_embeddings="
                             f"{self.num_embeddings} (indices must be in [0, {self.num_embeddings}))")

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        self._check_indices(indices)
        flat = indices.reshape(-1)
        self._check_range(flat)
        return self._apply_cores(flat).reshape(*indices.shape, self.embedding_dim)

    def _by_row(self, flat: torch.Tensor, rows_of) -> torch.Tensor:
        """The rows of ``flat``, each distinct index looked up once by ``rows_of(unique indices)``, with
        max_norm's scale, scale_grad_by_freq's gradient scale and the padding mask applied per distinct row."""
        unique, inverse, *counts = torch.unique(flat, return_inverse=True, return_counts=self.scale_grad_by_freq)
        rows = rows_of(unique)
        forward_scale = None
        if self.max_norm is not None:
            with torch.no_grad():
                norms = torch.linalg.vector_norm(rows, ord=self.norm_type, dim=1, keepdim=True)
                forward_scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7),
                                            torch.ones_like(norms))
        grad_scale = (1.0 / counts[0].to(rows.dtype)).unsqueeze(1) if self.scale_grad_by_freq else None
        if forward_scale is not None or grad_scale is not None:
            rows = _ScaleRows.apply(rows, forward_scale, grad_scale)
        if self.padding_idx is not None:
            rows = rows.masked_fill((unique == self.padding_idx).unsqueeze(1), 0)
        return F.embedding(inverse, rows)  # (its backward sums repeats faster than index_select's: see the plan)

    def _shape_key(self, flat):  # the count of indices, rounded up to a power of two
        return bucket(len(flat))

    def _dense(self, flat, weight, bias):
        if self.max_norm is None and not self.scale_grad_by_freq:
            return F.embedding(flat, weight)  # the weight's padding row is zero already
        return self._by_row(flat, lambda unique: weight.index_select(0, unique))

    def _factorized(self, flat, cores, bias):
        return self._by_row(flat, lambda unique: self.plan.lookup(cores, unique))

    def _costs(self, flat):  # (repeated indices are looked up once: the factorized estimate is an upper bound)
        dense, factorized = self.plan.lookup_costs(len(flat))
        if self.cache_weight and not self._needs_grad(flat):
            dense = len(flat) * self.embedding_dim  # the cached table: built once, then only indexed
        return dense, factorized

    def _timing_run(self, flat: torch.Tensor, needs_grad: bool):
        params = [p.detach().requires_grad_(p.requires_grad and needs_grad) for p in self.core_parameters()]
        cached = self._dense_weight() if self.cache_weight and not needs_grad else None

        def forward(strategy):
            if strategy == "dense":
                weight = cached
                if weight is None:
                    weight = self._mask_padding(self.plan.table(params), self.padding_idx)
                return self._dense(flat, weight, None)
            return self._factorized(flat, params, None)
        return timing_run(forward, [p for p in params if p.requires_grad], needs_grad)

    # -- a tied output head: x @ table^T -------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight^T`` for ``x`` of shape (*, embedding_dim): the output head of a language model whose head
        is tied to this embedding (:class:`~tnlayers.TiedEmbeddingHead`), by the layer's strategy ("factorized":
        ``x`` through the cores, the table never built).

            >>> import torch, tnlayers
            >>> emb = tnlayers.TTEmbedding(100, 16, rank=4, dtype=torch.float64)
            >>> x = torch.randn(3, 16, dtype=torch.float64)
            >>> torch.allclose(emb.logits(x), x @ emb.weight.T)
            True
        """
        if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{type(self).__name__}.logits expects a floating-point torch.Tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.embedding_dim:
            raise ValueError(f"{type(self).__name__}.logits expects input of shape (*, {self.embedding_dim}), got "
                             f"{tuple(x.shape)}")
        self._check_input(x)  # dtype against the cores', meta cores
        x2d = x.reshape(-1, self.embedding_dim)
        grad = self._needs_grad(x2d)
        choice = chooser.choose(self._choices, self.strategy, x2d, ("logits", bucket(len(x2d))), grad,
                                lambda: self._logits_costs(len(x2d), grad), lambda: self._logits_timing(x2d, grad))
        if not torch.compiler.is_compiling():
            self.last_strategy = choice
        if choice == "dense":
            out = F.linear(x2d, self._dense_weight())
        else:
            out = self._mask_padding(self.plan.logits(x2d, self.core_parameters()), self.padding_idx, dim=1)
        return out.reshape(*x.shape[:-1], self.num_embeddings)

    def _logits_costs(self, rows: int, grad: bool):
        dense, factorized = self.plan.logits_costs(rows)
        if self.cache_weight and not grad:
            dense = 2 * rows * self.num_embeddings * self.embedding_dim  # the cached table: only the matmul
        return dense, factorized

    def _logits_timing(self, x2d: torch.Tensor, needs_grad: bool):
        x2d = x2d.detach().requires_grad_(x2d.requires_grad and needs_grad)
        params = [p.detach().requires_grad_(p.requires_grad and needs_grad) for p in self.core_parameters()]
        cached = self._dense_weight() if self.cache_weight and not needs_grad else None

        def forward(strategy):
            if strategy == "dense":
                weight = self._mask_padding(self.plan.table(params), self.padding_idx) if cached is None else cached
                return F.linear(x2d, weight)
            return self._mask_padding(self.plan.logits(x2d, params), self.padding_idx, dim=1)
        return timing_run(forward, [t for t in (x2d, *params) if t.requires_grad], needs_grad)

    # -- construction from a dense embedding ---------------------------------------------------------------
    @classmethod
    def from_dense(cls, module: nn.Embedding, *, rank: Rank, format: Optional[str] = None,
                   in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None, strategy: str = "auto",
                   **options: Any) -> "TensorizedEmbedding":
        """Build from an ``nn.Embedding`` by decomposing its table (``options`` go to the decomposition); its
        padding_idx, max_norm, norm_type and scale_grad_by_freq are kept, and a frozen table gives frozen cores.

            >>> import torch, tnlayers
            >>> dense = torch.nn.Embedding(64, 8, padding_idx=0)
            >>> emb = tnlayers.TTEmbedding.from_dense(dense, rank=64)  # full TT rank: exact
            >>> emb.decomposition_error < 1e-5, emb.padding_idx
            (True, 0)
        """
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Embedding, got {type(module).__name__}")
        layer = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm, module.norm_type,
                    module.scale_grad_by_freq, module.sparse, module.weight.device, module.weight.dtype, rank=rank,
                    format=format, in_shape=in_shape, out_shape=out_shape, strategy=strategy)
        layer.init_from_weight(module.weight, **options)
        layer.requires_grad_(module.weight.requires_grad)
        return layer.train(module.training)

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name in ("padding_idx", "max_norm")
                        if getattr(self, name) is not None)
        if self.max_norm is not None:
            extra += f", norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            extra += ", scale_grad_by_freq=True"
        return (f"{self.num_embeddings}, {self.embedding_dim}{extra}, format={self.format!r}, ranks={self.ranks}, "
                f"in_shape={self.in_shape}, out_shape={self.out_shape}, strategy={self.strategy!r}")


class TTEmbedding(TensorizedEmbedding):
    """Tensor-Train embedding (TT-Rec): core k is (r_{k-1}, i_k j_k, r_k), first and last without their
    boundary bond.

        >>> import torch, tnlayers
        >>> emb = tnlayers.TTEmbedding(1_000_000, 256, rank=16)  # 1 GB as a float32 table
        >>> [tuple(c.shape) for c in emb.cores], emb.network.num_params
        ([(800, 16), (16, 800, 16), (16, 400)], 224000)
        >>> emb(torch.tensor([0, 999_999])).shape
        torch.Size([2, 256])
    """
    FORMAT = "tt"


class TREmbedding(TensorizedEmbedding):
    """Tensor-Ring embedding: cores (r_{k-1}, i_k j_k, r_k), closed by a trace.

        >>> import tnlayers
        >>> [tuple(c.shape) for c in tnlayers.TREmbedding(1000, 64, rank=4).cores]
        [(4, 40, 4), (4, 40, 4), (4, 40, 4)]
    """
    FORMAT = "tr"


class CPEmbedding(TensorizedEmbedding):
    """CP embedding over the separate modes: factors (i_k, R) for the index modes, then (j_k, R) for the dim
    modes; a lookup multiplies the gathered index rows and applies the dim factors' Khatri-Rao product.

        >>> import tnlayers
        >>> [tuple(c.shape) for c in tnlayers.CPEmbedding(1000, 64, rank=16).cores]
        [(10, 16), (10, 16), (10, 16), (4, 16), (4, 16), (4, 16)]
    """
    FORMAT = "cp"


class TuckerEmbedding(TensorizedEmbedding):
    """Tucker embedding: a core (R_1, ..., R_d) and one factor (i_k j_k, R_k) per merged mode.

        >>> import tnlayers
        >>> [tuple(c.shape) for c in tnlayers.TuckerEmbedding(1000, 64, rank=8).cores]
        [(8, 8, 8), (40, 8), (40, 8), (40, 8)]
    """
    FORMAT = "tucker"
