"""The expert seam: the one place where routed experts are executed.

Model code never owns routed-expert weights. After routing, an MoE layer asks its provider
"run these experts of layer L on these tokens, weighted like this" (`ExpertProvider.forward`).
Where an expert lives (resident tensors, a quantized pack in RAM, a slot in the GPU cache) is the
provider's business; what an expert *is* lives here:

- `ExpertWeights`: the three projections of one SwiGLU expert. Each projection is either a plain
  tensor `[out, in]` or a packed/quantized object with `.linear(x)` (see `moe_local.formats`), so the
  same compute path serves bf16 experts and packed ones. Optional per-projection biases and a gated
  activation object (`ClampedSwiGLU`) serve gpt-oss; experts with either take this generic path.
- `ExpertSource`: where experts come from (a Hugging Face checkpoint, a pack); `load(layer, e)`.
- `combine_experts`: the dispatch loop shared by every provider. It visits experts in ascending id
  order whatever is cached, so the arithmetic (and therefore the tokens) cannot depend on cache state.
- `ExpertPredictor`: what a model offers a provider that prefetches (its router look-ahead). The
  model and the cache meet only here: the cache never looks inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class PackedLinear(Protocol):
    """A weight matrix kept in some packed form, expanded only inside its own matmul."""

    shape: tuple[int, int]  # (out_features, in_features)

    def linear(self, x: torch.Tensor) -> torch.Tensor: ...


Projection = Union[torch.Tensor, PackedLinear]


def project(x: torch.Tensor, w: Projection, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for a plain tensor or a packed weight. The bias is rounded to x's dtype
    first, whatever it is stored in (a pack's float32 bias viewed in a cache slot, or a resident
    copy already cast), so every provider adds the same values."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w.linear(x)
    return y if bias is None else y + bias


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


# --------------------------------------------------------------------------- gated activations
# Most experts compute act(gate) * up with a unary `act` from ACTIVATIONS. An activation that needs
# both halves at once (gpt-oss clamps them and adds 1 to up) is an object with `combine(gate, up)`;
# providers take either kind from `activation(...)`, and ExpertWeights calls whichever it is given.
@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation: gate clamped above at `limit`, up clamped to [-limit, limit],
    then (up + 1) * gate * sigmoid(alpha * gate) (transformers' GptOssExperts._apply_gate)."""

    alpha: float = 1.702
    limit: float = 7.0
    name: str = "clamped_swiglu"

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


@dataclass(frozen=True)
class LimitedSwiGLU(ClampedSwiGLU):
    """DeepSeek-V4's expert activation: silu(min(gate, limit)) * clamp(up, -limit, limit) (gpt-oss's
    clamps without its alpha and its + 1; transformers' DeepseekV4Experts._apply_gate)."""

    name: str = "limited_swiglu"

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)


Activation = Union[Callable[[torch.Tensor], torch.Tensor], ClampedSwiGLU]


def activation(act: "str | ClampedSwiGLU") -> Activation:
    """What a provider calls experts with: a unary function by config name (`hidden_act`), or a
    gated activation object as given (a family's `ModelArgs.expert_act`)."""
    return ACTIVATIONS[act] if isinstance(act, str) else act


@dataclass
class ExpertWeights:
    """One routed expert: down(act(gate(x)) * up(x)), or down(act.combine(gate(x), up(x))) for a
    gated activation object; each projection optionally adds a bias (gpt-oss: None elsewhere)."""

    gate: Projection  # [I, H]
    up: Projection  # [I, H]
    down: Projection  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    @property
    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.gate_bias, self.up_bias, self.down_bias

    def __call__(self, x: torch.Tensor, act: Activation) -> torch.Tensor:
        g, u = project(x, self.gate, self.gate_bias), project(x, self.up, self.up_bias)
        h = act.combine(g, u) if isinstance(act, ClampedSwiGLU) else act(g) * u
        return project(h, self.down, self.down_bias)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ExpertWeights":
        def move(w: Projection) -> Projection:
            if isinstance(w, torch.Tensor):
                return w.to(device=device, dtype=dtype if w.is_floating_point() else None)
            return w.to(device) if device is not None else w

        biases = (None if b is None else move(b) for b in self.biases)
        return ExpertWeights(move(self.gate), move(self.up), move(self.down), *biases)

    def nbytes(self) -> int:
        total = 0
        for w in (self.gate, self.up, self.down, *self.biases):
            if w is not None:
                total += w.numel() * w.element_size() if isinstance(w, torch.Tensor) else int(w.nbytes)
        return total


class ExpertSource(Protocol):
    """Where routed experts are read from (a checkpoint or a pack)."""

    moe_layers: Sequence[int]  # layer indices that have routed experts
    num_experts: int

    def load(self, layer: int, expert: int) -> ExpertWeights: ...


Prediction = tuple[int, int, list[int]]  # (depth, target MoE layer, expert ids, most confident first)


@runtime_checkable
class ExpertPredictor(Protocol):
    """A model's router look-ahead (`CausalLM.lookahead(depth, extra)`, models/lookahead.py).

    Sites name where in a decoder layer a hidden state was taken: "attn" (the normed input of its
    attention) or "mlp" (the normed input of its MLP -- for an MoE layer, the `x` its provider is
    called with). A prefetching provider calls `predict` with each MoE layer's input, and `listen`s
    at `sources()`: the points before the first MoE layer's routing (dense layers' MLP inputs, the
    first MoE layer's attention input) at which the model hands over its hidden state, so that the
    first MoE layer is predicted too.
    """

    depth: int  # MoE layers ahead
    extra: int  # spare ids per token beyond each router's top-k

    def sources(self) -> list[tuple[int, str]]:
        """(layer, site) points `listen` reports, in execution order; [] when there are none."""
        ...

    def predict(self, layer: int, x: torch.Tensor, site: str = "mlp") -> list[Prediction]:
        """x [T, H]: the normed hidden state at (layer, site). One entry per MoE layer of the next
        `depth` (nearest first): the ids its router picks for x, then the spares."""
        ...

    def listen(self, callback: Callable[[int, torch.Tensor, str], None]) -> Callable[[], None]:
        """Have the model call `callback(layer, x, site)` at every source during its forward passes;
        returns the function that stops it."""
        ...


