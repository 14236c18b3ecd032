"""Self-test of the MoE fast paths on the machine at hand, for `tinymoe selftest`.

Every sparse dispatch backend is run against `dense` (the reference: every expert on every
token) on a few routed problems chosen for their edges (k=1, k=E, a single token, an expert that
receives no token, all tokens on one expert), comparing the layer output and the gradients wrt
x, the gates and the three stacked expert weights. The fused dispatch ops (gather_rows, combine)
and their custom vjps are compared with the plain indexing formulas and MLX's own autodiff of
those, which shares no code with them. Each row of the report names the implementation that
actually ran (a Metal kernel, a CUDA kernel, or the pure-MLX fallback), so a report pasted into
a bug says what was tested. Everything runs in float32, float16 and bfloat16 (the dtypes a Mac
user trains with), except where the device cannot: `mx.gather_mm` on the CPU is float32 only.
The report opens with the kernels' first-use check (tinymoe.nn.kernels.trust), which it re-runs
and stores, and the path `--moe-dispatch auto` takes; the kernel rows then run the kernels
whatever that verdict, so a failure shows up row by row.

A check passes when max |got - want| <= atol + rtol * max |want|: float32 results of the same
maths in a different summation order differ by a few ulps of the largest value, while a real
indexing or gradient bug is off by O(1) of it. Half-precision runs are compared with the float32
reference on the same rounded inputs, with tolerances of a few roundings of their dtype.
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
from tinymoe.nn.kernels import launch, trust

RTOL = 2e-4
ATOL = 1e-5
GRAD_NAMES = ("x", "gates", "w_gate", "w_up", "w_down")
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# (atol, rtol) of a whole layer (three matmuls, SwiGLU, combine) and its gradients in a half
# dtype against float32: every intermediate is rounded, so a few percent of the largest value
# for bfloat16 (8 bits of mantissa); a wrong index or gradient is still off by O(1).
BACKEND_TOLERANCE = {mx.float32: (ATOL, RTOL), mx.float16: (1e-3, 1e-2),
                     mx.bfloat16: (1e-2, 6e-2)}


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
    dtype: str = "float32"


@dataclass
class Report:
    environment: dict
    checks: list[Check] = field(default_factory=list)
    kernel_check: dict = field(default_factory=dict)  # see kernel_status()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and self.kernel_check.get("passed") is not False

    def to_dict(self) -> dict:
        rows = [asdict(c) for c in self.checks]
        for row in rows:  # JSON has no inf/NaN: a crashed or NaN check reads as a string
            for key in ("max_abs_err", "tolerance"):
                if not math.isfinite(row[key]):
                    row[key] = str(row[key])
        return {"passed": self.passed, "environment": self.environment,
                "kernel_check": self.kernel_check, "checks": rows}


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


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def _f64(a) -> np.ndarray:
    return np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, np.float64)


def _compare(pairs, atol=ATOL, rtol=RTOL) -> tuple[float, float, bool, str]:
    """pairs: [(name, got, want)] -> (max abs err, tolerance, all passed, name) of the pair that
    is furthest out of (or closest to) its tolerance."""
    rows = []
    for name, got, want in pairs:
        got, want = _f64(got), _f64(want)
        if got.shape != want.shape:
            return float("inf"), 0.0, False, f"{name}: shape {got.shape} != {want.shape}"
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        tol = atol + rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
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
    """What the fused dispatch ops run here for `dtype` (kernels only on a GPU default device)."""
    if dtype not in launch.KERNEL_DTYPES:
        return f"reference ({dtype} has no kernel)"
    backend = launch.device_backend()
    if backend is not None:
        return f"{backend} kernel"
    if launch.metal_available() or launch.cuda_available():
        return "reference (default device is the CPU)"
    return "reference fallback (no Metal)"


def backend_implementation(name: str, dtype=mx.float32) -> str:
    """What a dispatch backend runs (the device is in the report's header)."""
    return {
        "dense": "every expert on every token",
        "gather": "mx.gather_mm",
        "grouped": "matmuls per expert segment",
        "metal": f"{kernel_implementation(dtype)} + mx.gather_mm",
    }.get(name, name)


def backend_dtypes(name: str) -> tuple:
    """The dtypes a backend can run here: `mx.gather_mm` on the CPU is float32 only."""
    if name in ("gather", "metal") and not launch.default_device_is_gpu():
        return (mx.float32,)
    return DTYPES


def check_backend(name: str, case: Case, seed: int = 0, dtype=mx.float32) -> Check:
    x, idx, gates, w = routed_problem(case, seed)
    probe = mx.array(np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32))
    low = [a.astype(dtype) for a in (x, gates, *w)]  # the run's inputs; the reference gets them
    ref_y, ref_g = _layer_outputs("dense", low[0].astype(mx.float32), idx,  # exactly, in float32
                                  low[1].astype(mx.float32), [a.astype(mx.float32) for a in low[2:]],
                                  probe)
    op, impl = f"{name} vs dense", backend_implementation(name, dtype)
    try:
        y, g = _layer_outputs(name, low[0], idx, low[1], low[2:], probe)
    except Exception as exc:  # a crash is a failed row, not the end of the report
        return Check(op, case.name, impl, float("inf"), 0.0, False, _error_text(exc),
                     _dtype_name(dtype))
    pairs = [("forward", y, ref_y)] + [(f"d{n}", a, b) for n, a, b in zip(GRAD_NAMES, g, ref_g)]
    err, tol, ok, worst = _compare(pairs, *BACKEND_TOLERANCE[dtype])
    return Check(op, case.name, impl, err, tol, ok, worst, _dtype_name(dtype))


