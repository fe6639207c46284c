"""What a compression did: per-layer kept counts, budgets, and bytes actually held."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """One layer after prefill.

    Attributes:
        layer: layer index.
        compressed: whether eviction ran (False for retained layers and too-short prompts).
        reason: why it was skipped ("" when compressed).
        prompt_lengths: n_b per sample (real tokens, padding excluded).
        kept: tokens kept per sample.
        bytes_before / bytes_after: bytes of this layer's K plus V as stored, measured from the
            arrays (after >= the budget's share when a batch pads shorter samples).
        seconds: wall time of planning plus eviction for this layer (``compress_layers`` splits its
            joint planning evenly over the layers it planned).
    """

    layer: int
    compressed: bool
    reason: str
    prompt_lengths: list[int]
    kept: list[int]
    bytes_before: int
    bytes_after: int
    seconds: float = 0.0

    @property
    def budget(self) -> list[float]:
        """Fraction of each sample's prompt tokens kept."""
        return [k / n for k, n in zip(self.kept, self.prompt_lengths)]


@dataclass
class BudgetReport:
    """A whole model's compression (SPEC decision 7)."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def budget(self) -> list[float]:
        """The paper's budget per sample: mean over layers of kept / n, retained layers 1.0."""
        if not self.layers:
            return []
        per_layer = [r.budget for r in self.layers]
        return [sum(col) / len(per_layer) for col in zip(*per_layer)]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    @property
    def compressed_layers(self) -> int:
        return sum(r.compressed for r in self.layers)

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "memory_saved": 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0,
            "seconds": self.seconds,
            "compressed_layers": self.compressed_layers,
            "layers": [dict(asdict(r), budget=r.budget) for r in self.layers],
        }

    def to_markdown(self) -> str:
        """A per-layer table (sample 0's kept count and budget; bytes for the whole batch)."""
        lines = ["| layer | compressed | kept / n | budget | KV bytes before | after | note |",
                 "|---:|:---:|---:|---:|---:|---:|---|"]
        for r in self.layers:
            lines.append(f"| {r.layer} | {'yes' if r.compressed else 'no'} | {r.kept[0]} / "
                         f"{r.prompt_lengths[0]} | {r.budget[0]:.1%} | {r.bytes_before:,} | "
                         f"{r.bytes_after:,} | {r.reason} |")
        saved = 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        lines.append(f"\nbudget {', '.join(f'{b:.1%}' for b in self.budget)}; KV bytes "
                     f"{self.bytes_before:,} -> {self.bytes_after:,} ({saved:.1%} saved); "
                     f"{self.seconds * 1e3:.1f} ms")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()
