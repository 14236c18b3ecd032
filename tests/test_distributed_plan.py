"""`tinymoe plan --ranks N [--expert-parallel N]` against counts taken from a built model and
traffic worked out by hand for the debug preset."""

import pytest
from click.testing import CliRunner

from debug_run import one_error_line
from tinymoe.cli.main import cli
from tinymoe.config import load_preset
from tinymoe.distributed_plan import plan_ranks
from tinymoe.errors import TinyMoeError
from tinymoe.planner import plan


def _built_counts(cfg):
    """(all parameters, expert parameters) of the real model."""
    from mlx.utils import tree_flatten

    from tinymoe.nn.model import Model

    flat = tree_flatten(Model(cfg, "dense").parameters())
    return sum(a.size for _, a in flat), sum(a.size for n, a in flat if ".moe.experts." in n)


def test_data_parallel_rank_holds_everything_and_sends_the_gradients_once():
    cfg, _ = load_preset("debug")
    total, _ = _built_counts(cfg)
    result = plan_ranks(cfg, ranks=2, batch=4, grad_accum=3)
    alone = plan(cfg, batch=2)  # one process with one rank's rows
    exchange = result["bytes"].pop("gradient_exchange")
    assert result["bytes"] == alone["bytes"] and exchange == 2 * 4 * total
    assert result["sent_per_step"] == {"gradients": int(2 * 1 / 2 * 4 * total), "expert_exchange": 0}
    four = plan_ranks(cfg, ranks=4, batch=4)
    assert four["sent_per_step"]["gradients"] == int(2 * 3 / 4 * 4 * total)


def test_expert_parallel_rank_holds_its_experts_and_sends_activations():
    cfg, _ = load_preset("debug")  # d 32, 2 MoE layers, 4 experts top-2, context 32
    total, expert = _built_counts(cfg)
    result = plan_ranks(cfg, ranks=2, expert_parallel=2, batch=4, grad_accum=3)
    dp = plan_ranks(cfg, ranks=2, batch=4)
    assert result["bytes"]["weights"] == (total - expert // 2) * 4
    assert result["bytes"]["optimizer"] == 2 * (total - expert // 2) * 4
    assert result["bytes"]["activations"] == dp["bytes"]["activations"]
    assert result["sent_per_step"]["gradients"] == int(4 * (total - expert))
    # Per layer and micro-batch, T = 2 rows x 32 = 64 tokens: x, outputs and their gradients
    # 6 (N-1) T D floats, ids and gates with the gates' gradient (N-1) T K (4 + 3 x 4) bytes.
    per_layer = 6 * 64 * 32 * 4 + 64 * 2 * 16
    assert result["sent_per_step"]["expert_exchange"] == 2 * per_layer * 3


def test_impossible_layouts_are_refused():
    cfg, _ = load_preset("debug")
    for kwargs, fragment in [({"ranks": 3, "batch": 4}, "does not split over 3 ranks"),
                             ({"ranks": 2, "expert_parallel": 3, "batch": 4}, "no sub-groups"),
                             ({"ranks": 4, "expert_parallel": 4, "batch": 8, "optimizer": "sparse-adamw"}, "adamw"),
                             ({"ranks": 8, "expert_parallel": 8, "batch": 8}, "do not split over 8 ranks")]:
        with pytest.raises(TinyMoeError, match=fragment):
            plan_ranks(cfg, **kwargs)


def test_cli_plans_ranks_and_refuses_expert_parallel_alone():
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", "--preset", "debug", "--ranks", "2", "--expert-parallel", "2"])
    assert out.exit_code == 0, out.output
    assert "experts split over 2 ranks" in out.output and "expert_exchange" in out.output
    one_error_line(runner.invoke(cli, ["plan", "--preset", "debug", "--expert-parallel", "2"]), "--ranks")
    one_error_line(runner.invoke(cli, ["plan", "--preset", "debug", "--ranks", "3"]), "does not split over 3")
