"""Verify before trusting: the fused kernels must pass a check on this machine before they run.

The kernels have been compiled as C++ and syntax-checked off-Mac, never compiled by Apple's
Metal compiler nor run on an Apple GPU by the team. So the first time a process would launch them
on a given tinymoe version, MLX version and GPU, every kernel (the two forward ones and the three
of the backward pass) runs on a few small problems (the selftest's kernel cases, in float32,
float16 and bfloat16: 60 small launches, meant to take well under a second) and is compared
with its pure-MLX reference. The
verdict is kept in the cache folder, keyed by those three, so later processes read it instead
of re-running the check; `tinymoe selftest` re-runs it and replaces it. The ops ask
`kernels_trusted()` before they launch anything (tinymoe.nn.kernels.dispatch); this module
launches the kernels itself, through tinymoe.nn.kernels.launch, so it does not import the ops.

A failed check (a kernel that does not compile, crashes, or gives wrong numbers) is never fatal
by surprise: the kernels stay unused, `--moe-dispatch auto` takes mlx-lm's `gather_mm` path with
one warning line naming the failure and asking for a report, and an explicit `--moe-dispatch
metal` stops with one `error:` line (TinyMoeError). On a machine where no kernel can run (a CPU
default device) there is nothing to check and nothing is written.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from tinymoe.errors import TinyMoeError
from tinymoe.paths import cache_dir
from tinymoe.nn.kernels import launch
from tinymoe.nn.kernels import references as ref

# (T, K, D, E, routing): the selftest's kernel cases. "skip" leaves experts 0 and E-1 idle.
CHECK_CASES = ((50, 2, 96, 8, "random"), (9, 2, 16, 5, "skip"), (6, 4, 12, 4, "random"),
               (1, 2, 64, 8, "random"))
CHECK_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# A correct kernel matches its reference to within a rounding or two of the output dtype (both
# accumulate in float32, in different orders); a wrong index or gradient is off by O(1).
# Pass if max|got - want| <= atol + rtol * max|want|.
TOLERANCE = {mx.float32: (1e-5, 2e-4), mx.float16: (1e-4, 2e-3), mx.bfloat16: (1e-3, 1.6e-2)}
REPORT_HINT = "please report it with the output of `tinymoe selftest --json`"


@dataclass
class Verdict:
    """The outcome of one first-use check, as stored in the cache folder."""

    ok: bool
    backend: str  # "metal" or "cuda"
    device: str
    mlx: str
    tinymoe: str
    failure: str = ""  # the first failed comparison or error, one line
    failed: int = 0
    checks: int = 0
    seconds: float = 0.0
    origin: str = "checked now"  # or "cached <path>"


_VERDICTS: dict[tuple, Verdict] = {}
_state = {"bypass": 0, "quiet": 0, "warned": False}


# --------------------------------------------------------------------------- the check


def _problem(T, K, D, E, routing, dtype, seed=0):
    rng = np.random.default_rng(seed)
    pool = np.arange(1, E - 1) if routing == "skip" else np.arange(E)
    idx = np.stack([rng.choice(pool, K, replace=False) for _ in range(T)])
    order = np.argsort(idx.reshape(-1), kind="stable").astype(np.uint32)
    pos = np.empty(T * K, np.uint32)
    pos[order] = np.arange(T * K, dtype=np.uint32)
    arr = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)  # noqa: E731
    gates = mx.array(rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)).astype(dtype)
    return arr(T, D), arr(T * K, D), arr(T * K, D), arr(T, D), gates, mx.array(order), \
        mx.array(pos.reshape(T, K))


def _comparisons(case, dtype, backend):
    """[(name, got, want)]: each kernel, launched as the ops launch it, against its reference."""
    T, K, D = case[0], case[1], case[2]
    N, ints = T * K, [("D", D), ("K", K)]
    x, ys, dxs, dy, gates, order, pos = _problem(*case, dtype)
    run = lambda name, inputs, shape: launch.launch(name, backend, inputs, ints, shape,  # noqa: E731
                                                    inputs[0].dtype)
    got = [run("gather_rows", [x, order], (N, D)),
           run("gather_rows_grad", [dxs, pos], (T, D)),
           run("combine", [ys, pos, gates], (T, D)),
           run("combine_grad_ys", [dy, gates, order], (N, D)),
           launch.launch("combine_grad_gates", backend, [dy, ys, pos], ints, (T, K), gates.dtype)]
    mx.eval(got)
    want = [ref.gather_rows_reference(x, order, K), ref.gather_rows_grad_reference(dxs, pos),
            ref.combine_reference(ys, pos, gates), ref.combine_grad_ys_reference(dy, gates, order),
            ref.combine_grad_gates_reference(dy, ys, pos).astype(gates.dtype)]
    names = ("gather_rows forward", "gather_rows vjp dx", "combine forward", "combine vjp dys",
             "combine vjp dgates")
    return list(zip(names, got, want))


def _error_line(exc: Exception) -> str:
    text = str(exc).strip()
    detail = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()), "")
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" + (f" ({detail})" if detail and detail != first else "")


def run_check(backend: str) -> Verdict:
    """Run the check now and return its verdict; stores nothing."""
    start, checks, failures = time.perf_counter(), 0, []
    for case in CHECK_CASES:
        for dtype in CHECK_DTYPES:
            label = f"{str(dtype).split('.')[-1]} T={case[0]} k={case[1]} D={case[2]}"
            atol, rtol = TOLERANCE[dtype]
            try:
                rows = _comparisons(case, dtype, backend)
            except Exception as exc:  # a compile error surfaces here, at eval time
                checks += 1
                failures.append(f"{label}: {_error_line(exc)}"[:300])
                continue
            for name, got, want in rows:
                checks += 1
                got = np.asarray(got.astype(mx.float32), np.float64)
                want = np.asarray(want.astype(mx.float32), np.float64)
                err = float(np.max(np.abs(got - want))) if got.size else 0.0
                tol = atol + rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
                if got.shape != want.shape or not err <= tol:  # NaN fails too
                    failures.append(f"{name} {label}: max abs err {err:.3g} > {tol:.3g}")
    key = verdict_key(backend)
    return Verdict(not failures, backend, key[3], key[1], key[0], failures[0] if failures else "",
                   len(failures), checks, round(time.perf_counter() - start, 3))


# --------------------------------------------------------------------------- verdicts


def device_name() -> str:
    try:
        info = mx.device_info(mx.gpu)
    except Exception:  # older MLX: only the Metal spelling
        info = getattr(mx.metal, "device_info", dict)()
    return str(info.get("device_name") or info.get("architecture") or "unknown GPU")


def verdict_key(backend: str) -> tuple[str, str, str, str]:
    from tinymoe import __version__

    return (__version__, mx.__version__, backend, device_name())


def cache_path(key) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(key)).strip("-")
    return cache_dir() / "kernel-checks" / f"{slug}.json"


def _load(key) -> Verdict | None:
    path = cache_path(key)
    try:
        data = json.loads(path.read_text())
        v = Verdict(**{k: data[k] for k in Verdict.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return None
    if (v.tinymoe, v.mlx, v.backend, v.device) != tuple(key):
        return None
    v.origin = f"cached {path}"
    return v


def _save(key, v: Verdict) -> None:
    path = cache_path(key)
    try:  # a read-only cache folder only costs a re-check next time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verdict-")
        with os.fdopen(fd, "w") as f:
            json.dump({k: val for k, val in asdict(v).items() if k != "origin"}, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass


def verdict(refresh: bool = False) -> Verdict | None:
    """This process's verdict on the kernels of the default device, checking them if nobody has
    yet (or when `refresh`); None where no kernel can run (nothing to trust)."""
    backend = launch.device_backend()
    if backend is None:
        return None
    key = verdict_key(backend)
    if not refresh:
        v = _VERDICTS.get(key) or _load(key)
        if v is not None:
            _VERDICTS[key] = v
            return v
    v = run_check(backend)
    _save(key, v)
    _VERDICTS[key] = v
    return v


def kernels_trusted() -> bool:
    """May the ops launch the kernels? Under `bypass()` yes; otherwise only once they have passed
    (a failure falls back to the references, with one warning)."""
    if _state["bypass"]:
        return True
    v = verdict()
    if v is None or v.ok:
        return True
    warn_once(v, "using tinymoe's pure-MLX references instead")
    return False


@contextmanager
def _counting(flag: str):
    _state[flag] += 1
    try:
        yield
    finally:
        _state[flag] -= 1


def bypass():
    """Run the kernels whatever the verdict: selftest's kernel rows must test the kernels."""
    return _counting("bypass")


def quiet():
    """No warning line: for reports that name the failure themselves."""
    return _counting("quiet")


def describe(v: Verdict) -> str:
    return (f"tinymoe's {v.backend} kernels failed their first-use check on {v.device} "
            f"(MLX {v.mlx}): {v.failure}")


def warn_once(v: Verdict, fallback: str) -> None:
    """One warning line per process, naming the failure and asking for a report."""
    if _state["warned"] or _state["quiet"]:
        return
    _state["warned"] = True
    print(f"warning: {describe(v)}; {fallback}; {REPORT_HINT}", file=sys.stderr)


def require(option: str) -> None:
    """For an explicit request of the kernels: TinyMoeError (one line) when they failed here."""
    v = verdict()
    if v is not None and not v.ok:
        raise TinyMoeError(f"{option}: {describe(v)}; use --moe-dispatch gather, and {REPORT_HINT}")
