"""Naive formulations of the rules, as a first implementation would write them: everything
materialised (all T task vectors, centred copies, proxies, R_t with an explicit identity), an
explicit inverse (ACE) or an SVD-based pseudo-inverse (ACTMat), a full SVD for ACE's refinement.
For TSV-M, Iso-C and Iso-CTS, the authors' code path (full SVDs in float32). Used only as the
benchmarks' baseline."""

import math

import torch


def ace_naive(W0, experts, epsilon=1e-5, tau=0.3, k_frac=0.3, scale=1.0, dtype=torch.float32):
    W0 = W0.to(dtype)
    D = [W.to(dtype) - W0 for W in experts]
    T = len(D)
    d_out, d_in = W0.shape
    tr = torch.stack([(d * d).sum() for d in D]).double()
    logs = torch.log(tr + 1e-12)
    het = T > 1 and float(logs.var() / (logs.mean() ** 2 + 1e-12)) > tau
    C = [d - d.mean(dim=0, keepdim=True) for d in D]
    S = [c.T @ c for c in C]
    s = [float(torch.trace(x)) + 1e-12 for x in S]
    St = [x / si for x, si in zip(S, s)] if het else S
    eps = [epsilon / si for si in s] if het else [epsilon] * T
    I = torch.eye(d_in, dtype=dtype)
    R = [x + e * I for x, e in zip(St, eps)]
    c = sum(St).mean(dim=0)
    if het:
        c = c / (float(tr.mean()) + 1e-12)
    A = sum(R) + c[None, :]
    N = sum(ci @ ri for ci, ri in zip(C, R))
    P = N @ torch.linalg.inv(A)
    if het:
        Sbar = sum(R) / T
        F = P + sum(d @ (x - Sbar) for d, x in zip(D, St))
        U, sig, Vh = torch.linalg.svd(F, full_matrices=False)
        k = math.floor(k_frac * min(d_out, d_in))
        if k > 0:
            P = P + sig[:k].mean() * U[:, :k] @ Vh[:k, :]
    return W0 + scale * P


def actmat_naive(W0, experts, scale=1.0, dtype=torch.float32):
    W0 = W0.to(dtype)
    D = [W.to(dtype) - W0 for W in experts]
    Cs = [d.T @ d for d in D]
    A_pinv = torch.linalg.pinv(sum(Cs))
    return W0 + scale * sum(d @ c for d, c in zip(D, Cs)) @ A_pinv


def wudi_naive(W0, experts, scale=1.0, dtype=torch.float32):
    """WUDI's closed form in float32 as ACTMat's code would run it: w_t = 1/||D_t||^2, float32 pinv."""
    W0 = W0.to(dtype)
    D = [W.to(dtype) - W0 for W in experts]
    w = [1.0 / float(d.square().sum()) for d in D]
    Cs = [wt * (d.T @ d) for wt, d in zip(w, D)]
    A_pinv = torch.linalg.pinv(sum(Cs))
    return W0 + scale * sum(d @ c for d, c in zip(D, Cs)) @ A_pinv


# The SVD-based peers as their authors' code computes them (full torch.linalg.svd of every task
# matrix / sum / stacked basis, float32 as their merges run); zero singular values kept as LAPACK
# returns them.
def _polar(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def tsv_m_naive(W0, experts, alpha=1.0, dtype=torch.float32):
    W0 = W0.to(dtype)
    D = [W.to(dtype) - W0 for W in experts]
    k = int(min(W0.shape) * (1 / len(D)))
    svds = [torch.linalg.svd(d, full_matrices=False) for d in D]
    U = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    S = torch.cat([s[:k] for _, s, _ in svds])
    Vh = torch.cat([vh[:k] for _, _, vh in svds], dim=0)
    return W0 + alpha * _polar(U) @ torch.diag(S) @ _polar(Vh)


def iso_c_naive(W0, experts, alpha=1.0, dtype=torch.float32):
    W0 = W0.to(dtype)
    U, S, Vh = torch.linalg.svd(sum(W.to(dtype) - W0 for W in experts), full_matrices=False)
    return W0 + alpha * S.mean() * U @ Vh


def iso_cts_naive(W0, experts, alpha=1.0, common_space_fraction=0.8, dtype=torch.float32):
    W0 = W0.to(dtype)
    D = [W.to(dtype) - W0 for W in experts]
    T, r = len(D), min(W0.shape)
    k = r - round((r - int(r * common_space_fraction)) / T) * T
    s = (r - k) // T
    U, S, Vh = torch.linalg.svd(sum(D), full_matrices=False)
    Us, Ss, Vhs = [U[:, :k]], [S[:k]], [Vh[:k]]
    for d in D:
        u, sv, vh = torch.linalg.svd(d - U[:, :k] @ (U[:, :k].T @ d), full_matrices=False)
        Us.append(u[:, :s]), Ss.append(sv[:s]), Vhs.append(vh[:s])
    sigma = torch.cat(Ss).mean()
    return W0 + alpha * sigma * _polar(torch.cat(Us, dim=1)) @ _polar(torch.cat(Vhs, dim=0))
