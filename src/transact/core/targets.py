"""The kept widths of a pruning step (``Targets``): resolved from a recipe's counts or fractions against a
model's shape, checked against what the model and its family can hold, before any work.

Every layer keeps the same widths, so the pruned model has a standard config. Without ``kv_heads`` a
grouped-query model keeps its group size; a mixture of experts keeps ``experts`` experts of ``mlp`` channels
each (a multiple of ``ModelShape.mlp_multiple``) and a shared expert the same share of its channels. A
recipe's ``multiple_of`` rounds every pruned width to what quantized formats and kernels need: the MLP (and
expert) widths to the nearest multiple, the heads to the nearest valid pair whose heads x head_dim is one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from transact.arch import ModelShape
from transact.errors import TransactError

if TYPE_CHECKING:
    from transact.recipes import PruneRecipe
    from transact.recipes.run import Widths


@dataclass(frozen=True)
class Targets:
    """Resolved kept widths per layer; in a mixture of experts ``mlp`` is each expert's width, ``experts``
    the experts kept and ``shared_mlp`` a shared expert's width (None where the model has no such part)."""

    heads: int
    kv_heads: int
    mlp: int
    experts: int | None = None
    shared_mlp: int | None = None  # the shared expert's width, where there is one

    def to_json(self) -> dict[str, int]:
        """The widths a plan records (the experts' only for a mixture of experts, so other plans read as before)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def __repr__(self) -> str:  # the fields a dense model does not use are left out
        return f"Targets({', '.join(f'{k}={v}' for k, v in self.to_json().items())})"

    def widths(self) -> list[int]:
        """[heads, kv_heads, mlp], and the experts kept in a mixture of experts (how run reports record them)."""
        return [self.heads, self.kv_heads, self.mlp] + ([self.experts] if self.experts is not None else [])

    def describe(self) -> str:
        """heads/kv/mlp, and the experts kept where there are experts."""
        widths = f"{self.heads}/{self.kv_heads}/{self.mlp}"
        if self.experts is not None:
            widths += f", {self.experts} experts"
        return widths if self.shared_mlp is None else f"{widths}, shared expert {self.shared_mlp}"


def resolve_targets(recipe: PruneRecipe | Widths, shape: ModelShape, *, multiple_of: int | None = None) -> Targets:
    """Turn the recipe's widths into counts for this model, or raise naming what is impossible.
    ``multiple_of`` (default: the prune recipe's own) rounds every pruned width to a multiple of it.

    A dimension left unset keeps its full width. Without ``kv_heads``, an MHA model keeps kv = heads and a
    GQA model keeps its group size (so heads must be a multiple of it; a fraction is rounded to whole
    groups). A fractional ``heads`` with an explicit ``kv_heads`` rounds to the nearest multiple of it.
    """
    if all(getattr(recipe, name) is None for name in ("heads", "kv_heads", "mlp", "experts")):
        raise TransactError("nothing to prune: give heads, kv_heads, mlp and/or experts")
    H, K, g = shape.num_heads, shape.num_kv_heads, shape.group_size
    mha = H == K

    if recipe.kv_heads is not None:
        kv = recipe.kv_heads.of(K)
        if recipe.heads is None:
            heads = kv * g
        elif recipe.heads.is_fraction:
            heads = kv * max(1, round(recipe.heads.value * H / kv))
        else:
            heads = recipe.heads.of(H)
    elif recipe.heads is None:
        heads, kv = H, K
    elif mha:
        heads = kv = recipe.heads.of(H)
    elif recipe.heads.is_fraction:
        kv = max(1, round(recipe.heads.value * K))
        heads = kv * g
    else:
        heads = recipe.heads.of(H)
        if heads % g:
            raise TransactError(
                f"--heads {heads}: this model has {H} query heads in {K} KV groups of {g}; without --kv-heads "
                f"the group size is kept, so heads must be a multiple of {g}. Give --kv-heads explicitly "
                f"(valid pairs: {valid_head_pairs(shape)})."
            )
        kv = heads // g

    mlp = shape.intermediate_size if recipe.mlp is None else recipe.mlp.of(shape.intermediate_size)
    if recipe.mlp is not None and recipe.mlp.is_fraction:  # to the nearest width the family can hold
        mlp = max(shape.mlp_multiple, shape.mlp_multiple * round(mlp / shape.mlp_multiple))
    if multiple_of is None:
        multiple_of = recipe.multiple_of
    multiple = math.lcm(multiple_of, shape.mlp_multiple)
    if multiple_of > 1:
        heads, kv = heads_on_multiple(heads, kv, shape, multiple_of)
        mlp = width_on_multiple(mlp, shape.intermediate_size, multiple, "mlp" if not shape.is_moe else "expert")
    experts = recipe.experts
    if experts is not None and not shape.is_moe:
        raise TransactError("--experts: this model has no experts (its MLPs are dense); prune its channels with --mlp")
    if shape.is_moe:
        experts = shape.num_experts if experts is None else experts.of(shape.num_experts)
    targets = Targets(heads, kv, mlp, experts, shared_width(shape, mlp, multiple))
    check_targets(targets, shape)
    return targets


def shared_width(shape: ModelShape, mlp: int, multiple: int | None = None) -> int | None:
    """The shared expert's kept width for experts of ``mlp`` channels: the same share of its own width, to
    a multiple of ``multiple`` (default ``mlp_multiple``; None where there is no shared expert)."""
    if shape.shared_expert_size is None:
        return None
    if mlp == shape.intermediate_size:
        return shape.shared_expert_size
    share = shape.shared_expert_size * mlp / shape.intermediate_size
    return width_on_multiple(share, shape.shared_expert_size, multiple or shape.mlp_multiple, "shared expert",
                             pruned=True)


def width_on_multiple(width: float, total: int, multiple: int, what: str, *, pruned: bool = False) -> int:
    """``width`` rounded to the nearest multiple of ``multiple`` that is at least one multiple and at most
    ``total``; the full width (unpruned, unless ``pruned``) stays as it is."""
    if width == total and not pruned:
        return total
    if total < multiple:
        raise TransactError(f"{what} {round(width)}: the model's width {total} is less than the multiple {multiple}")
    return min(max(multiple, multiple * round(width / multiple)), total // multiple * multiple)


def heads_on_multiple(heads: int, kv: int, shape: ModelShape, multiple: int) -> tuple[int, int]:
    """The valid (heads, kv heads) pair nearest to the one asked whose attention width (heads x head_dim) is a
    multiple of ``multiple``; ties go to more heads, then more KV heads. Unpruned heads stay as they are."""
    if heads == shape.num_heads and kv == shape.num_kv_heads:
        return heads, kv
    fitting = [(h, k) for h, k in head_pairs(shape)
               if (h * shape.head_dim) % multiple == 0 and (h, k) != (shape.num_heads, shape.num_kv_heads)]
    if not fitting:
        step = multiple // math.gcd(multiple, shape.head_dim)
        raise TransactError(f"--multiple-of {multiple}: heads x head_dim ({shape.head_dim}) is a multiple of "
                            f"{multiple} only for head counts that are multiples of {step}, and no pruned pair of "
                            f"this model has one (valid pairs: {valid_head_pairs(shape)})")
    return min(fitting, key=lambda p: (abs(p[0] - heads), abs(p[1] - kv), -p[0], -p[1]))


def check_targets(t: Targets, shape: ModelShape) -> None:
    """Reject impossible widths with a message that says what is possible."""
    H, K, g, P = shape.num_heads, shape.num_kv_heads, shape.group_size, shape.intermediate_size
    if not 1 <= t.kv_heads <= K:
        raise TransactError(f"kv heads {t.kv_heads}: must be between 1 and the model's {K}")
    if not 1 <= t.heads <= H:
        raise TransactError(f"heads {t.heads}: must be between 1 and the model's {H}")
    if t.heads % t.kv_heads:
        raise TransactError(f"heads {t.heads} is not a multiple of kv heads {t.kv_heads}")
    if t.heads // t.kv_heads > g:
        raise TransactError(
            f"heads {t.heads} in {t.kv_heads} KV groups needs {t.heads // t.kv_heads} query heads per group, "
            f"but each group has only {g} (valid pairs: {valid_head_pairs(shape)})"
        )
    rule = shape.head_rule
    if rule is not None and t.heads not in rule.counts:
        raise TransactError(f"heads {t.heads}: {rule.why} (valid pairs: {valid_head_pairs(shape)})")
    what = "channels per expert" if shape.is_moe else "mlp"
    if not 1 <= t.mlp <= P:
        raise TransactError(f"{what} {t.mlp}: must be between 1 and the model's {P}")
    if t.mlp % shape.mlp_multiple and t.mlp != P:
        m = shape.mlp_multiple
        nearest = ", ".join(map(str, _nearest_multiples(t.mlp, m, P)))
        raise TransactError(f"{what} {t.mlp}: must be a multiple of {m} (transformers' grouped expert kernel needs "
                            f"rows of whole 16-byte blocks); nearest: {nearest}")
    if shape.is_moe != (t.experts is not None):
        raise TransactError("expert counts apply to mixtures of experts only" if t.experts is not None else
                            "a mixture of experts needs the number of experts to keep")
    if (shape.shared_expert_size is None) != (t.shared_mlp is None):
        raise TransactError("a shared expert's width applies to models with one" if t.shared_mlp is not None else
                            "a model with a shared expert needs its kept width")
    if t.shared_mlp is not None and not 1 <= t.shared_mlp <= shape.shared_expert_size:
        raise TransactError(f"shared expert {t.shared_mlp}: must be between 1 and the model's "
                            f"{shape.shared_expert_size}")
    if shape.is_moe and not shape.experts_per_token <= t.experts <= shape.num_experts:
        raise TransactError(f"experts {t.experts}: must be between the {shape.experts_per_token} experts each token "
                            f"is routed to and the model's {shape.num_experts}")


def _nearest_multiples(width: int, multiple: int, total: int) -> list[int]:
    below = width // multiple * multiple
    return [w for w in (below, below + multiple) if 1 <= w <= total]


def head_pairs(shape: ModelShape) -> list[tuple[int, int]]:
    """Every (heads, kv heads) pair this model can be pruned to (within its family's head rule)."""
    allowed = shape.head_rule.counts if shape.head_rule is not None else None
    return [(kv * per, kv) for kv in range(1, shape.num_kv_heads + 1) for per in range(1, shape.group_size + 1)
            if allowed is None or kv * per in allowed]


def valid_head_pairs(shape: ModelShape) -> str:
    """The (heads, kv heads) pairs this model can be pruned to, in words."""
    pairs = [f"{heads}/{kv}" for heads, kv in head_pairs(shape)]
    if len(pairs) <= 24:
        return "heads/kv " + ", ".join(pairs)
    rule = f"heads = kv x (1..{shape.group_size})"
    allowed = shape.head_rule.counts if shape.head_rule is not None else None
    return rule if allowed is None else f"{rule}, heads one of {', '.join(map(str, allowed))}"
