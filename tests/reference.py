"""Independent float64 references for the two rules, written from docs/methods.md with the naive
algebra (explicit centring, explicit inverse / pseudo-inverse, full SVD). A different code path
from the package on purpose: no streaming, no Cholesky, no Sherman-Morrison, no Gram eigh."""

import math

import torch


def ace_reference(W0, experts, epsilon=1e-5, tau=0.3, k_frac=0.3, scale=1.0, force_pinv=False,
                  refinement="add", null_rtol=1e-10):
    """ACE in float64 from docs/methods.md. Step 6 by a full SVD: ``refinement="add"`` (Eq. 19: P +
    sigma_iso U_k V_k^T of F = P + Res), ``"rescale"`` (P's own top-k singular values replaced by
    their mean), ``"none"``. Singular pairs with sigma <= null_rtol * sigma_max are null: they add
    nothing to sigma_iso's sum (it still divides by k) and get no term."""
    W0 = W0.double()
    D = [W.double() - W0 for W in experts]
    T = len(D)
    d_out, d_in = W0.shape
    tr = torch.tensor([float((d * d).sum()) for d in D], dtype=torch.float64)
    logs = torch.log(tr + 1e-12)
    if T == 1:
        het = False
    else:
        var = float(((logs - logs.mean()) ** 2).sum() / (T - 1))
        het = var / (float(logs.mean()) ** 2 + 1e-12) > tau
    ones_rows = torch.ones(d_out, 1, dtype=torch.float64)
    C = [d - ones_rows @ (ones_rows.T @ d) / d_out for d in D]
    S = [c.T @ c for c in C]
    s = [float(torch.trace(x)) + 1e-12 for x in S]
    St = [x / si for x, si in zip(S, s)] if het else S
    eps = [epsilon / si for si in s] if het else [epsilon] * T
    I = torch.eye(d_in, dtype=torch.float64)
    R = [x + e * I for x, e in zip(St, eps)]
    ones_in = torch.ones(d_in, 1, dtype=torch.float64)
    c = (ones_in.T @ sum(St) / d_in)[0]
    if het:
        c = c / (float(tr.mean()) + 1e-12)
    A = sum(R) + ones_in @ c[None, :]
    N = sum(ci @ ri for ci, ri in zip(C, R))
    P = N @ (torch.linalg.pinv(A, rtol=1e-10) if force_pinv else torch.linalg.inv(A))
    k = math.floor(k_frac * min(d_out, d_in))
    if het and k > 0 and refinement != "none":
        if refinement == "add":
            Sbar = sum(R) / T
            Res = sum(d @ (x - Sbar) for d, x in zip(D, St))
            X = P + Res
        else:
            X = P
        U, sig, Vh = torch.linalg.svd(X, full_matrices=False)
        keep = (sig[:k] > null_rtol * sig[0]).double()
        sigma_iso = (sig[:k] * keep).sum() / k
        if refinement == "add":
            P = P + U[:, :k] @ torch.diag(sigma_iso * keep) @ Vh[:k, :]
        else:
            P = P + U[:, :k] @ torch.diag((sigma_iso - sig[:k]) * keep) @ Vh[:k, :]
    return W0 + scale * P, het


def actmat_reference(W0, experts, scale=1.0, keep_base=True):
    W0 = W0.double()
    Ws = [W.double() for W in experts]
    D = [W - W0 for W in Ws]
    Cs = [d.T @ d for d in D]
    A_pinv = torch.linalg.pinv(sum(Cs), rtol=1e-10)
    if keep_base:
        return W0 + scale * sum(d @ c for d, c in zip(D, Cs)) @ A_pinv
    # Paper-literal minimum-norm solution (W_t C_t summed), scale on the task-vector part.
    A = sum(Cs)
    return W0 @ A @ A_pinv + scale * sum(d @ c for d, c in zip(D, Cs)) @ A_pinv


def truncated_pinv(A, rtol: float):
    """Pseudo-inverse of a symmetric PSD matrix keeping eigenvalues > rtol * largest, and the
    projector on the kept eigenvectors (numpy float64 eigh)."""
    import numpy as np

    A = np.asarray(A, dtype=np.float64)
    lam, Q = np.linalg.eigh(A)
    keep = lam > rtol * lam.max()
    Q = Q[:, keep]
    return (Q / lam[keep]) @ Q.T, Q @ Q.T


