"""adafactor against a plain numpy transcription of its formulas; lazy expert state; resume."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tinymoe.optim.adafactor import Adafactor
from tinymoe.cli.main import cli
from tinymoe.optim.factory import make_optimizer

E, R, C = 3, 4, 5
EXPERTS, MATRIX, VECTOR = "blocks.0.moe.experts.w_up", "blocks.0.attn.weight", "norm.weight"
# Which experts get gradient in each step: expert 1 starts late and pauses, expert 2 never.
ACTIVE = [[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]]


def _params():
    mx.random.seed(1)
    return {"blocks": [{"moe": {"experts": {"w_up": mx.random.normal((E, R, C))}},
                        "attn": {"weight": mx.random.normal((R, C))}}],
            "norm": {"weight": mx.ones((C,))}}


def _grads(params, active):
    g = tree_map(lambda p: mx.random.normal(p.shape), params)
    w = g["blocks"][0]["moe"]["experts"]["w_up"]
    g["blocks"][0]["moe"]["experts"]["w_up"] = w * mx.array(active, dtype=mx.float32)[:, None, None]
    return g


class NumpyAdafactor:
    """The paper's formulas written out for one slice at a time, in float64."""

    def __init__(self, wd, beta1):
        self.wd, self.beta1, self.slots = wd, beta1, {}

    def step(self, key, w, g, lr):
        s = self.slots.setdefault(key, {"t": 0, "m": np.zeros_like(g)})
        s["t"] += 1
        b2 = 1.0 - s["t"] ** -0.8
        g2 = g * g + 1e-30
        if g.ndim == 2:
            s["r"] = b2 * s.get("r", 0.0) + (1 - b2) * g2.mean(axis=1)
            s["c"] = b2 * s.get("c", 0.0) + (1 - b2) * g2.mean(axis=0)
            v = np.outer(s["r"], s["c"]) / s["r"].mean()
        else:
            v = s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g2
        u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / 1.0)
        if self.beta1 is not None:
            u = s["m"] = self.beta1 * s["m"] + (1 - self.beta1) * u
        return w * (1 - lr * self.wd) - lr * u


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_updates_match_a_numpy_transcription(beta1):
    schedule = lambda step: 0.02 * min(1.0, (step + 1) / 3)  # noqa: E731  warmup over 3 steps
    opt = Adafactor(schedule, beta1=beta1, weight_decay=0.1)
    ref = NumpyAdafactor(wd=0.1, beta1=beta1)
    params = _params()
    opt.init(params)
    want = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(params)}
    for step, active in enumerate(ACTIVE):
        grads = _grads(params, active)
        lr = schedule(step)
        g = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(grads)}
        want[MATRIX] = ref.step(MATRIX, want[MATRIX], g[MATRIX], lr)
        want[VECTOR] = ref.step(VECTOR, want[VECTOR], g[VECTOR], lr)
        for e in np.flatnonzero(active):
            want[EXPERTS][e] = ref.step((EXPERTS, e), want[EXPERTS][e], g[EXPERTS][e], lr)
        new = opt.apply_gradients(grads, params)
        params = tree_unflatten(list(new.items()))
        for name in (MATRIX, VECTOR, EXPERTS):
            np.testing.assert_allclose(np.array(new[name]), want[name], rtol=2e-5, atol=2e-6,
                                       err_msg=f"{name}, step {step}")
        # Tolerance alone would let a wrong formula through on a small step: the update moved it.
        assert not np.allclose(np.array(new[MATRIX]), np.array(_params()["blocks"][0]["attn"]["weight"]))
    counts = {e: s["t"] for e, s in opt.experts[EXPERTS].items()}
    assert counts == {0: 4, 1: 3}  # per-expert step counts; expert 2 never had state


def test_idle_expert_gets_no_state_and_stays_bit_identical():
    opt = Adafactor(1e-2, weight_decay=0.1)
    params = _params()
    before = np.array(params["blocks"][0]["moe"]["experts"]["w_up"])
    opt.init(params)
    assert opt.experts[EXPERTS] == {}  # nothing before any gradient
    for _ in range(4):
        params = tree_unflatten(list(opt.apply_gradients(_grads(params, [1, 1, 0]), params).items()))
    after = np.array(params["blocks"][0]["moe"]["experts"]["w_up"])
    assert sorted(opt.experts[EXPERTS]) == [0, 1]
    assert not any(k.startswith(f"{EXPERTS}.expert2.") for k in opt.state)
    assert after[2].tobytes() == before[2].tobytes()  # no update, no weight decay
    assert not np.array_equal(after[0], before[0])
    # Factored state: rows and columns only, per expert and for the plain matrix.
    assert opt.state[f"{EXPERTS}.expert0.vr"].shape == (R,) and opt.state[f"{EXPERTS}.expert0.vc"].shape == (C,)
    assert opt.state[f"{MATRIX}.vr"].shape == (R,) and opt.state[f"{VECTOR}.v"].shape == (C,)


