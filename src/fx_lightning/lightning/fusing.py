"""One fusion of a LightningModule's networks, as FuseOnExport runs it: find, capture, fuse, count, verify.

A :class:`Run` holds the state of one fusion (the callback outlives it; the user's module never holds any of it).
:func:`prepare` does everything each process does on its own (the data, the example input, the fusion, the kernel
counts, the verification updates); :func:`compute_verification` is the collective part, which every process
reaches together. Nothing here decides what to do with the outcome: that is the callback's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fx_lightning.fusion.api import fuse
from fx_lightning.fusion.counting import count_batch_norms
from fx_lightning.fusion.probe import Call, capture_calls
from fx_lightning.fusion.report import FusionReport
from fx_lightning.fusion.tracing import is_frozen_batch_norm
from fx_lightning.lightning.batches import (
    Batches,
    InputBinding,
    example_input,
    to_device,
    verification_batches,
    with_progress,
)
from fx_lightning.lightning.networks import Network, Swap, networks_of, replacements, run_forward, without_pruning
from fx_lightning.lightning.options import FuseOptions
from fx_lightning.lightning.result import FuseResult, Outcome
from fx_lightning.verify.verifier import Verifier, call_with_input, eval_mode


@dataclass
class Run:
    """The state of one fusion, kept apart from the callback (which outlives it) and from the user's module."""

    trainer: Any
    pl_module: Any
    stage: str
    result: FuseResult
    binding: InputBinding
    batches: Batches | None = None
    first: Any = None
    example: Any = None
    calls: dict[Network, Call] = field(default_factory=dict)
    fused: dict[Network, nn.Module] = field(default_factory=dict)
    #: networks with nothing folded, as fuse returned them: exported as they are when artifacts were asked for
    unfolded: dict[Network, nn.Module] = field(default_factory=dict)
    replacements: dict[str, nn.Module] = field(default_factory=dict)
    verifier: Verifier | None = None
    step: str = "finding the networks"
    #: the LightningModule runs compiled: it is fused through its own uncompiled forward
    compiled: bool = False

    def __post_init__(self) -> None:
        if self.compiled:
            loop = "" if self.stage == "fit" else f"; the {self.stage} loop's compiled steps run the fused networks"
            self.result.notes.append(
                f"{type(self.pl_module).__name__} runs compiled (torch.compile): its networks were fused, verified "
                f"and exported through its own uncompiled forward{loop}"
            )

    def forward(self, x: Any, networks: list[Network]) -> Any:
        """The LightningModule's forward on ``x`` (see :func:`~fx_lightning.lightning.networks.run_forward`)."""
        return run_forward(self.pl_module, x, networks)

    def forward_context(self) -> Any:
        """The precision plugin's forward context, as Lightning's steps run in."""
        return self.trainer.precision_plugin.forward_context()


def prepare(run: Run, options: FuseOptions) -> None:
    """Everything each process does on its own: data, example input, fusion, counts, verification updates.
    ``run.step`` names the step in progress, for the report of a failure."""
    trainer, pl_module, result = run.trainer, run.pl_module, run.result
    networks = networks_of(pl_module, options.attributes)
    if not networks:
        result.outcome = Outcome.NO_BATCH_NORM
        result.notes.append(
            f"no BatchNorm in the children of {type(pl_module).__name__}; nothing to fuse. Name the network "
            "with FuseOnExport(attributes=['net']) if it is nested deeper."
        )
        return
    result.attributes = [n.name for n in networks]
    run.step = "reading the verification data"
    run.batches = verification_batches(trainer, run.stage, options.verify_dataloader, options.max_verify_batches)
    run.first = run.batches.first()
    binding = run.binding.bind(pl_module, networks, run.first)
    if binding:
        result.notes.append(binding)
    run.example = example_input(trainer, pl_module, options.example_input, run.binding, run.first)
    if run.example is not None:
        run.step = "the forward that captures the networks' inputs"
        run.calls = capture(run, networks)
        for network in networks:
            if network not in run.calls:
                result.notes.append(
                    f"'{network.name}' skipped: {type(pl_module).__name__}.forward never calls it (a teacher or "
                    "an averaged copy?); it cannot be verified nor exported, so it is not fused"
                )
        networks = [n for n in networks if n in run.calls]
        result.attributes = [n.name for n in networks]

    start = time.perf_counter()
    try:
        run.step = "fx_lightning.fuse"
        for network in networks:
            original = network.module(pl_module)
            call = run.calls.get(network)
            example = call.args if call is not None and not call.kwargs else None
            fused = fuse(without_pruning(original), example_inputs=example, passes=options.passes)
            report: FusionReport = fused.fusion_report
            result.reports[network.name] = report
            if report.num_folded or report.merged:
                run.fused[network] = fused
            else:
                result.notes.append(nothing_folded(network, original, report))
                run.unfolded[network] = fused
        if not run.fused:  # BatchNorms were found, none folded (or no network that forward calls has one)
            result.outcome = Outcome.NOTHING_FOLDED
            return
        run.step = "swapping in the fused networks"
        for network, fused in run.fused.items():
            run.replacements |= replacements(pl_module, network, fused)
        if run.calls:
            run.step = "counting the BatchNorm kernels"
            result.kernels_before, result.kernels_after = count(run)
    finally:
        result.seconds["fuse"] = time.perf_counter() - start

    if not options.verify:
        result.verify_source = "skipped: verify=False"
    elif run.first is None:
        result.verify_source = "skipped: no validation data (give verify_dataloader=...)"
    else:
        run.step = "the verification pass"
        update_verification(run, options)