def wudi_reference(W0, experts, scale=1.0, rtol=1e-10, solve=None):
    """WUDI's minimiser nearest the start, docs/methods.md: W0 + scale (N_w A_w^+ + S (I - A_w A_w^+)),
    w_t = 1/||D_t||^2, A_w = sum_t w_t D_t^T D_t, N_w = sum_t w_t D_t D_t^T D_t, S = sum_t D_t;
    ``solve="truncated"``: cutoff d_in * eps_float32 (numpy float64)."""
    import numpy as np

    if solve == "truncated":
        rtol = W0.shape[1] * float(np.finfo(np.float32).eps)
    W0n = W0.double().numpy()
    D = [e.double().numpy() - W0n for e in experts]
    w = [1.0 / np.sum(d * d) for d in D]
    A = sum(wt * d.T @ d for wt, d in zip(w, D))
    N = sum(wt * d @ (d.T @ d) for wt, d in zip(w, D))
    A_pinv, P = truncated_pinv(A, rtol)
    S = sum(D)
    return torch.from_numpy(W0n + scale * (N @ A_pinv + S - S @ P))


def actmat_truncated_reference(W0, experts, scale=1.0, keep_base=True):
    """ACTMat with the ACTMat code's cutoff (the default solve): W0 + scale (sum_t D_t C_t) A^+, A^+
    dropping eigenvalues <= d_in * eps_float32 * lambda_max (numpy float64); ``keep_base=False``:
    W0 A A^+ in place of W0."""
    import numpy as np

    W0n = W0.double().numpy()
    D = [e.double().numpy() - W0n for e in experts]
    A_pinv, P = truncated_pinv(sum(d.T @ d for d in D), W0.shape[1] * float(np.finfo(np.float32).eps))
    return torch.from_numpy((W0n if keep_base else W0n @ P) + scale * sum(d @ (d.T @ d) for d in D) @ A_pinv)


def wudi_objective(tau, D):
    """sum_t ||(tau - D_t) D_t^T||_F^2 / ||D_t||_F^2 (the official loss), D stacked T x m x n."""
    inner = torch.matmul(tau.unsqueeze(0) - D, D.transpose(1, 2))
    return torch.sum(inner.square() / D.reshape(D.shape[0], -1).square().sum(dim=1)[:, None, None])


def wudi_adam_reference(W0, experts, lr, iterations, dtype):
    """The official loop: Adam on the objective through autograd, from the task vectors' sum."""
    D = torch.stack([e.to(dtype) - W0.to(dtype) for e in experts])
    tau = torch.nn.Parameter(D.sum(dim=0))
    opt = torch.optim.Adam([tau], lr=lr, weight_decay=0)
    for _ in range(iterations):
        loss = wudi_objective(tau, D)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tau.detach()


def rel_err(out, ref, W0):
    """Relative error on the merged task vector."""
    return float((out.double() - ref).norm() / (ref - W0.double()).norm())


def make_experts(shape, T, norms, seed=0, base_scale=1.0, rank=None):
    """A base and T experts whose task vectors have Frobenius norms ``norms`` (low rank if asked)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(*shape, generator=g) * base_scale
    experts = []
    for t in range(T):
        if rank is None:
            d = torch.randn(*shape, generator=g)
        else:
            d = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
        d = d / d.norm() * norms[t % len(norms)]
        experts.append(W0 + d)
    return W0, experts


def storage_rounding(ref, dtype=torch.bfloat16):
    """||fl(W) - W||: how far storing the exact result W in ``dtype`` moves it (measured)."""
    return float((ref.to(dtype).double() - ref).norm())


def contract_ratio(out, ref, dtype=torch.bfloat16):
    """The computation's error in units of the exact result's storage rounding in ``dtype``: the
    precision contract allows 0.3 (docs/execution.md, "Precision")."""
    return float((out.double() - ref).norm()) / storage_rounding(ref, dtype)


def stored_ratio(out, ref, dtype=torch.bfloat16):
    """||fl(out) - W|| / ||fl(W) - W||: how much worse the stored result is than the best storable
    one (the contract: at most 1.05)."""
    return float((out.to(dtype).double() - ref).norm()) / storage_rounding(ref, dtype)
