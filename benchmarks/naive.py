"""Naive formulations of the two rules, as a first implementation would write them: everything
materialised (all T task vectors, centred copies, proxies, R_t with an explicit identity), an
explicit inverse (ACE) or an SVD-based pseudo-inverse (ACTMat), a full SVD for ACE's refinement.
Used only as the benchmarks' baseline."""

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
