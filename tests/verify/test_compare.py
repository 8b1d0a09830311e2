"""The one output comparison: relative to each leaf's scale, float64 rounding allowed, varying shapes listed."""

import math

import torch

from fx_lightning.verify.compare import compare_trees, default_rtol, relative_error


def test_compare_trees_scales_with_magnitude():
    big = torch.tensor([1e7, -3e7, 5.0])
    # 866 on a scale of 3e7 is float32 rounding, not a mismatch
    assert compare_trees(big, big + torch.tensor([866.0, 0.0, 0.0])).passed
    small = torch.tensor([1.0, -3.0])
    comparison = compare_trees(small, small + torch.tensor([1e-3, 0.0]))
    assert not comparison.passed
    assert math.isclose(comparison.max_rel, 1e-3 / 3.0, rel_tol=1e-4)  # float32 inputs
    assert math.isclose(comparison.max_abs, 1e-3, rel_tol=1e-4)


def test_compare_trees_lists_varying_leaves_without_raising():
    reference = [{"boxes": torch.ones(2, 4), "scores": torch.ones(2), "labels": torch.tensor([1, 2])}]
    candidate = [{"boxes": torch.ones(3, 4), "scores": torch.ones(3), "labels": torch.tensor([1, 2])}]
    comparison = compare_trees(reference, candidate)
    assert [leaf.path for leaf in comparison.varying] == ["[0]['boxes']", "[0]['scores']"]
    assert not comparison.passed
    assert comparison.compared_passed
    assert "2 vary in shape" in comparison.describe()


def test_compare_trees_discrete_and_structure():
    assert not compare_trees(torch.tensor([1, 2]), torch.tensor([1, 3])).passed
    assert compare_trees({"n": 2, "x": torch.ones(1)}, {"n": 2, "x": torch.ones(1)}).passed
    assert not compare_trees({"n": 2}, {"n": 3}).passed
    comparison = compare_trees((torch.ones(1),), (torch.ones(1), torch.ones(1)))
    assert comparison.structure.startswith("the outputs differ in structure")
    assert not comparison.passed
    assert comparison.max_abs == math.inf


def test_compare_trees_nan_positions_must_match():
    a = torch.tensor([1.0, float("nan"), float("inf")])
    assert compare_trees(a, a.clone()).passed
    assert not compare_trees(a, torch.tensor([1.0, 2.0, float("inf")])).passed
    assert not compare_trees(a, torch.tensor([1.0, float("nan"), -float("inf")])).passed


def test_compare_trees_allows_the_references_own_rounding_against_float64():
    torch.manual_seed(0)
    weight = torch.randn(64, 64, dtype=torch.float64)
    x = torch.randn(8, 64, dtype=torch.float64)
    exact = x @ weight
    reference = x.float() @ weight.float()
    # a candidate off by about as much as the reference's own float32 error passes only with the exact run
    candidate = (x.float() @ weight.float().T.contiguous().T) + (reference - exact.float()) * 1.5
    tight = compare_trees(reference, candidate, rtol=1e-9)
    assert not tight.passed
    assert compare_trees(reference, candidate, rtol=1e-9, exact=exact).passed
    # a real error is not hidden by the allowance
    assert not compare_trees(reference, candidate + 1e-2, rtol=1e-9, exact=exact).passed


def test_relative_error_and_default_rtol():
    assert math.isclose(relative_error(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -4.004])), 1e-3, rel_tol=1e-4)
    assert default_rtol(torch.bfloat16) > default_rtol(torch.float32) > default_rtol(torch.float64)


def test_compare_trees_bounds_an_all_zero_leaf_by_atol():
    zeros = torch.zeros(3)
    off = torch.tensor([0.0, 1e-7, 0.0])
    # no scale to be relative to: the relative bound alone is an absolute one here
    assert not compare_trees(zeros, off, rtol=1e-9).passed
    assert compare_trees(zeros, off, rtol=1e-9, atol=1e-6).passed
    assert not compare_trees(zeros, off * 100, rtol=1e-9, atol=1e-6).passed
    # a leaf with a scale is not loosened by atol
    assert not compare_trees(torch.ones(3), torch.ones(3) + off * 10, rtol=1e-9, atol=1e-3).passed


def test_compare_trees_measures_complex_leaves_by_modulus():
    a = torch.tensor([3 + 4j, -1 + 0j], dtype=torch.complex64)
    same = compare_trees(a, a.clone())
    assert same.passed
    assert same.leaves[0].scale == 5.0
    off = compare_trees(a, a + torch.tensor([0.05j, 0j], dtype=torch.complex64))
    assert not off.passed
    assert abs(off.max_rel - 0.05 / 5.0) < 1e-6