class ExpertProvider(Protocol):
    """What an MoE layer calls once routing is decided."""

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; ids, weights: [T, k]. Returns sum_k weights * expert_ids(x), shape [T, H]."""
        ...


def combine_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    fetch: Callable[[int], ExpertWeights],
    act: Activation,
) -> torch.Tensor:
    """Weighted sum of the routed experts' outputs, experts visited in ascending id order.

    `fetch(e)` returns expert e ready for compute on x's device; a cache may block inside it until
    the expert has arrived. Each token's contribution is scaled by its routing weight in the
    router's dtype and accumulated with index_add_ in x's dtype, as the reference implementation does.
    """
    out = torch.zeros_like(x)
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    # Token and weight of every (token, slot) pair in expert order, gathered once: inside the loop
    # each expert only slices them (no per-expert kernels beyond its own compute).
    tokens_sorted = order // ids.shape[-1]
    weights_sorted = weights.reshape(-1)[order, None]
    start = 0
    for e, n in zip(*torch.stack((experts, counts)).tolist()):  # one device->host sync, not two
        tokens = tokens_sorted[start : start + n]
        y = fetch(e)(x[tokens], act)
        y = y * weights_sorted[start : start + n]
        out.index_add_(0, tokens, y.to(out.dtype))
        start += n
    return out


class LayerKernel(Protocol):
    """A whole MoE layer in one call over prepared experts (the CPU kernels, moe_local.formats):
    the same sum as `combine_experts`, experts in ascending id order. Returns None for a batch it
    does not take (e.g. a long prefill), which then runs the generic loop."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None: ...


# experts 0..n-1 of one layer and the activation's name -> its grouped kernel, or None (not covered)
GroupedKernels = Callable[[Sequence[ExpertWeights], "str | ClampedSwiGLU"], "LayerKernel | None"]


class ResidentExperts:
    """The simplest provider: every routed expert loaded once and kept on one device.

    Used for CPU runs and models that fit; the tiered cache (moe_local.cache) replaces it without
    any change to model code. `grouped` (default: the source's `grouped_kernel`, which a pack
    offers) prepares each layer's experts for one kernel call per layer; layers it does not cover
    run `combine_experts`.
    """

    def __init__(
        self,
        source: ExpertSource,
        act: "str | ClampedSwiGLU" = "silu",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        progress: Callable[[int], None] | None = None,
        grouped: GroupedKernels | None = None,
    ) -> None:
        self.act = activation(act)
        self.experts: dict[tuple[int, int], ExpertWeights] = {}
        # A source with checksums (a pack) checks each expert's bytes on its first use, so resident
        # experts are as protected as the ones the cache reads; loading itself stays lazy (no bytes read).
        self._verify: Callable[[int, int], None] | None = getattr(source, "verify_expert", None)
        self._verified: set[tuple[int, int]] = set()
        for layer in source.moe_layers:
            for e in range(source.num_experts):
                self.experts[(layer, e)] = source.load(layer, e).to(device, dtype)
                if progress is not None:
                    progress(1)
        grouped = grouped if grouped is not None else getattr(source, "grouped_kernel", None)
        self.kernels: dict[int, LayerKernel | None] = {}
        if grouped is not None:
            for layer in source.moe_layers:
                self.kernels[layer] = grouped([self.experts[(layer, e)] for e in range(source.num_experts)], act)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        kernel = self.kernels.get(layer)
        if kernel is not None:
            if self._verify is not None and len(self._verified) < len(self.experts):
                for e in set(ids.reshape(-1).tolist()):
                    self._fetch(layer, e)  # checksum on first use, as on the generic path
            y = kernel(x, ids, weights)
            if y is not None:
                return y
        return combine_experts(x, ids, weights, lambda e: self._fetch(layer, e), self.act)

    def _fetch(self, layer: int, e: int) -> ExpertWeights:
        if self._verify is not None and (layer, e) not in self._verified:
            self._verify(layer, e)  # raises CheckpointError naming the file, layer and expert
            self._verified.add((layer, e))
        return self.experts[(layer, e)]

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.experts.values())


class ExpertBytesSource(ExpertSource, Protocol):
    """Experts stored as one contiguous byte range each (a moe-local pack): what the tiered cache pages.

    Implemented by the pack reader (moe_local.formats.pack). The cache copies `view(l, e)` (or
    `read_into`) into a slot of its own (pinned RAM, GPU) and then calls `decode(slot_bytes, l, e)`
    to get compute-ready packed weights that *view* that slot, expanded only inside their matmul.
    """

    def expert_nbytes(self, layer: int, expert: int) -> int: ...

    def max_expert_nbytes(self) -> int: ...

    def view(self, layer: int, expert: int) -> torch.Tensor:
        """uint8 tensor over the memory-mapped range (zero copy; the OS pages it in)."""
        ...

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        """One read of the expert's range into `out` (uint8, CPU, maybe pinned); checksum-checked."""
        ...

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        """Compute-ready weights viewing `buf` (any device) without copying it."""
        ...
