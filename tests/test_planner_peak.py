"""The training planner's total against MLX's measured peak of real optimizer steps.

The peak of a step is the larger of two moments (tinymoe.planner.train_peak): the end of the
forward pass (weights, optimizer state, activations) and the update (weights, optimizer state,
gradients and the update's new copies). The plain sum of the parts counts activations and the
update's copies as if they were alive together; these measurements show they are not.
"""

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.config import ModelConfig, TrainConfig, validate
from tinymoe.nn.model import Model
from tinymoe.optim.factory import make_optimizer
from tinymoe.planner import plan
from tinymoe.train.step import Stepper

# 6 blocks like the `small` preset, narrower so that a step takes about a second on a CPU.
SHAPE = {"vocab_size": 256, "d_model": 128, "n_layers": 6, "n_heads": 4, "n_kv_heads": 4, "d_ff": 512,
         "moe_experts": 8, "moe_topk": 2, "expert_hidden": 512}
TOLERANCE = 0.15


def measured_peak(cfg: ModelConfig, batch: int, grad_accum: int = 1, steps: int = 1) -> int:
    """Bytes MLX allocated at its peak over building the model and optimizer and `steps` steps,
    less what was allocated before (arrays other tests left alive)."""
    train = TrainConfig(batch_size=batch, grad_accum=grad_accum, optimizer="adamw", dispatch="gather")
    validate(cfg, train)
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = Model(cfg, train.dispatch)
    optimizer = make_optimizer(train.optimizer, train.lr, [train.beta1, train.beta2], train.weight_decay,
                               train.optimizer_state_dtype, "float32")
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    stepper = Stepper(model, optimizer, cfg, train)
    rng = np.random.default_rng(0)

    def micro_batch():
        tokens = rng.integers(0, cfg.vocab_size, size=(batch, cfg.context + 1)).astype(np.int32)
        return tokens[:, :-1], tokens[:, 1:]

    for i in range(steps):
        stepper.step([micro_batch] * grad_accum, i)
    return mx.get_peak_memory() - before


@pytest.mark.parametrize("context, bound", [(256, "activations"), (128, "update")])
def test_train_plan_is_within_15_percent_of_the_measured_peak(context, bound):
    cfg = ModelConfig(**SHAPE, context=context)
    peak = measured_peak(cfg, batch=4)
    result = plan(cfg, batch=4)
    parts = result["bytes"]
    assert abs(result["total_bytes"] / peak - 1) < TOLERANCE, (result["total_bytes"], peak, parts)
    # the case exercises the side of the max it is named after
    assert (parts["activations"] > parts["gradients"] + parts["update_transient"]) == (bound == "activations")
    # The plain sum, which holds the activations through the update, is far above the peak.
    assert sum(parts.values()) > (1 + 2 * TOLERANCE) * peak, (sum(parts.values()), peak)


def test_gradient_accumulation_holds_one_micro_batch_of_activations_and_the_gradient_sum():
    cfg = ModelConfig(**SHAPE, context=256)
    peak = measured_peak(cfg, batch=4, grad_accum=2)
    result = plan(cfg, batch=4, grad_accum=2)
    parts = result["bytes"]
    assert abs(result["total_bytes"] / peak - 1) < TOLERANCE, (result["total_bytes"], peak, parts)
    assert parts["activations"] + parts["gradients"] > parts["gradients"] + parts["update_transient"]
    # Not every micro-batch's activations at once (the step evaluates the running sum between them).
    steady = parts["weights"] + parts["optimizer"] + parts["gradients"]
    assert peak < steady + 1.5 * parts["activations"], (peak, parts)