def test_a_row_and_a_column_without_gradient_stay_finite():
    # Their statistics are both eps1 = 1e-30, and outer(r, c) = 1e-60 underflows in float32.
    opt = Adafactor(1e-2, weight_decay=0.1)
    w = mx.random.normal((R, C))
    g = mx.random.normal((R, C)) * (mx.arange(R) != 0)[:, None] * (mx.arange(C) != 0)[None, :]
    new = np.array(opt.apply_gradients({"w": g}, {"w": w})["w"])
    assert np.all(np.isfinite(new))
    np.testing.assert_array_equal(new[0], np.array(w[0] * (1 - 1e-2 * 0.1)))  # only weight decay


def test_bfloat16_state_is_half_the_bytes_and_close_to_float32():
    full, half = Adafactor(1e-2, weight_decay=0.1), Adafactor(1e-2, weight_decay=0.1, state_dtype="bfloat16")
    a = b = _params()
    full.init(a)
    half.init(b)
    for active in ACTIVE:
        grads = _grads(a, active)
        a = tree_unflatten(list(full.apply_gradients(grads, a).items()))
        b = tree_unflatten(list(half.apply_gradients(grads, b).items()))
    stats = lambda opt: {k: v for k, v in opt.state.items() if k.rsplit(".", 1)[-1] in ("vr", "vc", "v")}  # noqa: E731
    assert all(v.dtype == mx.bfloat16 for v in stats(half).values())
    assert sum(v.nbytes for v in stats(half).values()) * 2 == sum(v.nbytes for v in stats(full).values())
    for (name, x), (_, y) in zip(tree_flatten(a), tree_flatten(b)):
        assert y.dtype == mx.float32 and np.all(np.isfinite(np.array(y)))
        np.testing.assert_allclose(np.array(y), np.array(x), atol=5e-3, err_msg=name)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_state_round_trip_continues_identically(tmp_path, state_dtype):
    opt = Adafactor(lambda s: 1e-2 / (s + 1), weight_decay=0.1, state_dtype=state_dtype)
    params = _params()
    opt.init(params)
    for active in ACTIVE[:3]:
        params = tree_unflatten(list(opt.apply_gradients(_grads(params, active), params).items()))
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), opt.state)
    copy = Adafactor(lambda s: 1e-2 / (s + 1), weight_decay=0.1, state_dtype=state_dtype)
    copy.state = tree_unflatten(list(mx.load(str(tmp_path / "opt.safetensors")).items()))
    for active in ACTIVE[3:]:
        grads = _grads(params, active)
        a, b = opt.apply_gradients(grads, params), copy.apply_gradients(grads, params)
        assert {k: np.array(v).tobytes() for k, v in a.items()} == {k: np.array(v).tobytes() for k, v in b.items()}
        params = tree_unflatten(list(a.items()))


def test_restoring_another_optimizers_state_is_an_error():
    from tinymoe.errors import TinyMoeError
    from tinymoe.optim.sparse_adamw import SparseAdamW

    adamw = SparseAdamW(1e-2)
    adamw.init(_params())
    with pytest.raises(TinyMoeError, match="adafactor"):
        Adafactor(1e-2).state = adamw.state


def _losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus"
    path.mkdir()
    (path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    return path


def test_cli_trains_with_adafactor_and_the_loss_falls(tmp_path, corpus):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--optimizer", "adafactor", "--steps", "20",
                                      "--log-every", "1", "--data", str(corpus), "--out", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    losses = [loss for _, loss in _losses(out)]
    assert losses[-1] < 0.5 * losses[0], losses  # about 6.6 -> 1.4 on this repetitive text
    bad = CliRunner().invoke(cli, ["train", "--preset", "debug", "--set", "optimizer=adafactr",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "adafactor" in bad.output


def test_make_optimizer_builds_adafactor():
    opt = make_optimizer("adafactor", 1e-3, [0.9, 0.95], 0.1, "bfloat16")
    assert isinstance(opt, Adafactor) and opt.beta1 is None and opt.state_dtype == mx.bfloat16
