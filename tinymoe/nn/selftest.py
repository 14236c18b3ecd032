"""Self-test of the MoE fast paths on the machine at hand, for `tinymoe selftest`.

Every sparse dispatch backend is run against `dense` (the reference: every expert on every
token) on a few routed problems chosen for their edges (k=1, k=E, a single token, an expert that
receives no token, all tokens on one expert), comparing the layer output and the gradients wrt
x, the gates and the three stacked expert weights. The fused dispatch ops (gather_rows, combine)
and their custom vjps are compared with the plain indexing formulas and MLX's own autodiff of
those, which shares no code with them. Each row of the report names the implementation that
actually ran (a Metal kernel, a CUDA kernel, or the pure-MLX fallback), so a report pasted into
a bug says what was tested.

A check passes when max |got - want| <= ATOL + RTOL * max |want|: float32 results of the same
maths in a different summation order differ by a few ulps of the largest value, while a real
indexing or gradient bug is off by O(1) of it.
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

from tinymoe import backend as tm_backend
from tinymoe.nn import dispatch
from tinymoe.nn.kernels import dispatch as kd

RTOL = 2e-4
ATOL = 1e-5
GRAD_NAMES = ("x", "gates", "w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class Case:
    """One routed problem: T tokens of width D, E experts of hidden width H, k slots per token.
    `routing` is "random" (distinct experts per token), "skip" (experts 0 and E-1 get no token)
    or "one" (every slot goes to expert E // 2)."""

    name: str
    T: int
    E: int
    K: int
    D: int = 32
    H: int = 24
    routing: str = "random"


BACKEND_CASES = (
    Case("T=64 E=8 k=2", 64, 8, 2, D=64, H=48),
    Case("k=1", 33, 4, 1),
    Case("k=E", 12, 4, 4),
    Case("T=1 (decode)", 1, 8, 2),
    Case("experts with no tokens", 24, 6, 2, routing="skip"),
    Case("all tokens on one expert", 16, 4, 1, routing="one"),
)

KERNEL_CASES = (
    Case("T=50 k=2 D=96", 50, 8, 2, D=96),
    Case("experts with no tokens", 9, 5, 2, D=16, routing="skip"),
    Case("k=E", 6, 4, 4, D=12),
    Case("T=1 (decode)", 1, 8, 2, D=64),
)


@dataclass
class Check:
    """One row of the report."""

    op: str  # what was compared, e.g. "grouped vs dense" or "combine vjp dgates"
    case: str
    implementation: str  # what actually ran
    max_abs_err: float
    tolerance: float
    passed: bool
    worst: str = ""  # the quantity with the largest error relative to its tolerance


@dataclass
class Report:
    environment: dict
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        rows = [asdict(c) for c in self.checks]
        for row in rows:  # JSON has no inf/NaN: a crashed or NaN check reads as a string
            for key in ("max_abs_err", "tolerance"):
                if not math.isfinite(row[key]):
                    row[key] = str(row[key])
        return {"passed": self.passed, "environment": self.environment, "checks": rows}


# --------------------------------------------------------------------------- problems


def routed_problem(case: Case, seed: int = 0):
    """(x (T, D), indices (T, K) uint32, gates (T, K), [w_gate, w_up (E, H, D), w_down (E, D, H)])."""
    rng = np.random.default_rng(seed)
    T, E, K, D, H = case.T, case.E, case.K, case.D, case.H
    if case.routing == "one":
        idx = np.full((T, K), E // 2)
    else:
        pool = np.arange(1, E - 1) if case.routing == "skip" else np.arange(E)
        idx = np.stack([rng.choice(pool, K, replace=False) for _ in range(T)])
    x = rng.standard_normal((T, D)).astype(np.float32)
    gates = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    gates /= gates.sum(axis=1, keepdims=True)
    w = [(rng.standard_normal(s) / np.sqrt(s[2])).astype(np.float32)
         for s in ((E, H, D), (E, H, D), (E, D, H))]
    return mx.array(x), mx.array(idx.astype(np.uint32)), mx.array(gates), [mx.array(a) for a in w]


def dispatch_plan(idx_np: np.ndarray):
    """(order (N,), pos (T, K)) of a stable sort of the flattened indices, built in numpy so the
    kernel checks do not depend on `dispatch.make_plan`."""
    T, K = idx_np.shape
    order = np.argsort(idx_np.reshape(-1), kind="stable").astype(np.uint32)
    pos = np.empty(T * K, np.uint32)
    pos[order] = np.arange(T * K, dtype=np.uint32)
    return mx.array(order), mx.array(pos.reshape(T, K))


# --------------------------------------------------------------------------- comparisons


def _compare(pairs) -> tuple[float, float, bool, str]:
    """pairs: [(name, got, want)] -> (max abs err, tolerance, all passed, name) of the pair that
    is furthest out of (or closest to) its tolerance."""
    rows = []
    for name, got, want in pairs:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            return float("inf"), 0.0, False, f"{name}: shape {got.shape} != {want.shape}"
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        tol = ATOL + RTOL * (float(np.max(np.abs(want))) if want.size else 0.0)
        score = err / tol if err == err else float("inf")  # NaN: the worst possible
        rows.append((score, err, tol, name))
    score, err, tol, name = max(rows, key=lambda r: r[0])
    return err, tol, score <= 1.0, name


def _error_text(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]


def _layer_outputs(backend, x, idx, gates, w, probe):
    """(y (T, D), [grads wrt x, gates, w_gate, w_up, w_down]) of sum(y * probe)."""

    def loss(x, gates, wg, wu, wd):
        return mx.sum(dispatch.run_experts(backend, x, idx, gates, wg, wu, wd) * probe)

    y = dispatch.run_experts(backend, x, idx, gates, *w)
    _, grads = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, gates, *w)
    mx.eval(y, grads)
    return y, list(grads)


def kernel_implementation(dtype=mx.float32) -> str:
    """What the fused dispatch ops run here for `dtype`."""
    if dtype not in kd.KERNEL_DTYPES:
        return f"reference ({dtype} has no kernel)"
    if kd.metal_available():
        return "metal kernel"
    if kd.cuda_available():
        return "cuda kernel"
    return "reference fallback (no Metal)"


def backend_implementation(name: str) -> str:
    """What a dispatch backend runs (the device is in the report's header)."""
    return {
        "dense": "every expert on every token",
        "gather": "mx.gather_mm",
        "grouped": "matmuls per expert segment",
        "metal": f"{kernel_implementation()} + mx.gather_mm",
    }.get(name, name)


def check_backend(name: str, case: Case, seed: int = 0) -> Check:
    x, idx, gates, w = routed_problem(case, seed)
    probe = mx.array(np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32))
    ref_y, ref_g = _layer_outputs("dense", x, idx, gates, w, probe)
    try:
        y, g = _layer_outputs(name, x, idx, gates, w, probe)
    except Exception as exc:  # a crash is a failed row, not the end of the report
        return Check(f"{name} vs dense", case.name, backend_implementation(name), float("inf"),
                     0.0, False, _error_text(exc))
    pairs = [("forward", y, ref_y)] + [(f"d{n}", a, b) for n, a, b in zip(GRAD_NAMES, g, ref_g)]
    err, tol, ok, worst = _compare(pairs)
    return Check(f"{name} vs dense", case.name, backend_implementation(name), err, tol, ok, worst)


