"""Router statistics on hand-built routing, checked against values worked out by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from tinymoe.analysis.stats import LayerAccumulator, count_dead, load_cv, load_shares, routing_stats, specialization_score, spread_windows, token_entropy, top_pairs

LAYER_KEYS = {"layer", "experts", "top_k", "load", "entropy", "max_entropy", "load_cv", "dead_experts",
              "tokens", "drop_rate", "coactivation", "top_pairs", "domain_expert", "expert_domain",
              "specialization"}


def uniform_probs(T, E):
    return np.full((T, E), 1.0 / E)


def test_load_cv_dead_on_known_counts():
    # Slots to experts 0, 0, 1, 2 of E=4: load (.5, .25, .25, 0).
    acc = LayerAccumulator(4, 1)
    acc.add(np.array([[0], [0], [1], [2]]), uniform_probs(4, 4))
    s = acc.stats()
    assert s["load"] == [0.5, 0.25, 0.25, 0.0]
    # mean .25; deviations .25, 0, 0, -.25 -> std sqrt(.125/4) = .1767767 -> CV .7071068
    assert s["load_cv"] == pytest.approx(math.sqrt(0.5), abs=1e-9)
    assert s["dead_experts"] == 1  # 0 < 0.1 * 1/4
    assert s["drop_rate"] == 0.0 and s["tokens"] == 4
    assert load_cv([0.25] * 4) == 0.0
    assert load_cv([1.0, 0, 0, 0]) == pytest.approx(math.sqrt(3))  # sqrt(E-1)
    assert count_dead([0.3, 0.3, 0.38, 0.02]) == 1  # 0.02 < 0.025
    assert count_dead([0.3, 0.3, 0.37, 0.03]) == 0


def test_entropy_uniform_and_certain():
    probs = np.array([[0.25] * 4, [1.0, 0, 0, 0]])
    np.testing.assert_allclose(token_entropy(probs), [math.log(4), 0.0], atol=1e-12)
    acc = LayerAccumulator(4, 1)
    acc.add(np.array([[0], [0]]), probs)
    assert acc.stats()["entropy"] == pytest.approx(math.log(4) / 2)  # 0.693147
    assert acc.stats()["max_entropy"] == pytest.approx(math.log(4))


def test_specialization_separated_mixed_and_in_between():
    assert specialization_score([[5, 5, 0, 0], [0, 0, 3, 3]]) == pytest.approx(1.0)  # disjoint experts
    assert specialization_score([[2, 4, 6], [1, 2, 3]]) == pytest.approx(0.0, abs=1e-12)  # same mix
    # Equal domains, E=2: domain 0 sends 3/4 to expert 0, domain 1 3/4 to expert 1.
    # I = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812 nats; H(D) = ln 2 -> 0.188722 (= 1 - H_b(1/4) in bits)
    assert specialization_score([[3, 1], [1, 3]]) == pytest.approx(0.188722, abs=1e-6)
    assert specialization_score([[4, 4]]) is None  # one domain: H(D) = 0
    assert specialization_score([[0, 0], [0, 0]]) is None


def test_drop_rate_and_load_count_only_kept_slots():
    idx = np.array([[0, 1], [0, 2]])
    kept = np.array([[True, False], [True, True]])  # slot (0, 1) dropped
    acc = LayerAccumulator(3, 2)
    acc.add(idx, uniform_probs(2, 3), kept)
    s = acc.stats()
    assert s["drop_rate"] == pytest.approx(0.25)
    assert s["load"] == pytest.approx([2 / 3, 0.0, 1 / 3])
    no_mask = LayerAccumulator(3, 2)
    no_mask.add(idx, uniform_probs(2, 3))  # missing "kept" = all kept
    assert no_mask.stats()["drop_rate"] == 0.0 and no_mask.stats()["load"] == [0.5, 0.25, 0.25]


def test_coactivation_and_lift():
    # Token expert sets {0,1}, {0,1}, {0,2}, {1,2}.
    acc = LayerAccumulator(3, 2)
    acc.add(np.array([[0, 1], [1, 0], [0, 2], [2, 1]]), uniform_probs(4, 3))
    s = acc.stats()
    c = np.array(s["coactivation"])
    np.testing.assert_allclose(np.diag(c), [0.75, 0.75, 0.5])
    assert c[0, 1] == c[1, 0] == 0.5 and c[0, 2] == 0.25 and c[1, 2] == 0.25
    first = s["top_pairs"][0]
    assert first["experts"] == [0, 1] and first["share"] == 0.5
    assert first["lift"] == pytest.approx(0.5 / (0.75 * 0.75), abs=1e-4)  # 0.8889
    assert top_pairs(np.diag([1.0, 1.0])) == []
    k1 = LayerAccumulator(3, 1)
    k1.add(np.array([[0], [1]]), uniform_probs(2, 3))
    assert k1.stats()["top_pairs"] == []


def test_domain_tables_from_accumulator():
    # Domain 0: slots to 0,1 then 0,1; domain 1: slots to 1,2 then 2,0.
    acc = LayerAccumulator(3, 2, num_domains=2)
    acc.add(np.array([[0, 1], [0, 1], [1, 2], [2, 0]]), uniform_probs(4, 3), domains_T=np.array([0, 0, 1, 1]))
    s = acc.stats([0, 1])
    assert s["domain_expert"] == [[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]
    # expert 0 slots: 2 from domain 0, 1 from domain 1
    np.testing.assert_allclose(s["expert_domain"], [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [0, 1]], atol=1e-6)
    # joint /8: [[2,2,0],[1,1,2]]; p_d = (.5,.5), p_e = (3/8, 3/8, 1/4)
    p = np.array([[2, 2, 0], [1, 1, 2]]) / 8
    pe = p.sum(0)
    mi = sum(p[d, e] * math.log(p[d, e] / (0.5 * pe[e])) for d in range(2) for e in range(3) if p[d, e])
    assert s["specialization"] == pytest.approx(mi / math.log(2), abs=1e-6)
    assert set(s) == LAYER_KEYS - {"layer"}


def test_spread_windows_reaches_the_end():
    assert spread_windows(33, 4, None).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert spread_windows(33, 4, 2).tolist() == [0, 28]
    assert spread_windows(33, 4, 3).tolist() == [0, 16, 28]  # windows 0, 3.5 -> 4, 7
    assert spread_windows(4, 4, 3).tolist() == []  # one window needs context + 1 tokens


class FakeModel:
    """One MoE layer whose router is a rule: token t goes to experts t % 4 and (t + 1) % 4."""

    def __init__(self):
        router = SimpleNamespace(num_experts=4, top_k=2)
        self.blocks = [SimpleNamespace(moe=SimpleNamespace(router=router))]
        self.cfg = SimpleNamespace(moe_experts=4, moe_topk=2)

    def moe_layers(self):
        return [0]

    def train(self, mode):
        pass

    def __call__(self, x, routing=None):
        ids = np.array(x).reshape(-1)  # (T,)
        idx = np.stack([ids % 4, (ids + 1) % 4], axis=1)  # (T, 2)
        probs = np.zeros((ids.size, 4))
        probs[np.arange(ids.size), idx[:, 0]] = 1.0
        routing.append({"indices": idx, "gates": np.ones(idx.shape) / 2, "probs": probs})
        return None, {}


def test_routing_stats_separated_domains_on_a_rule_router():
    # 'a' text is token 0 (experts 0, 1), 'b' text is token 2 (experts 2, 3), one after the other;
    # two windows of 4 out of 8 must come from both halves.
    tokens = np.array([0] * 16 + [2] * 17)
    domains = np.array([0] * 16 + [1] * 17)
    out = routing_stats(FakeModel(), tokens, batch_size=2, context=4, max_batches=1,
                        domain_ids=domains, domain_names=["a", "b"])
    assert out["domains"] == ["a", "b"] and out["domain_tokens"] == [4, 4] and out["tokens"] == 8
    (layer,) = out["layers"]
    assert set(layer) == LAYER_KEYS
    assert layer["domain_expert"] == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    assert layer["specialization"] == pytest.approx(1.0)
    assert layer["load"] == [0.25] * 4 and layer["load_cv"] == 0.0
    assert layer["entropy"] == pytest.approx(0.0)
    assert layer["coactivation"][0][1] == 0.5 and layer["coactivation"][0][2] == 0.0


def test_routing_stats_mixed_domains_score_zero():
    # Both domains alternate the same two tokens: routing cannot tell them apart.
    tokens = np.array([0, 2] * 16 + [0])
    domains = np.array([0] * 16 + [1] * 17)
    out = routing_stats(FakeModel(), tokens, batch_size=8, context=4, domain_ids=domains, domain_names=["a", "b"])
    layer = out["layers"][0]
    assert layer["domain_expert"][0] == layer["domain_expert"][1] == [0.25] * 4
    assert layer["specialization"] == pytest.approx(0.0, abs=1e-12)
    no_domains = routing_stats(FakeModel(), tokens, batch_size=8, context=4)
    assert no_domains["domains"] == [] and no_domains["layers"][0]["specialization"] is None
    assert load_shares([0, 0]).tolist() == [0.0, 0.0]
