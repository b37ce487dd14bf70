"""Error-versus-rank curves of one layer's weight, per format: for each candidate rank (the int a layer takes:
uniform bonds), the parameter count of the cores and an estimate of the relative squared error
``||W - W_r||^2 / ||W||^2`` of the format's decomposition at that rank.

- TT, TR: the singular values of the weight's sequential unfoldings (rows = the first k modes); t_k is the
  fraction of the energy past the k-th bond. TR-SVD's first cut keeps r_0 r_1 vectors of mode 1 and moves
  r_0 of them to the columns, so its later cuts see other matrices: their spectra are computed once per
  (r_0, r_1) split.
  TT-SVD's error lies between max_k t_k (no cut can do better than the best one of its unfolding) and
  sum_k t_k (Oseledets 2011, SIAM J. Sci. Comput. 33(5), Thm 2.2); the estimate 1 - prod_k (1 - t_k), which
  lies in between, counts each cut as removing its fraction of what the earlier cuts kept. One
  eigendecomposition per unfolding gives it for every rank at once.
- Tucker-2: exact for HOSVD at every rank from one full change of basis: with all eigenvectors of both
  channel modes, G = W x_in U_in^T x_out U_out^T, and the rank-(a, b) HOSVD keeps the energy of G[:a, ..., :b]
  (orthogonal projections), a 2-D cumulative sum. HOOI only lowers it: again an upper bound.
- CP: no spectrum gives CP errors; CP-ALS runs at a few ranks (a short iteration budget) and the curve is
  interpolated between them, log-linear in the error. Measured, so slower: the cost of a few decompositions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..decompose import relative_error
from ..decompositions.subspace import mode_gram
from ..decompositions.threads import mostly_one_thread
from ..formats import get_format
from ..formats.network import Network

__all__ = ["LayerCurve", "candidate_ranks", "error_curve", "CP_PROBES", "CP_PROBE_ITERATIONS"]

CP_PROBES = 6  # CP-ALS runs per layer for its curve (geometric ranks up to the largest candidate)
CP_PROBE_ITERATIONS = 25  # each with at most this many sweeps (tol 1e-4): the curve's shape, not the final fit


@dataclass
class LayerCurve:
    """Candidates of one layer: ``ranks[i]`` (what the layer's ``rank=`` takes), ``params[i]`` (its cores' parameters) and ``error[i]``
    (estimated relative squared error), params increasing, error non-increasing."""
    ranks: list
    params: np.ndarray
    error: np.ndarray
    dense_params: int  # the weight's entries (the bias is not factorized)


def candidate_ranks(network_of: Callable[[object], Network], limit: int,
                    value_of: Callable[[int], object] = lambda t: t + 1, period: int = 1) -> list:
    """The distinct rank values ``value_of(0), value_of(1), ...`` whose cores have at most ``limit`` parameters
    (at least the first), until a whole ``period`` of steps brings no new value (every bond at the most its
    unfolding can use)."""
    ranks, t, unchanged = [value_of(0)], 1, 0
    while unchanged < period:
        value = value_of(t)
        t += 1
        if value == ranks[-1]:
            unchanged += 1
            continue
        if network_of(value).num_params > limit:
            return ranks
        ranks.append(value)
        unchanged = 0
    return ranks


def _sequential_spectra(tensor: torch.Tensor) -> List[np.ndarray]:
    """Squared singular values (descending) of each unfolding rows = modes[:k], k = 1..d-1, from the Gram
    matrix of its smaller side."""
    out = []
    for k in range(1, tensor.ndim):
        rows, cols = math.prod(tensor.shape[:k]), math.prod(tensor.shape[k:])
        out.append(_gram_spectrum(tensor.reshape(rows, cols)))
    return out


def _tail(squares: np.ndarray, rank: int) -> float:
    return float(squares[rank:].sum())


def _gram_spectrum(matrix: torch.Tensor) -> np.ndarray:
    """Squared singular values (descending) of ``matrix``, from the Gram matrix of its smaller side."""
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).numpy()


def _ring_spectra(tensor: torch.Tensor, r0: int, r1: int) -> List[np.ndarray]:
    """The matrices TR-SVD cuts after its first: the leading r0 r1 vectors of mode 1 split into r0 (moved to the
    columns, the ring's closing bond) and r1 (kept on the rows); then rows (r1, n_2..n_k), k = 2..d-1."""
    n = tensor.shape[0]
    _, vectors = torch.linalg.eigh(mode_gram(tensor, 0))
    basis = vectors.flip(1)[:, :r0 * r1]
    carry = (basis.T @ tensor.reshape(n, -1)).reshape(r0, r1, *tensor.shape[1:])
    carry = carry.movedim(0, -1)  # (r1, n_2, ..., n_d, r0)
    return [_gram_spectrum(carry.reshape(r1 * math.prod(tensor.shape[1:k]), -1)) for k in range(2, tensor.ndim)]


def _chain_errors(tensor: torch.Tensor, nets: Sequence[Network], fmt_name: str) -> np.ndarray:
    squares = _sequential_spectra(tensor)
    total = max(float(squares[0].sum()), 1e-300)
    ring: dict = {}  # (r0, r1) -> the spectra of TR-SVD's later cuts
    errors = []
    for net in nets:
        if fmt_name == "tr":
            kept = get_format("tr")._svd_ranks(net)  # noqa: SLF001 (the split TR-SVD itself uses)
            if tuple(kept[:2]) not in ring:
                ring[tuple(kept[:2])] = _ring_spectra(tensor, kept[0], kept[1])
            cuts = zip([squares[0], *ring[tuple(kept[:2])]], [kept[0] * kept[1], *kept[2:]])
        else:
            cuts = zip(squares, [net.sizes[f"r{k}"] for k in range(1, len(net.modes))])
        errors.append(1.0 - math.prod(1.0 - _tail(s, r) / total for s, r in cuts))
    return np.asarray(errors)


def tucker_energy(tensor: torch.Tensor, modes: Sequence[int]) -> np.ndarray:
    """``E[a, b]``: the energy HOSVD keeps with the leading a + 1 vectors of mode ``modes[0]`` and b + 1 of
    ``modes[1]`` (cumulative over both); ``||W||^2 - E[a - 1, b - 1]`` is the rank-(a, b) error."""
    first, second = modes
    bases = []
    for mode in modes:
        _, vectors = torch.linalg.eigh(mode_gram(tensor, mode))
        bases.append(vectors.flip(1))
    core = torch.tensordot(tensor, bases[0], dims=([first], [0]))  # mode `first` moved last
    core = torch.tensordot(core, bases[1], dims=([second - 1], [0]))  # then `second`
    energy = (core ** 2).reshape(-1, core.shape[-2], core.shape[-1]).sum(0)
    return energy.cumsum(0).cumsum(1).numpy()


def _cp_errors(tensor: torch.Tensor, nets: Sequence[Network], options: dict) -> np.ndarray:
    """CP-ALS at CP_PROBES geometric ranks, log-linear interpolation in between (rank 0: error 1)."""
    fmt = get_format("cp")
    ranks = [net.sizes["r"] for net in nets]  # one bond: the candidates' values are these ints
    top = ranks[-1]
    probes = sorted({max(1, round(top ** (i / (CP_PROBES - 1)))) for i in range(CP_PROBES)})
    measured = [(0, 1.0)]
    iterations = min(int(options.get("n_iter_max", CP_PROBE_ITERATIONS)), CP_PROBE_ITERATIONS)
    for rank in probes:
        net = nets[ranks.index(rank)]
        cores = fmt.decompose(tensor, net, n_iter_max=iterations, tol=1e-4,
                              random_state=options.get("random_state", 0)).cores
        measured.append((rank, relative_error(torch.einsum(net.equation(), *cores), tensor) ** 2))
    xs = np.array([m[0] for m in measured], dtype=float)
    logs = np.log(np.maximum([m[1] for m in measured], 1e-300))
    return np.exp(np.interp(ranks, xs, logs))


@torch.no_grad()
@mostly_one_thread
def error_curve(tensor: torch.Tensor, fmt_name: str, network_of: Callable[[object], Network], limit: int,
                options: Optional[dict] = None, value_of: Callable[[int], object] = lambda t: t + 1,
                period: int = 1) -> LayerCurve:
    """The candidates of a weight ``tensor`` (in the network's mode order) for format ``fmt_name``:
    rank values ``value_of(0), value_of(1), ...`` (default: the ints 1, 2, ...) up to ``limit`` core
    parameters (``candidate_ranks``), ``network_of(value)`` their networks.

        >>> from tnlayers.formats import get_format
        >>> W = torch.randn(8, 9, 8, dtype=torch.float64)
        >>> curve = error_curve(W, "tt", lambda r: get_format("tt").network((8, 9, 8), r), 8 * 9 * 8)
        >>> curve.ranks[:3], bool(curve.error[0] > curve.error[-1])
        ([1, 2, 3], True)
    """
    tensor = tensor.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format)
    ranks = candidate_ranks(network_of, limit, value_of, period)
    nets = [network_of(r) for r in ranks]
    if fmt_name in ("tt", "tr"):  # every branch gives relative squared errors
        errors = _chain_errors(tensor, nets, fmt_name)
    elif fmt_name == "tucker":
        factored = [i for i in range(tensor.ndim) if f"r{i}" in nets[0].sizes]
        if len(factored) != 2:
            raise ValueError(f"rank selection for Tucker handles two factored modes (Tucker-2), got {len(factored)}")
        energy = tucker_energy(tensor, factored) / max(float((tensor ** 2).sum()), 1e-300)
        errors = np.array([1.0 - energy[min(net.sizes[f"r{factored[0]}"], energy.shape[0]) - 1,
                                         min(net.sizes[f"r{factored[1]}"], energy.shape[1]) - 1] for net in nets])
    elif fmt_name == "cp":
        errors = _cp_errors(tensor, nets, options or {})
    else:
        raise ValueError(f"no error curve for format {fmt_name!r}")
    errors = np.minimum.accumulate(np.clip(errors, 0.0, 1.0))  # a larger rank never fits worse
    return LayerCurve(ranks, np.array([net.num_params for net in nets], dtype=np.int64), errors, tensor.numel())
