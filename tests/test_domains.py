"""Domain experts, the parts: the mapping and its refusals, the supervision loss against a value
worked out by hand, hard routing that never leaves a domain's experts, the sampler's domain ids."""

import math
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from debug_run import one_error_line
from tinymoe.cli.main import cli
from tinymoe.config import TrainConfig, load_preset, validate
from tinymoe.data.batches import BatchSampler
from tinymoe.domains import parse_domain_experts
from tinymoe.errors import TinyMoeError
from tinymoe.nn.moe import MoELayer, domain_loss
from tinymoe.nn.routers import make_router


# ----------------------------------------------------------------------------- mapping and refusals

def test_parse_ranges_single_ids_and_repeats():
    assert parse_domain_experts("code=0-3,prose=4-7", 8) == {"code": [0, 1, 2, 3], "prose": [4, 5, 6, 7]}
    assert parse_domain_experts("a=5, a=0-1 ,b=3", 8) == {"a": [0, 1, 5], "b": [3]}


@pytest.mark.parametrize("text, fragment", [
    ("code=0-3,prose=3-7", "expert 3 is given to both 'code' and 'prose'"),
    ("code=0-8", "expert 8 is out of range"),
    ("code=3-1", "ends before it starts"),
    ("code:0-3", "is not NAME=A-B"),
    ("", "is empty"),
])
def test_parse_refusals(text, fragment):
    with pytest.raises(TinyMoeError, match=re.escape(fragment)):
        parse_domain_experts(text, 8)


def _cfgs(**train):
    model, tr = load_preset("debug")  # 4 experts, top-2
    return model, TrainConfig(**{**tr.__dict__, **train})


@pytest.mark.parametrize("train, model, fragment", [
    ({"domain_experts": "code=0,prose=1-3", "domain_mode": "hard"}, {}, "domain 'code' has 1 expert(s), fewer than top-k 2"),
    ({"domain_experts": "code=0-1", "domain_mode": "sideways"}, {}, "unknown domain mode 'sideways'"),
    ({"domain_weight": 0.1}, {}, "need --domain-experts"),
    ({"secretary": True}, {}, "need --domain-experts"),
    ({"domain_experts": "code=0-1"}, {"router": "sigmoid-bias"}, "works with the topk and jitter routers"),
    ({"domain_experts": "code=0-1"}, {"moe_experts": 1, "moe_topk": 1}, "needs an MoE model"),
    ({"domain_experts": "code=0-1", "domain_weight": -1.0}, {}, "domain_weight must be >= 0"),
])
def test_config_refusals(train, model, fragment):
    m, t = _cfgs(**train)
    for k, v in model.items():
        setattr(m, k, v)
    with pytest.raises(TinyMoeError, match=re.escape(fragment)):
        validate(m, t)


def test_hard_mode_with_enough_experts_is_accepted():
    m, t = _cfgs(domain_experts="code=0-1,prose=2-3", domain_mode="hard")
    validate(m, t)


def test_cli_refuses_an_unknown_domain_name(tmp_path):
    for name in ("code", "prose"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text(f"{name} text. " * 400)
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", f"code={tmp_path / 'code'}",
                                      "--data", f"prose={tmp_path / 'prose'}", "--domain-experts", "code=0-1,legal=2-3",
                                      "--out", str(tmp_path / "run"), "--quiet"])
    one_error_line(result, "unknown domain 'legal'", "code, prose")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_overlap_before_reading_data(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--domain-experts", "code=0-2,prose=2-3",
                                      "--out", str(tmp_path / "run"), "--quiet"])
    one_error_line(result, "expert 2 is given to both")


# ----------------------------------------------------------------------------- the supervision loss

def _router_with_logits(rows):
    """A topk router over D = E inputs whose weight is the identity: logits = the input rows."""
    E = len(rows[0])
    router = make_router("topk", E, E, 2)
    router.weight = mx.eye(E)
    return router, mx.array(rows, dtype=mx.float32)


def test_domain_loss_by_hand():
    # token 0: logits (0, ln 3, 0, 0) -> p = (1, 3, 1, 1)/6; its set {0, 1} holds 4/6: -ln(2/3)
    # token 1: uniform logits -> p = 1/4 each; its set {2, 3} holds 1/2: ln 2
    # token 2: a domain without a mapping: left out of the mean
    probs = mx.softmax(mx.array([[0.0, math.log(3), 0, 0], [0, 0, 0, 0], [5, 0, 0, 0]]), axis=-1)
    allowed = mx.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=mx.bool_)
    mapped = mx.array([1.0, 1.0, 0.0])
    want = (math.log(3 / 2) + math.log(2)) / 2
    assert domain_loss(probs, allowed, mapped).item() == pytest.approx(want, rel=1e-6)


