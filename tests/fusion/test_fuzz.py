"""``fuse`` over seeded random programs (``tests/fuzz_programs.py``).

For every program: the fused network matches a float64 reference of the original as closely as the original does,
``fuse`` leaves the model exactly as it was, keeps its class, and ``checkpoint_state_dict`` loads strictly into a
fresh instance that computes the same. A failure prints the program's source, the fusion report and the shortest
prefix of the program's blocks that still fails. The default run covers 300 seeds, the slow one 3000 more:

    python -m pytest tests/fusion/test_fuzz.py -m "slow or not slow"
    python tests/fuzz_programs.py 17 --max-ops 2   # print a program (or its first blocks) again
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fuzz_programs import FEATURES, Program, generate
from fx_lightning import fuse

try:
    from fx_lightning import checkpoint_state_dict
except ImportError:
    from fx_lightning.deploy.export import checkpoint_state_dict

DEFAULT_SEEDS = range(300)
SLOW_SEEDS = range(300, 3300)
#: Relative floor of the tolerance: float32 rounding of a few small layers stays far below it; a wrong fold does not.
RTOL = 1e-5
#: bfloat16 outputs may also differ by this many units of bfloat16 precision (times the output scale).
BF16_ULPS = 3

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning"),
]


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_fuse_random_programs_match_float64_reference(seed: int) -> None:
    _check_seed(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_fuse_random_programs_match_float64_reference_many_seeds(seed: int) -> None:
    _check_seed(seed)


def test_generate_is_reproducible_and_leaves_global_rng_alone() -> None:
    rng_state = torch.get_rng_state()
    for seed in (0, 1, 2, 3):
        a, b = generate(seed), generate(seed)
        assert a.source == b.source
        assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
        assert a.model.state_dict().keys() == b.model.state_dict().keys()
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert torch.equal(rng_state, torch.get_rng_state())


def test_generate_max_ops_keeps_the_first_blocks_and_their_values() -> None:
    for seed in range(20):
        full = generate(seed)
        cut = generate(seed, max_ops=1)
        assert cut.num_ops == 1
        assert all(torch.equal(x, y) for x, y in zip(full.inputs, cut.inputs))
        full_state = full.model.state_dict()
        for key, value in cut.model.state_dict().items():
            assert torch.equal(value, full_state[key]), (seed, key)


def test_generated_programs_cover_every_feature() -> None:
    seen: set[str] = set()
    for seed in DEFAULT_SEEDS:
        seen |= generate(seed).features
    assert sorted(FEATURES - seen) == []


# ----------------------------------------------------------------------------------------------- the check


@dataclass
class _Trail:
    """What a check produced so far, for the failure message."""

    reports: list[str] = field(default_factory=list)


def _check_seed(seed: int) -> None:
    program = generate(seed)
    _assert_original_runs(program)
    trail = _Trail()
    try:
        _check(program, trail)
    except Exception as err:
        pytest.fail(_failure_message(program, err, trail, _shortest_failing_prefix(program)))


def _assert_original_runs(program: Program) -> None:
    """The program itself must run and be finite; otherwise the generator, not fuse, is wrong."""
    with torch.no_grad():
        out = copy.deepcopy(program.model).double().eval()(*(t.double() for t in program.inputs))
    assert torch.isfinite(out).all(), f"the original program is not finite:\n{program.source}"


def _check(program: Program, trail: _Trail) -> None:
    """Raise if ``fuse`` gets ``program`` wrong."""
    model, inputs = program.model, program.inputs
    inputs64 = tuple(t.double() for t in inputs)
    with torch.no_grad():
        ref = copy.deepcopy(model).double().eval()(*inputs64)
        own = copy.deepcopy(model).eval()(*inputs)
    scale = max(1.0, ref.abs().max().item())
    err_orig = _error(own, ref)
    if program.dtype == torch.bfloat16:
        tol = 2 * err_orig + BF16_ULPS * torch.finfo(torch.bfloat16).eps * scale
    else:
        tol = max(2 * err_orig, RTOL * scale)
    expect = _Expect(inputs, inputs64, ref, own.dtype, tol, err_orig, scale)

    before = _snapshot(model)
    target = torch.fx.symbolic_trace(model) if program.trace_first else model
    before_target = _snapshot(target)
    kwargs: dict[str, Any] = {"example_inputs": inputs} if program.example_inputs else {}
    once = fuse(target, **kwargs)
    trail.reports.append(str(once.fusion_report))
    fused = once
    if program.fuse_twice:
        before_once = _snapshot(once)
        fused = fuse(once, **kwargs)
        trail.reports.append(str(fused.fusion_report))
        _assert_unchanged(before_once, once, "fuse(fused)")
    _assert_unchanged(before, model, "fuse")
    _assert_unchanged(before_target, target, "fuse(torch.fx.symbolic_trace(model))")
    _assert_class_kept(target, once)
    if fused is not once:
        _assert_class_kept(once, fused)
    assert not any(m.training for m in fused.modules()), "fuse returned modules in train mode"

    expect.assert_matches(fused, "the fused model")

    state = checkpoint_state_dict(target, once)
    fresh = program.factory()
    if program.trace_first:
        fresh = torch.fx.symbolic_trace(fresh)
    fresh.load_state_dict(state, strict=True)
    expect.assert_matches(fresh.eval(), "a fresh instance loaded with checkpoint_state_dict(model, fused)")
    _assert_unchanged(before, model, "running the fused model and checkpoint_state_dict")


@dataclass
class _Expect:
    inputs: tuple[Tensor, ...]
    inputs64: tuple[Tensor, ...]
    ref: Tensor
    dtype: torch.dtype
    tol: float
    err_orig: float
    scale: float

    def assert_matches(self, module: nn.Module, label: str) -> None:
        saved = [t.clone() for t in self.inputs]
        with torch.no_grad():
            out = module(*self.inputs)
        assert all(torch.equal(a, b) for a, b in zip(saved, self.inputs)), f"{label} wrote into its input"
        assert isinstance(out, Tensor), f"{label} returns a {type(out).__name__}, the original a Tensor"
        assert out.dtype == self.dtype, f"{label} returns {out.dtype}, the original {self.dtype}"
        err = _error(out, self.ref)
        if err <= self.tol:
            return
        # Off by more than rounding allows: tell a wrong computation from float32/bfloat16 rounding of a right one.
        try:
            with torch.no_grad():
                err64 = _error(copy.deepcopy(module).double()(*self.inputs64), self.ref)
            recheck = f"{err64:.3e}"
        except Exception as exc:
            err64, recheck = math.inf, f"fails ({type(exc).__name__}: {exc})"
        if err64 <= self.tol:
            return
        raise AssertionError(
            f"{label} differs from the float64 reference of the original: max abs error {err:.3e} > tolerance "
            f"{self.tol:.3e} (the original's own error {self.err_orig:.3e}, output scale {self.scale:.3g}); "
            f"a float64 copy of it: {recheck}"
        )


def _error(out: Any, ref: Tensor) -> float:
    assert isinstance(out, Tensor), f"expected a tensor output, got {type(out).__name__}"
    assert out.shape == ref.shape, f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    return err if math.isfinite(err) else math.inf


# ----------------------------------------------------------------------------------------------- the model untouched


@dataclass
class _Snapshot:
    tensors: dict[str, tuple[Tensor, Tensor, torch.dtype, tuple[int, ...], bool]]
    modules: dict[str, tuple[nn.Module, type, bool]]
    code: dict[str, str]  # the code of every GraphModule inside


def _snapshot(model: nn.Module) -> _Snapshot:
    # Objects, not ids: holding them keeps an id from being reused by a new object.
    tensors = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        tensors[name] = (t, t.detach().clone(), t.dtype, t.stride(), t.requires_grad)
    modules = {name: (m, type(m), m.training) for name, m in model.named_modules(remove_duplicate=False)}
    code = {name: m.code for name, m in model.named_modules() if isinstance(m, torch.fx.GraphModule)}
    return _Snapshot(tensors, modules, code)


def _assert_unchanged(before: _Snapshot, model: nn.Module, during: str) -> None:
    after = _snapshot(model)
    problems = []
    if before.modules.keys() != after.modules.keys():
        problems.append(f"modules {sorted(before.modules.keys() ^ after.modules.keys())} appeared or vanished")
    for name, (module, cls, training) in before.modules.items():
        now = after.modules.get(name)
        if now is not None and (now[0] is not module or now[1] is not cls or now[2] != training):
            problems.append(
                f"module {name or '<model>'}: {cls.__name__} training={training} -> "
                f"{now[1].__name__} training={now[2]}{'' if now[0] is module else ', another object'}"
            )
    if before.tensors.keys() != after.tensors.keys():
        problems.append(f"tensors {sorted(before.tensors.keys() ^ after.tensors.keys())} appeared or vanished")
    for name, (obj, value, dtype, stride, requires_grad) in before.tensors.items():
        now = after.tensors.get(name)
        if now is None:
            continue
        if now[0] is not obj:
            problems.append(f"{name} is another object")
        elif (now[2], now[3], now[4]) != (dtype, stride, requires_grad) or not torch.equal(now[1], value):
            problems.append(f"{name} changed (dtype/stride/requires_grad/values)")
    problems += [
        f"the code of GraphModule {name or '<model>'}"
        for name, code in before.code.items()
        if code != after.code.get(name)
    ]
    assert not problems, f"{during} modified the model: " + "; ".join(problems[:8])


def _assert_class_kept(before: nn.Module, after: nn.Module) -> None:
    graphs = getattr(after.fusion_report, "graphs", None)
    if graphs is None or "" in graphs or "<model>" in graphs:
        return  # no report of the replaced parts yet, or the root itself became a graph
    assert type(after) is type(before), (
        f"fuse returned a {type(after).__name__} for a {type(before).__name__} whose root is not in "
        f"fusion_report.graphs={graphs!r}"
    )


# ----------------------------------------------------------------------------------------------- failure reports


def _shortest_failing_prefix(program: Program) -> tuple[Program, Exception] | None:
    """The program cut to its fewest first blocks that still fail, if fewer than all of them do."""
    for max_ops in range(1, program.num_ops):
        cut = generate(program.seed, max_ops=max_ops)
        try:
            _check(cut, _Trail())
        except Exception as err:
            return cut, err
    return None


def _failure_message(
    program: Program, err: Exception, trail: _Trail, shortest: tuple[Program, Exception] | None
) -> str:
    name = "test_fuse_random_programs_match_float64_reference"
    test = f"tests/fusion/test_fuzz.py::{name}{'' if program.seed in DEFAULT_SEEDS else '_many_seeds'}[{program.seed}]"
    lines = [
        f"fuzz program {program.seed}: {type(err).__name__}: {_first_lines(err)}",
        *(["fusion report(s):", *trail.reports] if trail.reports else ["fuse raised before returning a report"]),
        "",
        program.source,
    ]
    if shortest is not None:
        cut, cut_err = shortest
        lines += [
            "",
            f"its first {cut.num_ops} block(s) fail too (generate({program.seed}, max_ops={cut.num_ops})): "
            f"{type(cut_err).__name__}: {_first_lines(cut_err)}",
            cut.source,
        ]
    lines += [
        "",
        f"reproduce: python -m pytest -m 'slow or not slow' '{test}'",
        f"print: python tests/fuzz_programs.py {program.seed}",
    ]
    return "\n".join(lines)


def _first_lines(err: BaseException, limit: int = 3) -> str:
    return "\n".join(str(err).strip().splitlines()[:limit])
