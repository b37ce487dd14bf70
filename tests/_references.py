"""Independent references for the tests: plain loops of torch.tensordot / torch.einsum, one per format,
written without tnlayers' network/equation machinery."""
import torch


def tt_full(cores):
    """Tensor-Train with 2-D end cores: sequential tensordot over the bonds."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([out.dim() - 1], [0]))
    return out


def tr_full(cores):
    """Tensor-Ring: chain the (r, n, r) cores, then trace the first and last bond."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([out.dim() - 1], [0]))
    return torch.diagonal(out, dim1=0, dim2=out.dim() - 1).sum(-1)


def cp_full(factors):
    """CP: sum over the rank of outer products of factor columns."""
    out = 0
    for r in range(factors[0].shape[1]):
        term = factors[0][:, r]
        for f in factors[1:]:
            term = torch.tensordot(term, f[:, r], dims=0)
        out = out + term
    return out


def tucker_full(core, factors, factored_modes):
    """Tucker: multiply the core by each factor along its mode (n-mode products)."""
    out = core
    for factor, mode in zip(factors, factored_modes):
        out = torch.movedim(torch.tensordot(factor, out, dims=([1], [mode])), 0, mode)
    return out


def full_tensor(fmt, cores):
    """Full tensor of a FactorizedTensor with int rank (Tucker: every mode factored)."""
    if fmt == "tt":
        return tt_full(cores)
    if fmt == "tr":
        return tr_full(cores)
    if fmt == "cp":
        return cp_full(cores)
    return tucker_full(cores[0], cores[1:], range(len(cores) - 1))


def conv_weight(fmt, cores, c_out, c_in, kh, kw):
    """Dense (C_out, C_in, kh, kw) weight of the default layer layouts (docs/design.md, 'Layer layouts')."""
    if fmt == "tt":  # (C_in, r1), (r1, kh*kw, r2), (r2, C_out)
        return torch.einsum("ia,akb,bo->oik", *cores).reshape(c_out, c_in, kh, kw)
    if fmt == "cp":  # (C_in, R), (kh, R), (kw, R), (C_out, R)
        return torch.einsum("ir,hr,wr,or->oihw", *cores)
    if fmt == "tucker":  # core (R_in, kh, kw, R_out), U_in (C_in, R_in), U_out (C_out, R_out)
        return torch.einsum("ahwb,ia,ob->oihw", *cores)
    if fmt == "tr":  # (in modes..., kh*kw, out modes...), one (r, n, r) core each
        return tr_full(cores).reshape(c_in, kh, kw, c_out).permute(3, 0, 1, 2)
    raise ValueError(fmt)


def linear_weight(fmt, cores, out_features, in_features):
    """Dense (out, in) weight of a linear layer over (in modes..., out modes...)."""
    full = full_tensor(fmt, cores)
    return full.reshape(in_features, out_features).t()


def closed_form_params(fmt, modes, rank):
    """Parameter count by the textbook formula of each format (uniform int rank)."""
    d = len(modes)
    if fmt == "tt":
        bonds = [1] + [rank] * (d - 1) + [1]
        return sum(bonds[k] * modes[k] * bonds[k + 1] for k in range(d))
    if fmt == "tr":
        return rank * rank * sum(modes)
    if fmt == "cp":
        return rank * sum(modes)
    return rank ** d + rank * sum(modes)