def test_moe_layer_reports_the_loss_in_soft_mode_and_routes_freely():
    layer = MoELayer(4, 4, 2, 8)
    layer.router.weight = mx.eye(4)
    x = mx.array([[0.0, math.log(3), 0, 0], [0, 0, 0, 0]])
    allowed = mx.array([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=mx.bool_)
    routing: list = []
    _, stats = layer(x, routing, domain=(allowed, mx.array([1.0, 1.0])))
    # p(token 0) = (1, 3, 1, 1)/6: its set {2, 3} holds 1/3; token 1 holds 1/2
    assert stats["domain_loss"].item() == pytest.approx((math.log(3) + math.log(2)) / 2, rel=1e-6)
    assert 1 in np.array(routing[0]["indices"][0]).tolist()  # soft: expert 1 (outside the set) still chosen


def test_soft_loss_enters_the_training_loss_with_its_weight(tmp_path):
    """Stepper's total = the same total without domains + domain_weight x domain_loss."""
    from tinymoe.nn.domain import attach_domains
    from tinymoe.nn.model import Model
    from tinymoe.optim.factory import make_optimizer
    from tinymoe.train.step import Stepper

    m, t = _cfgs(domain_experts="a=0-1,b=2-3", domain_weight=0.25)
    mx.random.seed(3)
    model = Model(m, "dense")
    attach_domains(model, {"experts": {"a": [0, 1], "b": [2, 3]}, "mode": "soft", "data_domains": ["a", "b"]})
    x = np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int32)
    d = np.array([[0] * 8, [1] * 8], dtype=np.int32)
    logits, aux = model(mx.array(x[:, :-1]), domains_BL=mx.array(d))
    _, plain = model(mx.array(x[:, :-1]))
    opt = make_optimizer("adamw", 0.0, [0.9, 0.95], 0.0, "float32")
    opt.init(model.trainable_parameters())
    out = Stepper(model, opt, m, t, compile=False, domains=True).step([lambda: (x[:, :-1], x[:, 1:], d)])
    ce = out["loss"]
    want = (ce + m.aux_loss_weight * plain["balance_loss"].item() + m.z_loss_weight * plain["z_loss"].item()
            + 0.25 * aux["domain_loss"].item())
    assert out["domain_loss"] == pytest.approx(aux["domain_loss"].item(), rel=1e-5)
    assert out["total_loss"] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- hard routing

@pytest.mark.parametrize("order, norm, scale", [("softmax-topk", True, 1.0), ("topk-softmax", True, 1.0),
                                                ("softmax-topk", False, 1.0), ("softmax-topk", True, 1000.0)])
def test_hard_mask_never_routes_outside(order, norm, scale):
    """Random sets per token, every path (training, eval, lean); scale 1000 makes allowed
    probabilities underflow to 0 next to a huge outside logit."""
    rng = np.random.default_rng(1)
    T, D, E, K = 64, 16, 8, 2
    router = make_router("topk", D, E, K, norm, router_order=order)
    router.weight = router.weight * scale
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    allowed = np.zeros((T, E), dtype=bool)
    for t in range(T):
        allowed[t, rng.choice(E, size=rng.integers(K, E + 1), replace=False)] = True
    mask = mx.array(allowed)
    for training, lean in ((True, False), (False, False), (False, True)):
        router.train(training)
        route = router(x, None, lean=lean, allowed_TE=mask)
        idx = np.array(route.indices)
        assert all(allowed[t, idx[t]].all() for t in range(T)), (training, lean)
        assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1
        assert np.isfinite(np.array(route.gates)).all()
        if route.probs is not None:
            assert np.array(route.probs)[~allowed].max() == 0.0


def test_hard_mask_with_every_expert_allowed_is_free_routing():
    router = make_router("topk", 16, 8, 2)
    x = mx.random.normal((32, 16))
    free, masked = router(x), router(x, None, allowed_TE=mx.ones((32, 8), dtype=mx.bool_))
    assert np.array_equal(np.array(free.indices), np.array(masked.indices))
    assert np.allclose(np.array(free.gates), np.array(masked.gates), atol=0)


def test_model_in_hard_mode_routes_each_token_within_its_domain():
    from tinymoe.nn.domain import attach_domains, set_domain
    from tinymoe.nn.model import Model

    m, _ = _cfgs()
    model = Model(m, "dense")
    attach_domains(model, {"experts": {"a": [0, 1], "b": [3, 2]}, "mode": "hard", "data_domains": ["a", "b", "c"]})
    tokens = mx.array(np.random.default_rng(2).integers(0, 256, (3, 16)), dtype=mx.int32)
    domains = np.array([[0] * 16, [1] * 16, [2] * 16])  # c: no mapping, routes freely
    routing: list = []
    model(tokens, routing=routing, domains_BL=mx.array(domains))
    for record in routing:
        idx = np.array(record["indices"]).reshape(3, 16, -1)
        assert set(idx[0].ravel()) <= {0, 1} and set(idx[1].ravel()) <= {2, 3}
    model.train(False)
    set_domain(model, "b")  # sampling --domain b: every token, whatever its id
    routing = []
    model(tokens, routing=routing)
    assert all(set(np.array(r["indices"]).ravel()) <= {2, 3} for r in routing)


# ----------------------------------------------------------------------------- the sampler

def test_sampler_domains_ride_along_without_changing_the_batches():
    tokens = np.arange(1000, dtype=np.uint16)  # a token is its own position
    domains = (np.arange(1000) // 100 % 3).astype(np.uint8)
    plain = BatchSampler(tokens, 4, 16, seed=7)
    with_domains = BatchSampler(tokens, 4, 16, seed=7, domains=domains)
    for _ in range(3):
        x, y = plain.next_batch()
        x2, y2, d = with_domains.next_batch()
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert np.array_equal(d, domains[x])  # the domain of each input position
    assert plain.state() == with_domains.state()
