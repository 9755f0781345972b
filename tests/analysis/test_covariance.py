"""The covariance analysis (mergekit_ace.analysis.covariance) where the answers are known analytically."""

import math

import pytest
import torch

from mergekit_ace.analysis import covariance as C


def _psd(n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rank or 3 * n, n, generator=g, dtype=torch.float64)
    return X.T @ X / X.shape[0]


def _experts(m, n, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W0, [W0 + 0.1 * (t + 1) * torch.randn(m, n, generator=g, dtype=torch.float64) for t in range(T)]


def test_frobenius_cosine_known_values():
    A = _psd(6, 1)
    assert C.frobenius_cosine(A, A) == pytest.approx(1.0, abs=1e-12)
    assert C.frobenius_cosine(A, 3.5 * A) == pytest.approx(1.0, abs=1e-12)
    e1, e2 = torch.zeros(4, 4), torch.zeros(4, 4)
    e1[0, 0], e2[1, 1] = 1.0, 2.0
    assert C.frobenius_cosine(e1, e2) == 0.0
    # identity against diag(1, 0, 0, 0): 1 / (sqrt(4) * 1) = 0.5
    assert C.identity_cosine(e1) == pytest.approx(0.5)
    assert C.frobenius_cosine(torch.eye(4), e1) == pytest.approx(0.5)
    assert math.isnan(C.frobenius_cosine(torch.zeros(3, 3), A[:3, :3]))


def test_proxies():
    g = torch.Generator().manual_seed(2)
    D = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(C.proxy_actmat(D), D.T @ D)
    Cc = D - D.mean(0, keepdim=True)
    assert torch.allclose(C.proxy_ace(D), Cc.T @ Cc)
    # one gradient step on one input x: D = -eta e x^T, so D^T D = eta^2 |e|^2 x x^T, proportional to x x^T
    x = torch.randn(3, 1, generator=g, dtype=torch.float64)
    e = torch.randn(5, 1, generator=g, dtype=torch.float64)
    assert C.frobenius_cosine(C.proxy_actmat(-0.1 * e @ x.T), x @ x.T) == pytest.approx(1.0, abs=1e-12)


def test_regmean_solution_is_the_minimiser():
    W0, experts = _experts(7, 5, 3)
    grams = [_psd(5, 10 + t) for t in range(3)]
    W_star = C.regmean_solution(W0, experts, grams)
    # first-order condition: sum_t (W* - W_t) G_t = 0
    grad = sum((W_star - Wt) @ G for Wt, G in zip(experts, grams))
    assert float(grad.norm()) < 1e-6 * float(sum((Wt @ G).norm() for Wt, G in zip(experts, grams)))
    # the closed form (sum_t W_t G_t)(sum_t G_t)^-1
    closed = sum(Wt @ G for Wt, G in zip(experts, grams)) @ torch.linalg.inv(sum(grams))
    assert torch.allclose(W_star, closed, atol=1e-6)
    L_star = C.regmean_objective(W_star, experts, grams)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        W = W_star + 0.01 * torch.randn(7, 5, generator=g, dtype=torch.float64)
        # L(W) = L(W*) + sum_t tr((W - W*) G_t (W - W*)^T) exactly
        excess = sum(float((((W - W_star) @ G) * (W - W_star)).sum()) for G in grams)
        assert C.regmean_objective(W, experts, grams) == pytest.approx(L_star + excess, rel=1e-9)
        assert C.regmean_objective(W, experts, grams) > L_star


def test_regmean_with_identity_covariances_is_the_average():
    W0, experts = _experts(4, 6, 3)
    grams = [torch.eye(6, dtype=torch.float64)] * 3
    average = sum(experts) / 3
    assert torch.allclose(C.regmean_solution(W0, experts, grams), average, atol=1e-7)
    # objective of the average = sum_t ||average - W_t||_F^2
    expected = sum(float((average - Wt).square().sum()) for Wt in experts)
    assert C.regmean_objective(average, experts, grams) == pytest.approx(expected)
    # one expert: the solution is the expert and its objective is zero
    assert torch.allclose(C.regmean_solution(W0, experts[:1], grams[:1]), experts[0], atol=1e-7)


def test_regmean_keeps_the_base_outside_the_covariances_range():
    W0, experts = _experts(3, 4, 2)
    grams = [torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64))] * 2
    W_star = C.regmean_solution(W0, experts, grams)
    assert torch.allclose(W_star[:, 2:], W0[:, 2:])  # no input there: the base stays
    assert torch.allclose(W_star[:, :2], (experts[0][:, :2] + experts[1][:, :2]) / 2, atol=1e-6)


