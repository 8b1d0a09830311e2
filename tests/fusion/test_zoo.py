"""``fuse`` over every torchvision classification model: same outputs, no foldable BatchNorm left, original untouched.

The default run covers a few small, representative models; the rest of the zoo is marked slow:

    python -m pytest tests/fusion/test_zoo.py -m "slow or not slow"
"""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as reference_fuse

from fx_lightning import count_kernels, fuse
from numerics import rel_err
from zoo import FAST_MODELS, example_input, reference_pitfalls, zoo_names
from zoo import build as build_zoo_model

RTOL = 1e-5
# Small inputs make these models many tiny ops: one thread each (see the one_thread fixture).
pytestmark = pytest.mark.usefixtures("one_thread")

# BatchNorm calls that cannot be folded exactly, per model family, with the reason the report must give.
# DenseNet normalises the concatenation of earlier layers' outputs (no single layer produces it) and feeds
# the result to a ReLU (so no layer reads it directly either): norm1 of every dense layer, the norm of
# every transition and the final norm5, i.e. sum(block_config) + len(block_config) calls.
_DENSENET_REASON = re.compile(
    r"its input is a concatenation \('cat(_\d+)?'\) whose part '\w+' is not a Conv/ConvTranspose layer call; "
    r"the layer after it is not a .*relu"
)
_DENSENET_BLOCKS = {
    "densenet121": (6, 12, 24, 16),
    "densenet161": (6, 12, 36, 24),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
}
EXPECTED_LEFT: dict[str, tuple[int, re.Pattern[str]]] = {
    name: (sum(blocks) + len(blocks), _DENSENET_REASON) for name, blocks in _DENSENET_BLOCKS.items()
}


def _zoo_params() -> list[object]:
    return [pytest.param(name, marks=() if name in FAST_MODELS else pytest.mark.slow) for name in zoo_names()]


def _fingerprint(t: torch.Tensor) -> tuple[torch.dtype, torch.Size, str]:
    # A digest of the raw bytes: bit-exact like a clone, without holding a second copy of a 2.6 GB model.
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return t.dtype, t.shape, hashlib.blake2b(raw, digest_size=16).hexdigest()


def _snapshot(model: nn.Module) -> tuple[dict[str, tuple[object, ...]], dict[str, bool], dict[str, bool]]:
    state = {k: _fingerprint(v) for k, v in model.state_dict().items()}
    training = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    return state, training, requires_grad


def _assert_bit_identical(before: dict[str, tuple[object, ...]], model: nn.Module) -> None:
    after = {k: _fingerprint(v) for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if after[k] != v]
    assert not changed, f"fuse() changed the original model's tensors: {changed[:5]}"


@pytest.mark.parametrize("name", _zoo_params())
def test_fuse_zoo_model_matches_and_folds(name: str) -> None:
    model = build_zoo_model(name).train()
    # A frozen backbone, as in fine-tuning: fuse must keep both kinds of flag as they were.
    for i, param in enumerate(model.parameters()):
        param.requires_grad_(i % 2 == 0)
    state, training, requires_grad = _snapshot(model)

    fused = fuse(model)

    assert type(fused) is type(model), f"{name}: {fused.fusion_report}"
    _assert_bit_identical(state, model)
    assert {n: m.training for n, m in model.named_modules()} == training
    assert all(training.values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert not any(m.training for m in fused.modules())

    x = example_input(name)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = fused(x)
    err = rel_err(out, ref)
    assert err <= RTOL, f"{name}: fused output differs from the original by {err:.3e} (relative), above {RTOL}"

    report = fused.fusion_report
    before = count_kernels(model, x)
    left = count_kernels(fused, x)
    assert not report.untraced, f"{name}: parts left untraced: {report.untraced}"
    assert report.num_folded + left == before, f"{name}: {before} kernels before, {report.num_folded} folded, {left}"
    expected_left, reason = EXPECTED_LEFT.get(name, (0, None))
    assert left == expected_left, f"{name}: {left} BatchNorm kernels left, expected {expected_left}\n{report}"
    assert report.num_skipped == left, f"{name}: {left} kernels left but the report lists {report.num_skipped}"
    if reason is not None:
        unexplained = [s for s in report.skipped if not reason.search(s.reason)]
        assert not unexplained, f"{name}: skipped for an unexpected reason: {unexplained[:3]}"

    # Never leave a kernel that torch.fx's own fuse folds (it deep-copies; the model is in eval mode now).
    # Where it raises, it folds nothing.
    del fused, out
    try:
        reference_left = count_kernels(reference_fuse(model), x)
    except Exception:  # noqa: BLE001 - any failure of the other tool means it folded nothing
        reference_left = before
    assert left <= reference_left, f"{name}: {left} kernels left, torch.fx's fuse leaves {reference_left}"


# The Linear acts on L while BatchNorm1d normalises C: no exact fold exists, so the BatchNorm must stay.
_PITFALL_LEFT = {"Linear + BatchNorm1d on (N, C, L)": 1}


@pytest.mark.parametrize("case", [name for name, _, _ in reference_pitfalls()])
def test_fuse_reference_pitfall_exact(case: str) -> None:
    _, model, x = next(c for c in reference_pitfalls() if c[0] == case)
    fused = fuse(model)
    model.eval()
    with torch.no_grad():
        err = rel_err(fused(x), model(x))
    assert err <= RTOL, f"{case}: relative error {err:.3e} above {RTOL}"
    assert count_kernels(fused, x) == _PITFALL_LEFT.get(case, 0)
    assert fused.fusion_report.num_folded == 1 - _PITFALL_LEFT.get(case, 0)
