"""Independent float64 references for TSV-M, Iso-C and Iso-CTS, written from the papers and the
authors' code with the naive algebra in NumPy: full SVDs (``full_matrices=True``) of every task
matrix and sum, explicit Gram-Schmidt orthogonalisation of the stacked singular vectors, no Gram
matrices, no eigendecompositions, no shared code with the package.

Convention shared with the package (and documented there): singular directions whose singular
value is at or below 1e-10 of the reference scale have no defined vectors and are left out.

Orthogonalisation. The polar factor of a stacked basis X (p x q, full column rank) is
``Q (R^T R)^{-1/2}``-free here: with X = Q R (Gram-Schmidt, Q orthonormal, R upper triangular),
the SVD of the small R = A S B^T gives polar(X) = (Q A) B^T. For wide X the same on X^T.
"""

import numpy as np

RTOL = 1e-10


def _np(t):
    return t.detach().double().cpu().numpy()


def gram_schmidt(X):
    """Modified Gram-Schmidt with one re-orthogonalisation pass: X = Q R, Q p x q orthonormal."""
    p, q = X.shape
    Q = np.zeros((p, q))
    R = np.zeros((q, q))
    for j in range(q):
        v = X[:, j].copy()
        for _ in range(2):
            for i in range(j):
                c = Q[:, i] @ v
                R[i, j] += c
                v -= c * Q[:, i]
        R[j, j] = np.linalg.norm(v)
        Q[:, j] = v / R[j, j]
    return Q, R


def polar(X):
    """Orthogonal polar factor of X (full rank), through Gram-Schmidt and an SVD of R."""
    if X.shape[0] < X.shape[1]:
        return polar(X.T).T
    Q, R = gram_schmidt(X)
    A, _, Bt = np.linalg.svd(R)
    return (Q @ A) @ Bt


def svd_top(X, k, zero_below=None):
    """Top-k triplets from the full SVD, without directions at or below the cutoff."""
    U, S, Vt = np.linalg.svd(X, full_matrices=True)
    cut = RTOL * S[0] if zero_below is None else zero_below
    keep = [i for i in range(min(k, len(S))) if S[i] > cut]
    return U[:, keep], S[keep], Vt[keep].T


def tsv_m_reference(W0, experts, alpha=1.0, sv_reduction=None):
    W0 = _np(W0)
    D = [_np(W) - W0 for W in experts]
    T = len(D)
    r = min(W0.shape)
    k = int(r * (1.0 / T if sv_reduction is None else sv_reduction))
    parts = [svd_top(d, k) for d in D]
    U = np.concatenate([p[0] for p in parts], axis=1)
    S = np.concatenate([p[1] for p in parts])
    V = np.concatenate([p[2] for p in parts], axis=1)
    return W0 + alpha * polar(U) @ np.diag(S) @ polar(V).T


def iso_c_reference(W0, experts, alpha=1.0):
    W0 = _np(W0)
    delta = sum(_np(W) - W0 for W in experts)
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)
    keep = S > RTOL * S[0]
    sigma_bar = S[keep].sum() / min(W0.shape)
    return W0 + alpha * sigma_bar * U[:, keep] @ Vt[keep]


def iso_cts_reference(W0, experts, alpha=1.0, common_space_fraction=0.8):
    W0 = _np(W0)
    D = [_np(W) - W0 for W in experts]
    T = len(D)
    r = min(W0.shape)
    k = int(r * common_space_fraction)
    specific = round((r - k) / T) * T
    if specific > r:
        specific -= T
    k = r - specific
    s = specific // T
    Uc, Sc, Vc = svd_top(sum(D), k)
    Us, Ss, Vs = [Uc], [Sc], [Vc]
    for d in D:
        if s == 0:
            break
        projected = d - Uc @ (Uc.T @ d)
        u, sv, v = svd_top(projected, s, zero_below=RTOL * np.linalg.norm(d))
        Us.append(u), Ss.append(sv), Vs.append(v)
    S = np.concatenate(Ss)
    sigma_bar = S.sum() / r
    return W0 + alpha * sigma_bar * polar(np.concatenate(Us, axis=1)) @ polar(np.concatenate(Vs, axis=1)).T


REFERENCES = {"tsv_m": tsv_m_reference, "iso_c": iso_c_reference, "iso_cts": iso_cts_reference}


def rel_err(out, ref, W0):
    """Relative error on the merged task vector (float64)."""
    out, W0 = _np(out), _np(W0)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref - W0))