def check_kernel_ops(case: Case, seed: int = 0, dtype=mx.float32) -> list[Check]:
    """gather_rows and combine, forward and vjp, against the naive indexing formulas (and MLX's
    autodiff of them) in float32 on the same rounded inputs."""
    x, idx, gates, _ = routed_problem(case, seed)
    order, pos = dispatch_plan(np.array(idx))
    K = case.K
    rng = np.random.default_rng(seed + 2)
    ys = mx.array(rng.standard_normal((case.T * K, case.D)).astype(np.float32))  # (N, D)
    dxs = mx.array(rng.standard_normal((case.T * K, case.D)).astype(np.float32))  # (N, D)
    dy = mx.array(rng.standard_normal((case.T, case.D)).astype(np.float32))  # (T, D)
    x, gates, ys, dxs, dy = (a.astype(dtype) for a in (x, gates, ys, dxs, dy))
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731  the naive side's exact upcast

    naive_gather = lambda a: a[order // K]  # noqa: E731
    naive_combine = lambda a, g: mx.sum(a[pos] * g[..., None], axis=1)  # noqa: E731

    def gather_forward():
        return [("xs", kd.gather_rows(x, order, K, pos), naive_gather(f32(x)))]

    def gather_vjp():
        _, (got,) = mx.vjp(lambda a: kd.gather_rows(a, order, K, pos), [x], [dxs])
        _, (want,) = mx.vjp(naive_gather, [f32(x)], [f32(dxs)])
        return [("dx", got, want)]

    def combine_forward():
        return [("y", kd.combine(ys, pos, gates, order), naive_combine(f32(ys), f32(gates)))]

    def combine_vjp():
        _, got = mx.vjp(lambda a, g: kd.combine(a, pos, g, order), [ys, gates], [dy])
        _, want = mx.vjp(naive_combine, [f32(ys), f32(gates)], [f32(dy)])
        return [("dys", got[0], want[0]), ("dgates", got[1], want[1])]

    impl = kernel_implementation(dtype)
    rows = []
    for op, compute in (("gather_rows forward", gather_forward), ("gather_rows vjp", gather_vjp),
                        ("combine forward", combine_forward), ("combine vjp", combine_vjp)):
        try:
            err, tol, ok, worst = _compare(compute(), *trust.TOLERANCE[dtype])
        except Exception as exc:  # a crash is a failed row, not the end of the report
            err, tol, ok, worst = float("inf"), 0.0, False, _error_text(exc)
        rows.append(Check(op, case.name, impl, err, tol, ok, worst, _dtype_name(dtype)))
    return rows


# --------------------------------------------------------------------------- entry points


def environment() -> dict:
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": "gpu" if launch.default_device_is_gpu() else "cpu",
        "metal_available": bool(launch.metal_available()),
        "cuda_available": bool(launch.cuda_available()),
        "gpu": trust.device_name() if launch.metal_available() or launch.cuda_available() else None,
        "blas": tm_backend.blas_in_use(),
        "reference": "dense backend in float32; naive indexing + MLX autodiff for the kernel ops",
        "tolerance": f"max|got - want| <= atol + rtol * max|want|; float32: {ATOL:g} + {RTOL:g}",
    }


