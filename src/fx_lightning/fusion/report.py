"""What a fusion did: the layers folded, the BatchNorms left and why, and the parts that could not be traced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fx_lightning.errors import first_line


@dataclass(frozen=True)
class Folded:
    """One BatchNorm folded into a neighbouring layer.

    Attributes:
        bn: qualified name of the BatchNorm (module path, or the owner of the parameters of a functional call).
        into: qualified name of the layer that now carries the BatchNorm (several, comma-separated, when a
            BatchNorm after a concatenation is split over the concatenated layers).
        rule: the pass that folded it, e.g. ``"fold_bn_into_preceding"``.
        layers: the qualified names of the layers that carry it, one per layer.
        in_place: whether the fold is written at the user's own module paths (the layer replaced where it was,
            the BatchNorm an ``nn.Identity``) rather than in generated code.
        writable: whether :func:`fx_lightning.checkpoint_state_dict` may write it in the original layout: in place,
            and no untraced code around it could read the tensors that writing it changes.
    """

    bn: str
    into: str
    rule: str
    layers: tuple[str, ...] = ()
    in_place: bool = False
    writable: bool = False


@dataclass(frozen=True)
class Skipped:
    """One BatchNorm left in place, with the reason it could not be folded exactly."""

    bn: str
    reason: str


@dataclass(frozen=True)
class Removed:
    """One no-op call removed from the graph (Dropout in eval, Identity)."""

    name: str
    kind: str


@dataclass(frozen=True)
class Merged:
    """Graph nodes absorbed into one layer by structural re-parameterisation.

    Attributes:
        into: qualified name of the layer that now computes them.
        consumed: what it absorbed: the parallel branches of a sum (``"identity(x)"`` for the input itself),
            or the constant operation folded into its weights (``"mul(gamma)"``).
        rule: the pass that merged them, e.g. ``"merge_branches"``.
    """

    into: str
    consumed: tuple[str, ...]
    rule: str


@dataclass(frozen=True)
class Untraced:
    """A sub-module torch.fx could not trace; it runs as it was, and BatchNorms inside it stay."""

    path: str
    error: str


@dataclass
class FusionReport:
    """The facts of one :func:`fx_lightning.fuse` call, built from what each pass returned.

    Print it for a short table; use :meth:`to_dict` for JSON.
    """

    model: str = ""
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    merged: list[Merged] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)
    graphs: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    reverted_reasons: dict[str, str] = field(default_factory=dict)
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_folded(self) -> int:
        return len(self.folded)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def merge(self, other: FusionReport, prefix: str) -> None:
        """Append ``other``'s records, naming them relative to this report's model under ``prefix``."""

        def join(name: str) -> str:
            return f"{prefix}.{name}" if prefix and name else (prefix or name)

        for r in other.folded:
            layers = tuple(join(p) for p in r.layers)
            into = ", ".join(layers) or join(r.into)
            self.folded.append(Folded(join(r.bn), into, r.rule, layers, r.in_place, r.writable))
        self.skipped += [Skipped(join(r.bn), r.reason) for r in other.skipped]
        self.removed += [Removed(join(r.name), r.kind) for r in other.removed]
        self.untraced += [Untraced(join(r.path), r.error) for r in other.untraced]
        self.merged += [Merged(join(r.into), r.consumed, r.rule) for r in other.merged]
        self.traced += [join(p) for p in other.traced]
        self.graphs += [join(p) for p in other.graphs]
        self.reverted += [join(p) for p in other.reverted]
        self.notes += other.notes

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-serialisable data."""
        return {
            "model": self.model,
            "folded": [asdict(r) for r in self.folded],
            "skipped": [asdict(r) for r in self.skipped],
            "removed": [asdict(r) for r in self.removed],
            "untraced": [asdict(r) for r in self.untraced],
            "merged": [{"into": r.into, "consumed": list(r.consumed), "rule": r.rule} for r in self.merged],
            "traced": list(self.traced),
            "graphs": list(self.graphs),
            "reverted": list(self.reverted),
            "reverted_reasons": dict(self.reverted_reasons),
            "max_rel_error": self.max_rel_error,
            "notes": list(self.notes),
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """One line: counts of folded, skipped, removed, merged and untraced parts."""
        merged = f", {len(self.merged)} re-parameterised layer(s)" if self.merged else ""
        graphs = f", {len(self.graphs)} module(s) as generated code" if self.graphs else ""
        reverted = f", {len(self.reverted)} rewrite(s) reverted by the self-check" if self.reverted else ""
        if self.max_rel_error is not None:
            reverted += f", max rel error {self.max_rel_error:.1e} on example_inputs"
        return (
            f"{self.model or 'model'}: folded {len(self.folded)} BatchNorm, left {len(self.skipped)}, "
            f"removed {len(self.removed)} no-op calls{merged}{graphs}{reverted}, {len(self.untraced)} untraced "
            f"part(s) in {self.seconds:.2f}s"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        rows = [(r.bn, f"-> {r.into}", r.rule) for r in self.folded]
        rows += [(r.bn, "left", r.reason) for r in self.skipped]
        rows += [(r.path, "untraced", first_line(r.error, limit=120)) for r in self.untraced]
        rows += [(r.into, "<- merged", f"{' + '.join(r.consumed)} ({r.rule})") for r in self.merged]
        rows += [(p or "<model>", "as graph", "replaced by generated code for the rewrites above") for p in self.graphs]
        rows += [
            (p or "<model>", "reverted", self.reverted_reasons.get(p or "<model>") or "the self-check failed with it")
            for p in self.reverted
        ]
        if rows:
            widths = [max(len(row[i]) for row in rows) for i in range(2)]
            lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