def test_regmean_with_rank_deficient_covariances_from_rounding():
    # inputs confined to a 2-d subspace of 6: sum_t G_t has four zero eigenvalues, which rounding
    # makes slightly negative (as a float32 product of real activations does); the reference must
    # still solve, keep the base outside the inputs' span and fit the experts inside it
    g = torch.Generator().manual_seed(5)
    W0, experts = _experts(4, 6, 2)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64)).Q
    grams = []
    for _ in range(2):
        X = torch.randn(50, 2, generator=g, dtype=torch.float64) @ basis.T
        G = X.T @ X / 50
        off = torch.randn(6, 6, generator=g, dtype=torch.float64)
        off = (torch.eye(6, dtype=torch.float64) - basis @ basis.T) @ off
        grams.append(G - 1e-7 * float(G.norm()) * (off @ off.T) / float((off @ off.T).norm()))
    assert float(torch.linalg.eigvalsh(sum(grams)).min()) < 0
    W_star = C.regmean_solution(W0, experts, grams)
    null = torch.eye(6, dtype=torch.float64) - basis @ basis.T
    assert torch.allclose(W_star @ null, W0 @ null, atol=1e-6)
    # inside the span: the exact RegMean fit, (sum_t W_t G_t) projected, solved on the span
    Gs = [basis.T @ G @ basis for G in grams]
    inside = sum((Wt @ basis) @ Gk for Wt, Gk in zip(experts, Gs)) @ torch.linalg.inv(sum(Gs))
    assert torch.allclose(W_star @ basis, inside, atol=1e-5)


def test_input_grams_exclude_padding():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 3)
            self.proj = torch.nn.Linear(3, 2, bias=False)
            self.training_flag = None

        def forward(self, input_ids, attention_mask):
            return self.proj(self.emb(input_ids))

    model = Tiny()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    grams = C.input_grams(model, [(ids, mask)])
    G, n = grams["proj.weight"]
    X = model.emb.weight.detach()[torch.tensor([1, 2, 3, 4, 5])].double()
    assert n == 5
    assert torch.allclose(G, X.T @ X / 5)


def test_input_grams_share_products_only_for_the_same_input():
    torch.manual_seed(1)

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.a = torch.nn.Linear(4, 3, bias=False)
            self.b = torch.nn.Linear(4, 3, bias=False)
            self.c = torch.nn.Linear(4, 4, bias=False)

        def forward(self, input_ids, attention_mask):
            x = self.emb(input_ids)
            y = self.a(x) + self.b(x)  # a and b read the same tensor
            z = x * 2.0  # a new tensor of the same shape
            return y.sum() + self.c(z).sum()

    model = Shared()
    batches = [(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]])),
               (torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 0]]))]
    grams = C.input_grams(model, batches)
    X = model.emb.weight.detach()[torch.tensor([1, 2, 3, 4, 5])].double()
    expected = X.T @ X / 5
    assert torch.allclose(grams["a.weight"][0], expected, atol=1e-6)
    assert torch.allclose(grams["b.weight"][0], expected, atol=1e-6)
    assert torch.allclose(grams["c.weight"][0], 4 * expected, atol=1e-5)
    assert grams["c.weight"][1] == 5


def test_analyse_layer_and_aggregate():
    W0, experts = _experts(6, 5, 3, seed=4)
    grams = [_psd(5, 20 + t) for t in range(3)]
    average = sum(experts) / 3
    W_star_expected = C.regmean_solution(W0, experts, grams)
    merges = {"linear": average, "first": experts[0], "oracle": W_star_expected}
    row, W_star = C.analyse_layer("model.layers.1.mlp.up_proj.weight", W0, experts, grams, merges, ["a", "b", "c"])
    assert torch.allclose(W_star, W_star_expected)
    assert row["rel_objective_linear"] == pytest.approx(1.0)
    assert row["rel_objective_oracle"] == pytest.approx(row["rel_objective_regmean"])
    assert row["dist_regmean_oracle"] == pytest.approx(0.0, abs=1e-12)
    for label in merges:
        assert row[f"objective_{label}"] >= row["objective_regmean"] * (1 - 1e-12)
    for t in "abc":
        assert 0.0 <= row[f"cos_DtD_{t}"] <= 1.0 and 0.0 <= row[f"cos_CtC_{t}"] <= 1.0
        assert row[f"cos_I_{t}"] == pytest.approx(C.identity_cosine(grams["abc".index(t)]))
    agg = C.aggregate([row, row], ["linear", "first", "oracle"], ["a", "b", "c"])
    assert agg["objective"]["linear"]["sum_ratio"] == pytest.approx(1.0)
    assert agg["objective"]["first"]["sum_ratio"] == pytest.approx(row["rel_objective_first"])
    assert agg["cosine"]["DtD"]["per_task"]["a"]["mean"] == pytest.approx(row["cos_DtD_a"])
    assert C.weight_kind("model.layers.1.mlp.up_proj.weight") == "mlp.up_proj"
    assert C.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert C.layer_index("lm_head.weight") == -1
