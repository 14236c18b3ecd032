"""The router registry against the routers it describes: constructors and options, extra
parameters, the active-expert rule measured on real routing, causality, and one parameter count
shared by the model, the planner and the importer."""

import dataclasses
import inspect

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tinymoe.config import ModelConfig, load_preset, validate
from tinymoe.errors import TinyMoeError
from tinymoe.interop.import_hf import param_counts as import_counts
from tinymoe.nn import routers
from tinymoe.nn.model import Model, count_params
from tinymoe.nn.moe import MoELayer
from tinymoe.planner import param_counts
from tinymoe.router_registry import (LAYER_OPTIONS, ROUTER_OPTIONS, ROUTERS, SPECS, active_experts, check_router,
                                     option_users, spec_of)

# A valid MoE setting for each router (switch needs top-1; dynamic gets a k_max above moe_topk).
SETTINGS = {"topk": {}, "switch": {"moe_topk": 1}, "noisy": {}, "jitter": {}, "sigmoid-bias": {},
            "expert-choice": {}, "smart": {}, "dynamic": {"k_max": 3}}
CASES = [(name, SETTINGS[name]) for name in ROUTERS] + [
    ("expert-choice", {"capacity_factor": 1.5}),  # 1.5 x K experts per token on average
    ("expert-choice", {"capacity_factor": 0.5}),
    ("topk", {"capacity_factor": 1.25}),  # token-choice capacity drops slots, still computes K
    ("dynamic", {"k_min": 2, "k_max": 4}),
]


def _cfg(name, overrides, **more):
    base = dataclasses.replace(load_preset("debug")[0], moe_experts=6, moe_topk=2, shared_experts=1, router=name)
    cfg = dataclasses.replace(base, **{**overrides, **more})
    validate(cfg)
    return cfg


def test_settings_cover_every_router():
    assert set(SETTINGS) == set(ROUTERS)


@pytest.mark.parametrize("name", ROUTERS)
def test_each_spec_names_a_router_class_taking_exactly_its_options(name):
    spec = spec_of(name)
    cls = getattr(routers, spec.cls)
    assert issubclass(cls, routers.Router)
    params = list(inspect.signature(cls.__init__).parameters)
    assert params[1:5] == ["d_model", "num_experts", "top_k", "norm"]
    assert tuple(params[5:]) == spec.options
    assert set(spec.options) <= set(ROUTER_OPTIONS)


def test_every_router_option_is_read_by_some_router():
    assert set(ROUTER_OPTIONS) == {o for spec in SPECS.values() for o in spec.options} | set(LAYER_OPTIONS)
    assert set(ROUTER_OPTIONS) <= {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("name", ROUTERS)
def test_constructor_defaults_are_the_config_defaults(name):
    """make_router without options builds what a default ModelConfig asks for."""
    defaults = ModelConfig()
    sig = inspect.signature(getattr(routers, spec_of(name).cls).__init__)
    for option in spec_of(name).options:
        assert sig.parameters[option].default == getattr(defaults, option), option


@pytest.mark.parametrize("name", ROUTERS)
def test_extra_parameters_are_what_the_router_holds(name):
    E, D = 6, 8
    router = routers.make_router(name, D, E, 1 if name == "switch" else 2)
    held = {k: v.shape for k, v in tree_flatten(router.parameters())}
    want = {"weight": (E, D), **{p.name: p.dims(E, D) for p in spec_of(name).extra}}
    assert held == want
    trainable = {k for k, _ in tree_flatten(router.trainable_parameters())}
    assert trainable == {"weight", *(p.name for p in spec_of(name).extra if p.trainable)}


@pytest.mark.parametrize("name, overrides", CASES)
def test_active_experts_is_what_the_layer_computes(name, overrides):
    """Expert-token pairs the MoE layer's experts compute, per token, in training: the slots of a
    token-choice router (dropped or unused ones are gated to 0, still computed), or each expert's
    C tokens for expert choice."""
    cfg = _cfg(name, overrides)
    layer = MoELayer.from_config(cfg)
    layer.train(True)
    T = 24  # T * K * factor / E is a whole number for every case, so no rounding of C
    x = mx.array(np.random.default_rng(0).normal(size=(T, cfg.d_model)).astype(np.float32))
    route = layer.router(x, mx.random.key(0))
    pairs = route.tokens_EC.size if route.tokens_EC is not None else route.indices.size
    assert pairs / T == pytest.approx(active_experts(cfg))


@pytest.mark.parametrize("name", ROUTERS)
def test_the_causal_flag_is_what_the_model_does(name):
    cfg = _cfg(name, SETTINGS[name])
    mx.random.seed(0)
    model = Model(cfg, "dense")
    model.train(False)
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 24)))
    full = np.array(model(tokens)[0][:, :12])
    prefix = np.array(model(tokens[:, :12])[0])
    assert np.allclose(full, prefix, atol=1e-4) == spec_of(name).causal


@pytest.mark.parametrize("name, overrides", CASES)
def test_model_planner_and_importer_count_the_same_parameters(name, overrides):
    cfg = _cfg(name, overrides, moe_first_dense=1, tie_embeddings=False)
    model = Model(cfg, "dense")
    weights = dict(tree_flatten(model.parameters()))
    counted, planned, imported = count_params(model), param_counts(cfg), import_counts(cfg, weights)
    assert counted["total"] == planned.total == imported["total"]
    assert counted["active"] == planned.active == imported["active"]
    # The active count by hand: everything but the experts a token does not compute.
    moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers))
    idle = moe_layers * (cfg.moe_experts - active_experts(cfg)) * planned.per_expert
    assert planned.active == planned.total - round(idle)


@pytest.mark.parametrize("option", [o for o in ROUTER_OPTIONS if o not in LAYER_OPTIONS])
def test_an_option_is_refused_by_exactly_the_routers_that_do_not_read_it(option):
    defaults = ModelConfig()
    changed = {"router_order": "topk-softmax", "k_max": 3, "router_groups": 2}.get(option)
    for name in ROUTERS:
        base = dict(SETTINGS[name], moe_experts=6, moe_topk=SETTINGS[name].get("moe_topk", 2), router=name)
        value = changed if changed is not None else type(getattr(defaults, option))(getattr(defaults, option) / 2
                                                                                     if option != "k_min" else 2)
        cfg = dataclasses.replace(defaults, **{**base, option: value})
        if name in option_users(option):
            try:
                check_router(cfg)
            except TinyMoeError as exc:  # a value this router rejects is fine; "not for you" is not
                assert "applies to router" not in str(exc)
        else:
            with pytest.raises(TinyMoeError, match=f"{option} applies to router .*not '{name}'"):
                check_router(cfg)


def test_export_knows_every_router():
    """Each router either maps to a Hugging Face routing or says why it cannot (never silently)."""
    from tinymoe.interop.hf_config import INFERENCE_ROUTING, NOT_EXPORTABLE

    assert set(INFERENCE_ROUTING) | set(NOT_EXPORTABLE) == set(ROUTERS)
    assert not set(INFERENCE_ROUTING) & set(NOT_EXPORTABLE)