def check_kernel_ops(case: Case, seed: int = 0) -> list[Check]:
    """gather_rows and combine, forward and vjp, against the naive indexing formulas."""
    x, idx, gates, _ = routed_problem(case, seed)
    order, pos = dispatch_plan(np.array(idx))
    K = case.K
    rng = np.random.default_rng(seed + 2)
    ys = mx.array(rng.standard_normal((case.T * K, case.D)).astype(np.float32))  # (N, D)
    dxs = mx.array(rng.standard_normal((case.T * K, case.D)).astype(np.float32))  # (N, D)
    dy = mx.array(rng.standard_normal((case.T, case.D)).astype(np.float32))  # (T, D)

    naive_gather = lambda a: a[order // K]  # noqa: E731
    naive_combine = lambda a, g: mx.sum(a[pos] * g[..., None], axis=1)  # noqa: E731

    def gather_forward():
        return [("xs", kd.gather_rows(x, order, K, pos), naive_gather(x))]

    def gather_vjp():
        _, (got,) = mx.vjp(lambda a: kd.gather_rows(a, order, K, pos), [x], [dxs])
        _, (want,) = mx.vjp(naive_gather, [x], [dxs])
        return [("dx", got, want)]

    def combine_forward():
        return [("y", kd.combine(ys, pos, gates, order), naive_combine(ys, gates))]

    def combine_vjp():
        _, got = mx.vjp(lambda a, g: kd.combine(a, pos, g, order), [ys, gates], [dy])
        _, want = mx.vjp(naive_combine, [ys, gates], [dy])
        return [("dys", got[0], want[0]), ("dgates", got[1], want[1])]

    impl = kernel_implementation(x.dtype)
    rows = []
    for op, compute in (("gather_rows forward", gather_forward), ("gather_rows vjp", gather_vjp),
                        ("combine forward", combine_forward), ("combine vjp", combine_vjp)):
        try:
            err, tol, ok, worst = _compare(compute())
        except Exception as exc:  # a crash is a failed row, not the end of the report
            err, tol, ok, worst = float("inf"), 0.0, False, _error_text(exc)
        rows.append(Check(op, case.name, impl, err, tol, ok, worst))
    return rows


# --------------------------------------------------------------------------- entry points


def environment() -> dict:
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "metal_available": bool(kd.metal_available()),
        "cuda_available": bool(kd.cuda_available()),
        "blas": tm_backend.blas_in_use(),
        "reference": "dense backend; naive indexing + MLX autodiff for the kernel ops",
        "tolerance": f"max|got - want| <= {ATOL:g} + {RTOL:g} * max|want|",
    }


