"""The experts' average (1-D weights and input embeddings), computed block by block."""

import pytest
import torch

from mergekit_ace.rules.task_vectors import average_task_vectors


@pytest.mark.parametrize("shape", [(), (7,), (37, 5), (9, 4, 3)])
@pytest.mark.parametrize("block_elements", [1, 6, 1 << 22])
def test_blockwise_average_equals_the_formula(shape, block_elements):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(torch.bfloat16)
    experts = [(base.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(torch.bfloat16)
               for _ in range(3)]
    copies = [base.clone()] + [e.clone() for e in experts]
    expected = base.double() + 0.7 * sum(e.double() - base.double() for e in experts) / 3
    out = average_task_vectors(base, experts, 0.7, torch.float64, block_elements=block_elements)
    assert out.dtype == torch.float64 and out.shape == base.shape
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    low = average_task_vectors(base, experts, 0.7, torch.float64, out_dtype=torch.bfloat16,
                               block_elements=block_elements)
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected.to(torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(copies, [base] + experts))  # inputs untouched