def kernel_status(refresh: bool = False) -> dict:
    """The kernels' first-use verdict here (re-run when `refresh`) and the path `--moe-dispatch
    auto` takes; for `tinymoe selftest` and `tinymoe doctor`."""
    gpu, backend = launch.default_device_is_gpu(), launch.device_backend()
    status = {"kernels": backend, "passed": None, "summary": "", "verdict": None}
    if backend is None:
        status["summary"] = ("not run: no kernel backend on this GPU" if gpu else
                             "not run: the default device is the CPU, where no kernel runs")
    else:
        v = trust.verdict(refresh=refresh)
        status["passed"], status["verdict"] = v.ok, asdict(v)
        status["summary"] = (f"passed ({v.checks} comparisons in {v.seconds:.2f} s; {v.origin})"
                             if v.ok else f"FAILED ({v.failed} of {v.checks}): {v.failure}")
    with trust.quiet():  # the report names the failure; no stderr warning on top
        status["auto_dispatch"] = dispatch.resolve_backend("auto")
    return status


def run_selftest(backends=None, seed: int = 0) -> Report:
    """Run every check; `backends` defaults to every sparse dispatch backend. The first-use check
    is re-run (and stored); the rows run the kernels whatever its verdict."""
    names = [b for b in (backends or dispatch.BACKENDS) if b != "dense"]
    report = Report(environment(), kernel_check=kernel_status(refresh=True))
    with trust.bypass():
        for name in names:
            for dtype in backend_dtypes(name):
                for case in BACKEND_CASES:
                    report.checks.append(check_backend(name, case, seed, dtype))
        for dtype in DTYPES:
            for case in KERNEL_CASES:
                report.checks.extend(check_kernel_ops(case, seed, dtype))
    return report


def format_report(report: Report) -> str:
    env, kc = report.environment, report.kernel_check
    lines = [f"tinymoe selftest: MLX {env['mlx']} on {env['platform']} ({env['device']}), "
             f"Metal {'available' if env['metal_available'] else 'unavailable'}, "
             f"BLAS {env['blas']}",
             f"kernels: {kc.get('kernels') or 'none'}; first-use check {kc.get('summary', '?')}; "
             f"--moe-dispatch auto -> {kc.get('auto_dispatch', '?')}",
             f"pass if {env['tolerance']} (half dtypes: a few roundings of the dtype)", ""]
    w_op = max(len(c.op) for c in report.checks)
    w_case = max(len(c.case) for c in report.checks)
    w_impl = max(len(c.implementation) for c in report.checks)
    head = (f"{'check':{w_op}}  {'case':{w_case}}  {'dtype':8}  {'ran':{w_impl}}  result  "
            f"max abs err  worst")
    lines += [head, "-" * len(head)]
    for c in report.checks:
        lines.append(f"{c.op:{w_op}}  {c.case:{w_case}}  {c.dtype:8}  {c.implementation:{w_impl}}  "
                     f"{'ok  ' if c.passed else 'FAIL'}    {c.max_abs_err:11.2e}  {c.worst}")
    failed = sum(not c.passed for c in report.checks)
    lines += ["", f"{len(report.checks) - failed} passed, {failed} failed"
              + ("" if kc.get("kernels") else
                 "; no GPU kernels ran here, so the kernel rows ran the pure-MLX fallback")
              + ("" if env["device"] == "gpu" else "; gather/metal: float32 only on the CPU")]
    if not report.passed:
        lines.append("please report this with the output of `tinymoe selftest --json`")
    return "\n".join(lines)