def capture(run: Run, networks: list[Network]) -> dict[Network, Call]:
    """What each network receives when the LightningModule's forward runs on the example input."""
    pl_module = run.pl_module
    # the holder: hooks on the module behind torch.compile would not run inside the compiled frame
    modules = {n.name: n.holder(pl_module) for n in networks if not n.is_self}
    with eval_mode(pl_module), run.forward_context():
        captured = capture_calls(lambda: run.forward(run.example, networks), modules)
    calls = {n: captured[n.name] for n in networks if n.name in captured}
    for network in networks:
        if network.is_self:
            x = run.example
            calls[network] = Call(x if isinstance(x, tuple) else (x,)) if not isinstance(x, dict) else Call((), x)
    return calls


def count(run: Run) -> tuple[int, int]:
    """BatchNorm kernels per forward, before and after, summed over the fused networks."""
    before = after = 0
    with run.forward_context():
        for network, fused in run.fused.items():
            call = run.calls[network]
            original = network.module(run.pl_module)
            with eval_mode(original):
                before += count_batch_norms(lambda m=original, c=call: m(*c.args, **c.kwargs), original)
            after += count_batch_norms(lambda m=fused, c=call: m(*c.args, **c.kwargs), fused)
    return before, after


def update_verification(run: Run, options: FuseOptions) -> None:
    """Run the original and the fused LightningModule over this process's share of the batches."""
    trainer, pl_module = run.trainer, run.pl_module
    networks = list(run.fused)
    run.verifier = verifier = Verifier(
        metric=copy.deepcopy(options.metric) if options.metric is not None else None,
        tolerance=options.tolerance,
        get_input=run.binding.input_of,
        get_target=run.binding.target_of,
    ).to(pl_module.device)
    start = time.perf_counter()

    def runner(modules: dict[str, nn.Module]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            x = kwargs if kwargs else args  # as call_with_input unpacked it
            with Swap(pl_module, modules), run.forward_context():
                return run.forward(x, networks)

        return forward

    original, fused = runner({}), runner(run.replacements)
    # Where outputs are post-processed (detections), the sub-modules' continuous outputs are compared instead.
    parts = (networks[0].module(pl_module), run.fused[networks[0]]) if len(networks) == 1 else None
    batches = run.batches
    if batches is None:  # prepare reads them before it verifies
        raise RuntimeError("FuseOnExport: the verification batches were not read before the verification pass")
    world, rank = trainer.world_size, trainer.global_rank
    with eval_mode(pl_module):
        target = run.binding.target_of(run.first)
        if options.metric is None and target is not None:
            # Every process chooses the metric now, even one that gets no batch, so that all synchronise it.
            verifier.default_metric_for(call_with_input(original, run.example), target)
        shown = with_progress(trainer, batches, "FuseOnExport: verifying")
        for index, batch in enumerate(shown):
            # Each rank takes every world-th batch of the unsharded data: an exact partition, so the
            # synchronised metric equals the single-process one.
            if index % world == rank:
                verifier.update(original, fused, to_device(trainer, pl_module, batch), parts=parts)
        if hasattr(shown, "close"):
            shown.close()
    run.result.verify_source = batches.describe()
    run.result.seconds["verify"] = time.perf_counter() - start


def compute_verification(run: Run, options: FuseOptions) -> Exception | None:
    """The collective part of the verification: the synchronised metrics and the vote on them. Sets the outcome
    when the fused networks failed; returns what raised, if anything."""
    trainer, result = run.trainer, run.result
    if run.verifier is None:
        return None
    start = time.perf_counter()
    failure: Exception | None = None
    run.step = "the verification pass"
    try:
        result.verification = run.verifier.compute()
    except Exception as err:  # noqa: BLE001 - reported like any failure after training
        failure = err
    passed = failure is None and result.verification is not None and result.verification.passed
    # Every rank sees the same synchronised metric; the explicit vote also covers a rank that failed.
    passed = bool(trainer.strategy.reduce_boolean_decision(passed, all=True))
    result.seconds["verify"] = result.seconds.get("verify", 0.0) + time.perf_counter() - start
    if failure is None and not passed:
        keep = options.on_mismatch == "warn" and not options.strict
        result.outcome = Outcome.KEPT_DESPITE_MISMATCH if keep else Outcome.REVERTED
    return failure


def nothing_folded(network: Network, module: nn.Module, report: FusionReport) -> str:
    """The note for a network in which BatchNorms were found and none folded, with the first reasons."""
    found = sum(isinstance(m, _BatchNorm) or is_frozen_batch_norm(m) for m in module.modules())
    reasons = sorted({r.reason for r in report.skipped})
    why = "; ".join(reasons[:3]) or "no BatchNorm is called next to a layer it can be folded into"
    return f"'{network.name}': found {found} BatchNorm(s), folded none ({why}); no fused network is used for it"
