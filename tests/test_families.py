"""What every family must provide, checked for each one: a tiny config to test it with, a
checkpoint map that accounts for every tensor of its checkpoints (per-expert and fused layouts), and
the router look-ahead the expert cache prefetches with."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_local.experts import ExpertPredictor, ExpertWeights, ResidentExperts
from moe_local.loading.checkpoint import Checkpoint
from moe_local.models import FAMILIES, build_model, checkpoint_experts, load_weights
from moe_local.models.mixtral import Mixtral
from moe_local.models.weights import unread_tensors, weight_refs
from moe_local.runtime.loader import load_model, resident_provider
from moe_local.formats.schemes import PackedWeight
from tests.tiny import TINY_CONFIGS, VOCAB, mixtral_config, save_tiny, to_mxfp4_checkpoint


def test_every_family_has_a_tiny_config():
    """A family without one is not checked below: add its builder to tests/tiny.py TINY_CONFIGS."""
    assert set(FAMILIES) == set(TINY_CONFIGS)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tiny(TINY_CONFIGS[request.param](), path)
    return path


def saved_fused(path) -> bool:
    """gpt-oss: transformers saves its experts fused (there is no per-expert layout on the hub)."""
    ckpt = Checkpoint(path)
    model = build_model(ckpt.config)
    return checkpoint_experts(model, ckpt).is_fused(model.args.moe_layers[0])


def fuse(path, out) -> None:
    """Rewrite a per-expert checkpoint into the fused layout, using the family's own map for the names.
    A checkpoint saved fused already (gpt-oss) is rewritten into its other hub layout, MXFP4."""
    if saved_fused(path):
        return to_mxfp4_checkpoint(path, out)
    ckpt = Checkpoint(path)
    model = build_model(ckpt.config)
    cmap, a = model.checkpoint_map, model.args
    tensors = load_file(path / "model.safetensors")
    for layer in a.moe_layers:
        g, u, d = zip(*(cmap.expert_names(layer, e) for e in range(a.num_experts)))
        gate_up, down = cmap.fused_names(layer)
        tensors[gate_up] = torch.stack([torch.cat([tensors.pop(x), tensors.pop(y)]) for x, y in zip(g, u)])
        tensors[down] = torch.stack([tensors.pop(z) for z in d])
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_map_accounts_for_every_tensor(tiny_checkpoint, tmp_path):
    fused = tmp_path / "fused"
    fuse(tiny_checkpoint, fused)
    for path in (tiny_checkpoint, fused):
        ckpt = Checkpoint(path)
        model = build_model(ckpt.config)
        assert unread_tensors(model, ckpt) == [], path
        experts = checkpoint_experts(model, ckpt)
        expect = path == fused or saved_fused(tiny_checkpoint)
        assert all(experts.is_fused(layer) == expect for layer in experts.moe_layers)
        assert not any(".experts." in ref.name for ref in weight_refs(model, ckpt))  # experts are no parameters


def test_fused_and_per_expert_layouts_load_the_same_experts(tiny_checkpoint, tmp_path):
    fused = tmp_path / "fused"
    fuse(tiny_checkpoint, fused)
    a, b = Checkpoint(tiny_checkpoint), Checkpoint(fused)
    model = build_model(a.config)
    ea, eb = checkpoint_experts(model, a), checkpoint_experts(model, b)
    for layer in ea.moe_layers:
        for e in (0, ea.num_experts - 1):
            wa, wb = ea.load(layer, e), eb.load(layer, e)
            for p in ("gate", "up", "down"):
                a_w, b_w = getattr(wa, p), getattr(wb, p)
                if isinstance(b_w, PackedWeight):  # MXFP4 kept packed: equals our rounding of the float expert
                    a_w, b_w = b_w.scheme.dequantize(b_w.scheme.quantize(a_w), a_w.shape), b_w.dequantize()
                assert torch.equal(a_w, b_w), (layer, e, p)
            assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(wa.biases, wb.biases))


class RenamedMixtral(Mixtral):
    """A family whose modules are named unlike its checkpoint (here: a checkpoint under `transformer.`)."""

    checkpoint_map = dataclasses.replace(Mixtral.checkpoint_map, renames=(("model.", "transformer."),),
                                         experts="transformer.layers.{layer}.block_sparse_moe.experts")


def test_renames_map_our_parameters_to_the_checkpoint_names(tmp_path):
    save_tiny(mixtral_config(), tmp_path / "plain")
    tensors = {("transformer." + n[len("model."):] if n.startswith("model.") else n): t
               for n, t in load_file(tmp_path / "plain" / "model.safetensors").items()}
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})

    ckpt = Checkpoint(renamed)
    with torch.device("meta"):
        model = RenamedMixtral(RenamedMixtral.Args.from_config(ckpt.config)).eval()
    assert unread_tensors(model, ckpt) == []
    load_weights(model, ckpt, "cpu", torch.float32)
    # the provider the loader gives every CPU run (one grouped kernel call per MoE layer)
    model.experts.provider = resident_provider(checkpoint_experts(model, ckpt), model, torch.device("cpu"), torch.float32)
    reference = load_model(tmp_path / "plain", device="cpu", dtype="float32").model
    ids = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m.setup_cache(8)
    assert torch.equal(model(ids, 0), reference(ids, 0))


# ----------------------------------------------------------------------------- router look-ahead
class RandomExperts:
    """An ExpertSource of random experts (the look-ahead needs a model that runs, not a trained one)."""

    def __init__(self, model) -> None:
        a = model.args
        self.moe_layers, self.num_experts = a.moe_layers, a.num_experts
        self.shape = (a.moe_intermediate_size, a.hidden_size)

    def load(self, layer, expert):
        g = torch.Generator().manual_seed(1000 * layer + expert)
        I, H = self.shape
        return ExpertWeights(*(0.1 * torch.randn(s, generator=g) for s in ((I, H), (I, H), (H, I))))


def random_model(model_type: str):
    """The family's model with random weights, from its tiny config as config.json would hold it."""
    model = build_model(json.loads(TINY_CONFIGS[model_type]().to_json_string()))
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.experts.provider = ResidentExperts(RandomExperts(model))
    return model


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family_offers_the_router_lookahead(model_type):
    """The cache prefetches through CausalLM.lookahead alone (experts.ExpertPredictor); a family whose
    layers broke it would silently prefetch nothing. So for each family: the model hands its hidden
    state over at every source, in execution order, and a prediction from the normed residual
    stream at any source names exactly the experts the later router picks for that same stream."""
    model = random_model(model_type)
    a = model.args
    la = model.lookahead(depth=2)
    assert isinstance(la, ExpertPredictor)
    sources = la.sources()
    assert (a.moe_layers[0], "attn") in sources  # the first MoE layer is predicted before it routes
    assert sources == sorted(sources, key=lambda s: (s[0], s[1] == "mlp"))

    seen = []
    stop = la.listen(lambda layer, x, site: seen.append((layer, site, x.shape)))
    ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(1))
    model.setup_cache(6)
    model(ids, 0)
    stop()
    model(ids, 0)  # stopped: no more calls
    assert seen == [(layer, site, (6, a.hidden_size)) for layer, site in sources]

    h = torch.randn(6, a.hidden_size, generator=torch.Generator().manual_seed(2))
    layers, routers = model.model.layers, model.routers()
    points = sources + [(m, "mlp") for m in a.moe_layers]
    with torch.inference_mode():
        for layer, site in points:
            norm = layers[layer].input_layernorm if site == "attn" else layers[layer].post_attention_layernorm
            predictions = la.predict(layer, norm(h), site)
            later = [m for m in a.moe_layers if m > layer or (site == "attn" and m == layer)]
            assert [(d, t) for d, t, _ in predictions] == list(enumerate(later[:2], start=1))
            for _, target, ranked in predictions:
                want, _ = routers[target](layers[target].post_attention_layernorm(h))
                assert sorted(ranked) == sorted(set(want.flatten().tolist())), (layer, site, target)
