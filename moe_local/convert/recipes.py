"""Which scheme each routed-expert projection gets: one scheme everywhere, or a mixed recipe.

A recipe answers `scheme_for(layer, projection)`. It is built from `--scheme` (a scheme name or a
built-in recipe name) plus the user's overrides, which win in this order (highest first):

1. `--layers A-B=SCHEME`  (layer indices as in the checkpoint, inclusive; later flags win)
2. `--keep PROJ=SCHEME`   (gate_proj / up_proj / down_proj, or Mixtral's w1 / w3 / w2)
3. the built-in recipe's own rules (first/last MoE layer, per-projection)
4. the recipe's default scheme

A SCHEME may carry a group size: `int4:128`. Otherwise `--group-size` applies to every scheme that
has a `group_size` parameter. Built-in recipes follow the dynamic 1.58-bit DeepSeek-R1 quant:
the bulk of the routed experts at ~1.6 bits, while the layers and tensors that errors hurt most
(first and last MoE layers, shared experts, attention, embeddings, dense layers) stay precise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from moe_local.errors import MoeLocalError
from moe_local.formats.schemes import get_scheme

PROJ_ALIASES = {
    "gate": "gate", "gate_proj": "gate", "w1": "gate",
    "up": "up", "up_proj": "up", "w3": "up",
    "down": "down", "down_proj": "down", "w2": "down",
}
# --dense: how the non-expert matrices are stored (norms, biases and routers always stay precise).
# int8 is per output channel; int4 uses groups of 32, chosen by measured quality (docs/quality.md: g32/g64/g128).
DENSE_SCHEMES = {"bf16": None, "int8": "int8", "int4": "int4:32"}


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme name and its parameters, hashable and JSON-friendly."""

    name: str
    params_json: str = "{}"

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def build(self):
        return get_scheme(self.name, **self.params)

    def label(self) -> str:
        g = self.params.get("group_size")
        return f"{self.name}:{g}" if g else self.name


def scheme_spec(name: str, group_size: int | None = None) -> SchemeSpec:
    """`int4` or `int4:128` -> SchemeSpec, checking the name (and group size) against the registry."""
    base, _, group = name.partition(":")
    base = base.strip()
    params: dict[str, Any] = {}
    defaults = get_scheme(base).params  # raises MoeLocalError listing the valid names
    if group:
        if not group.isdigit() or int(group) <= 0:
            raise MoeLocalError(f"bad group size in {name!r}: expected SCHEME:N with N a positive integer")
        if "group_size" not in defaults:
            raise MoeLocalError(f"scheme {base!r} takes no group size (in {name!r})")
        params["group_size"] = int(group)
    elif group_size is not None and "group_size" in defaults:
        params["group_size"] = int(group_size)
    get_scheme(base, **params)  # validate the parameters now, not half-way through a run
    return SchemeSpec(base, json.dumps({**defaults, **params}, sort_keys=True))


def dense_spec(dense: str) -> "SchemeSpec | None":
    """The scheme of the non-expert matrices for a `--dense` value (None: stored as bf16)."""
    base, _, group = dense.partition(":")
    spec = DENSE_SCHEMES[base]
    return None if spec is None else scheme_spec(f"{base}:{group}" if group else spec)


@dataclass(frozen=True)
class BuiltinRecipe:
    experts: str
    edge_layers: str | None  # first and last MoE layer
    projections: dict[str, str]
    dense: str
    description: str


BUILTIN_RECIPES: dict[str, BuiltinRecipe] = {
    "ds-dynamic-1.58": BuiltinRecipe(
        experts="ternary:128",
        edge_layers="int4:64",
        projections={},
        dense="bf16",
        description="routed experts ternary (1.6 b/w) except the first and last MoE layers at int4; "
                    "shared experts, attention, embeddings, routers and dense layers bf16",
    ),
    "ds-dynamic-2.2": BuiltinRecipe(
        experts="ternary:128",
        edge_layers="int4:64",
        projections={"down": "int4:64"},
        dense="bf16",
        description="as ds-dynamic-1.58 but down_proj at int4 everywhere (the projection most hurt by 1.58 bits)",
    ),
}


@dataclass
class Recipe:
    name: str
    default: SchemeSpec
    dense: str = "bf16"
    edge_layers: SchemeSpec | None = None
    projections: dict[str, SchemeSpec] = field(default_factory=dict)
    keep: dict[str, SchemeSpec] = field(default_factory=dict)
    layers: list[tuple[int, int, SchemeSpec]] = field(default_factory=list)

    def scheme_for(self, layer: int, proj: str, moe_layers: list[int]) -> SchemeSpec:
        for first, last, spec in reversed(self.layers):
            if first <= layer <= last:
                return spec
        if proj in self.keep:
            return self.keep[proj]
        if self.edge_layers is not None and moe_layers and layer in (moe_layers[0], moe_layers[-1]):
            return self.edge_layers
        return self.projections.get(proj, self.default)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "default": {"scheme": self.default.name, "params": self.default.params},
            "dense": self.dense,
            "edge_layers": None if self.edge_layers is None else self.edge_layers.label(),
            "projections": {k: v.label() for k, v in self.projections.items()},
            "keep": {k: v.label() for k, v in self.keep.items()},
            "layers": [[a, b, s.label()] for a, b, s in self.layers],
        }


_LAYERS_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*=\s*(\S+)\s*$")


def build_recipe(
    scheme: str,
    group_size: int | None = None,
    keep: list[str] | None = None,
    layers: list[str] | None = None,
    dense: str | None = None,
) -> Recipe:
    """Parse `--scheme/--group-size/--keep/--layers/--dense` into a Recipe (MoeLocalError on bad input)."""
    builtin = BUILTIN_RECIPES.get(scheme)
    if builtin is not None:
        recipe = Recipe(
            name=scheme,
            default=scheme_spec(builtin.experts),
            dense=builtin.dense,
            edge_layers=scheme_spec(builtin.edge_layers) if builtin.edge_layers else None,
            projections={p: scheme_spec(s) for p, s in builtin.projections.items()},
        )
        if group_size is not None:
            recipe.default = scheme_spec(builtin.experts.partition(":")[0], group_size)
    else:
        try:
            recipe = Recipe(name=scheme, default=scheme_spec(scheme, group_size))
        except MoeLocalError as exc:
            raise MoeLocalError(f"{exc}; or a built-in recipe: {', '.join(BUILTIN_RECIPES)}") from None
    for item in keep or []:
        proj, sep, spec = item.partition("=")
        if not sep or proj.strip() not in PROJ_ALIASES:
            raise MoeLocalError(f"bad --keep {item!r}: expected PROJ=SCHEME with PROJ one of gate_proj, up_proj, down_proj")
        recipe.keep[PROJ_ALIASES[proj.strip()]] = scheme_spec(spec.strip(), group_size)
    for item in layers or []:
        m = _LAYERS_RE.match(item)
        if not m:
            raise MoeLocalError(f"bad --layers {item!r}: expected A-B=SCHEME or A=SCHEME (e.g. 0-2=int8)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise MoeLocalError(f"bad --layers {item!r}: the range ends before it starts")
        recipe.layers.append((first, last, scheme_spec(m.group(3), group_size)))
    if dense is not None:
        base, _, group = dense.partition(":")
        if base not in DENSE_SCHEMES or (group and base != "int4"):
            raise MoeLocalError(f"bad --dense {dense!r}: expected one of {', '.join(DENSE_SCHEMES)} (or int4:GROUP)")
        dense_spec(dense)  # a bad int4 group size is refused now
        recipe.dense = dense
    return recipe