def run_selftest(backends=None, seed: int = 0) -> Report:
    """Run every check; `backends` defaults to every sparse dispatch backend."""
    names = [b for b in (backends or dispatch.BACKENDS) if b != "dense"]
    report = Report(environment())
    for name in names:
        for case in BACKEND_CASES:
            report.checks.append(check_backend(name, case, seed))
    for case in KERNEL_CASES:
        report.checks.extend(check_kernel_ops(case, seed))
    return report


def format_report(report: Report) -> str:
    env = report.environment
    lines = [f"tinymoe selftest: MLX {env['mlx']} on {env['platform']} ({env['device']}), "
             f"Metal {'available' if env['metal_available'] else 'unavailable'}, "
             f"BLAS {env['blas']}",
             f"pass if {env['tolerance']}", ""]
    w_op = max(len(c.op) for c in report.checks)
    w_case = max(len(c.case) for c in report.checks)
    w_impl = max(len(c.implementation) for c in report.checks)
    head = f"{'check':{w_op}}  {'case':{w_case}}  {'ran':{w_impl}}  result  max abs err  worst"
    lines += [head, "-" * len(head)]
    for c in report.checks:
        lines.append(f"{c.op:{w_op}}  {c.case:{w_case}}  {c.implementation:{w_impl}}  "
                     f"{'ok  ' if c.passed else 'FAIL'}    {c.max_abs_err:11.2e}  {c.worst}")
    failed = sum(not c.passed for c in report.checks)
    lines += ["", f"{len(report.checks) - failed} passed, {failed} failed"
              + ("" if env["metal_available"] else
                 "; Metal unavailable here, so the kernel rows ran the pure-MLX fallback")]
    return "\n".join(lines)
