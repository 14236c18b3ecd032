"""Dispatch kernels: references against numpy loops, custom vjps against independent gradients,
the glue's device/stream/template/grid rules, and the Metal/CUDA kernel bodies compiled as C++ and
run over their whole grid in float32, float16 and bfloat16 (tests/kernel_emulator.py).

No Metal or CUDA device is needed. Mutated copies of the sources must fail, and so must a body
that uses a template name its kernel does not declare, so the checks are known to have teeth.
The source MLX actually generates around these bodies is checked in test_kernel_sources.py, the
first-use check in test_kernel_trust.py.
"""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

import kernel_emulator as emu
from tinymoe.nn import dispatch, selftest
from tinymoe.nn.kernels import dispatch as kd
from tinymoe.nn.kernels import launch, sources, trust

# (id, T, K, E, D, routing): edge cases of the dispatch plan and of the grid.
CASES = [
    ("random", 13, 2, 4, 37, "random"),  # N*D = 962: not a multiple of any threadgroup; D > 32
    ("empty_expert", 9, 2, 5, 16, "skip0"),  # expert 0 receives no token
    ("one_expert", 7, 1, 4, 8, "one"),  # every pair routed to the same expert
    ("k1", 20, 1, 3, 5, "random"),
    ("k_equals_e", 6, 4, 4, 12, "random"),
    ("decode_t1", 1, 2, 8, 64, "random"),  # inputs under 8 elements: Metal's constant space
    ("wide", 3, 2, 4, 300, "random"),  # D > threadgroup, T*K < threadgroup
]
IDS = [c[0] for c in CASES]
F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
# (values dtype, gates dtype): what the model uses (gates in the values' dtype) and mixed.
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32)]
PAIR_IDS = ["float32", "float16", "bfloat16", "bfloat16+float32_gates"]


def make_case(T, K, E, D, routing, seed=0, vdt=F32, gdt=F32):
    """Arrays in their kernel dtypes (values `vdt`, gates `gdt`, indices uint32)."""
    rng = np.random.default_rng(seed)
    if routing == "one":
        idx = np.full((T, K), E - 1)
    else:
        lo = 1 if routing == "skip0" else 0
        idx = np.stack([rng.choice(np.arange(lo, E), K, replace=False) for _ in range(T)])
    order = np.argsort(idx.reshape(-1), kind="stable").astype(np.uint32)  # (N,)
    pos = np.empty(T * K, np.uint32)
    pos[order] = np.arange(T * K, dtype=np.uint32)
    normal = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32)).astype(vdt)  # noqa: E731
    return {
        "T": T, "K": K, "D": D, "order": mx.array(order), "pos": mx.array(pos.reshape(T, K)),
        "x": normal(T, D), "ys": normal(T * K, D),
        "gates": mx.array(rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)).astype(gdt),
        "dy": normal(T, D), "dxs": normal(T * K, D),
    }


def expected(c):
    """{kernel: (inputs in its argument order, float64 output)} from plain loops over the
    (rounded) inputs. The loops use the scatter form where the ops use gathers, so the
    inverse-permutation bookkeeping is checked rather than repeated."""
    T, K, D = c["T"], c["K"], c["D"]
    f = {k: np.array(c[k].astype(F32), np.float64) for k in ("x", "ys", "gates", "dy", "dxs")}
    order, pos = np.array(c["order"]), np.array(c["pos"])
    y, dx, dys, dg = np.zeros((T, D)), np.zeros((T, D)), np.zeros((T * K, D)), np.zeros((T, K))
    for p, pair in enumerate(order):
        dx[pair // K] += f["dxs"][p]
    for (t, k), p in np.ndenumerate(pos):
        y[t] += f["gates"][t, k] * f["ys"][p]
        dys[p] += f["gates"][t, k] * f["dy"][t]
        dg[t, k] = np.dot(f["dy"][t], f["ys"][p])
    return {
        "gather_rows": ([c["x"], c["order"]], np.stack([f["x"][pair // K] for pair in order])),
        "combine": ([c["ys"], c["pos"], c["gates"]], y),
        "combine_grad_ys": ([c["dy"], c["gates"], c["order"]], dys),
        "combine_grad_gates": ([c["dy"], c["ys"], c["pos"]], dg),
        "gather_rows_grad": ([c["dxs"], c["pos"]], dx),
    }


def out_dtype(name, c):
    return c["gates"].dtype if name == "combine_grad_gates" else c["ys"].dtype


def close(a, b, dtype=F32):
    """Within a couple of roundings of `dtype` of the largest value (trust.TOLERANCE)."""
    got = np.array(a.astype(F32) if isinstance(a, mx.array) else a, np.float64)
    atol, rtol = trust.TOLERANCE[dtype]
    np.testing.assert_allclose(got, b, rtol=0, atol=atol + rtol * float(np.max(np.abs(b))))


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_references_match_numpy_loops(case):
    c = make_case(*case[1:])
    refs = {  # the references take the kernels' inputs, in the kernels' argument order
        "gather_rows": lambda x, order: kd.gather_rows_reference(x, order, c["K"]),
        "combine": kd.combine_reference,
        "combine_grad_ys": kd.combine_grad_ys_reference,
        "combine_grad_gates": kd.combine_grad_gates_reference,
        "gather_rows_grad": kd.gather_rows_grad_reference,
    }
    for name, ref in refs.items():
        inputs, want = expected(c)[name]
        close(ref(*inputs), want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("pass_plan", [True, False], ids=["full_plan", "inverse_computed"])
def test_custom_vjps_match_numpy_and_naive_autodiff(case, pass_plan):
    c = make_case(*case[1:])
    K, order, pos = c["K"], c["order"], c["pos"]
    x, ys, gates, dy, dxs = (c[k] for k in ("x", "ys", "gates", "dy", "dxs"))
    extra_pos, extra_order = (pos, order) if pass_plan else (None, None)
    want = {name: out for name, (_, out) in expected(c).items()}

    xs, (dx,) = mx.vjp(lambda a: kd.gather_rows(a, order, K, extra_pos), [x], [dxs])
    y, (dys, dg) = mx.vjp(lambda a, g: kd.combine(a, pos, g, extra_order), [ys, gates], [dy])
    close(xs[0], want["gather_rows"])
    close(dx, want["gather_rows_grad"])
    close(y[0], want["combine"])
    close(dys, want["combine_grad_ys"])
    close(dg, want["combine_grad_gates"])

    # MLX's own autodiff of the naive formula (a scatter-add backward) must agree.
    _, naive = mx.vjp(lambda a, g: mx.sum(a[pos] * g[..., None], axis=1), [ys, gates], [dy])
    _, naive_dx = mx.vjp(lambda a: a[order // K], [x], [dxs])
    for ours, theirs in zip((dys, dg, dx), naive + naive_dx):
        close(ours, np.array(theirs))


def test_custom_vjp_is_the_one_used_and_indices_get_zero_cotangents(monkeypatch):
    c = make_case(5, 2, 4, 6, "random")
    calls = []
    for name in ("gather_rows_grad_reference", "combine_grad_ys_reference",
                 "combine_grad_gates_reference"):
        original = getattr(kd, name)
        monkeypatch.setattr(kd, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, gates, order, pos = c["x"], c["gates"], c["order"], c["pos"]

    def loss(x, gates, order, pos):
        return mx.sum(kd.combine(kd.gather_rows(x, order, 2, pos) * 3.0, pos, gates, order))

    _, grads = mx.vjp(loss, [x, gates, order, pos], [mx.array(1.0)])
    mx.eval(grads)
    assert sorted(calls) == sorted(["gather_rows_grad_reference", "combine_grad_ys_reference",
                                    "combine_grad_gates_reference"])
    for g, idx in zip(grads[2:], (order, pos)):
        assert g.shape == idx.shape and not np.any(np.array(g))
    # d/dx sum_t sum_k g[t,k] * 3 x[t] = 3 * sum_k g[t,k] on every feature.
    close(grads[0], np.repeat(3.0 * np.array(gates).sum(1, keepdims=True), 6, axis=1))


def test_half_precision_dtypes_follow_the_values():
    c = make_case(4, 2, 4, 8, "random", vdt=BF16)
    y, (dys, dg) = mx.vjp(lambda a, g: kd.combine(a, c["pos"], g), [c["ys"], c["gates"]],
                          [mx.ones((4, 8))])
    assert (y[0].dtype, dys.dtype, dg.dtype) == (BF16, BF16, F32)
    close(y[0], expected(c)["combine"][1], BF16)


def test_shape_errors_are_clear():
    x = mx.zeros((3, 4))
    with pytest.raises(ValueError, match="T\\*K"):
        kd.gather_rows(x, mx.zeros((5,), dtype=mx.uint32), 2)
    with pytest.raises(ValueError, match="T\\*K"):
        kd.combine(mx.zeros((5, 4)), mx.zeros((3, 2), dtype=mx.uint32), mx.zeros((3, 2)))


def test_kernels_are_built_lazily_and_construct_on_this_platform():
    launch._KERNEL_CACHE.clear()
    c = make_case(4, 2, 4, 8, "random")
    mx.eval(kd.gather_rows(c["x"], c["order"], 2))
    assert launch.metal_available() == bool(mx.metal.is_available())
    if launch.device_backend() is None:
        assert launch._KERNEL_CACHE == {}  # the reference ran; nothing was built
    for spec in sources.KERNELS.values():  # constructing is allowed everywhere; calling is not
        assert launch._make_kernel(spec, "metal") is not None


def test_sources_are_per_thread_gathers_and_every_dtype_is_a_template_parameter():
    exported = [sources.GATHER_ROWS_SOURCE, sources.COMBINE_SOURCE,
                sources.COMBINE_GRAD_YS_SOURCE, sources.COMBINE_GRAD_GATES_SOURCE,
                sources.GATHER_ROWS_GRAD_SOURCE]
    assert exported == [s.metal_source for s in sources.KERNELS.values()]
    for spec in sources.KERNELS.values():
        for banned in ("threadgroup", "barrier", "atomic"):  # simd_sum needs none of these
            assert banned not in spec.body, (spec.name, banned)
        assert ("simd" in spec.body) == spec.uses_simd, spec.name
        assert spec.cuda_source.endswith(spec.body) and "thread_position" not in spec.cuda_source
        typed = [a for _, arrays in spec.types for a in arrays]
        arrays = [a for a in spec.inputs + spec.outputs if a not in sources.INDEX_INPUTS]
        assert sorted(typed) == sorted(arrays), spec.name  # each array's dtype in the template
    assert launch.THREADS_PER_GROUP % sources.SIMD_WIDTH == 0  # SIMD groups never straddle


# --------------------------------------------------------------------------- device and grid


def test_grid_limit_leaves_a_threadgroup_of_headroom_below_2_31(monkeypatch):
    # MLX's CUDA launcher computes (grid + block - 1) / block in signed int.
    assert launch.MAX_GRID_THREADS + launch.THREADS_PER_GROUP - 1 <= 2**31 - 1
    monkeypatch.setattr(launch, "device_backend", lambda: "cuda")
    assert launch.backend_for([F32], launch.MAX_GRID_THREADS) == "cuda"
    assert launch.backend_for([F32], 2**31 - 255) is None
    assert launch.backend_for([mx.float64], 8) is None  # no kernel for this dtype


@pytest.mark.cpu
def test_on_the_cpu_default_device_no_kernel_launches_even_where_a_gpu_exists(monkeypatch):
    """`auto` on the CPU is `grouped`, which uses gather_rows/combine: they must take the
    references, not a GPU kernel, and selftest must say so."""
    made = []
    monkeypatch.setattr(launch, "_KERNEL_CACHE", {})
    monkeypatch.setattr(launch, "metal_available", lambda: True)  # a Mac, CPU chosen by the user
    monkeypatch.setattr(launch, "_make_kernel", lambda spec, backend: made.append(spec.name))
    assert not launch.default_device_is_gpu()
    assert dispatch.resolve_backend("auto") == "grouped"
    x, idx, gates, w = selftest.routed_problem(selftest.BACKEND_CASES[0])
    loss = lambda x, g: mx.sum(dispatch.run_experts("grouped", x, idx, g, *w))  # noqa: E731
    mx.eval(mx.value_and_grad(loss, argnums=(0, 1))(x, gates))
    assert made == []
    assert selftest.kernel_implementation() == "reference (default device is the CPU)"
    assert selftest.kernel_status()["kernels"] is None


# --------------------------------------------------------------------------- C++ emulation


def build_or_skip(directory, entries):
    if emu.compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH: the kernel bodies cannot be "
                    "emulated here")
    return emu.build(directory, entries)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel_emulator")
    entries = {n: (s, s.metal_source, s.cuda_source) for n, s in sources.KERNELS.items()}
    rc, binary, err = build_or_skip(d, entries)
    assert rc == 0, err
    return binary, tmp_path_factory.mktemp("kernel_runs")


def grid_jobs(c, variant, names=None, tg_sizes=None):
    """One job per kernel and threadgroup size, with the grid the launcher would use."""
    jobs, wants = [], []
    for name, (inputs, want) in expected(c).items():
        if names and name not in names:
            continue
        spec = sources.KERNELS[name]
        dtypes = {n: a.dtype for n, a in zip(spec.inputs, inputs)}
        dtypes.update(dict.fromkeys(spec.outputs, out_dtype(name, c)))
        codes = [emu.CODES[t] for _, t in launch.template_for(spec, dtypes)]
        # SIMD kernels need whole groups of 32 lanes per threadgroup; others any size.
        for tg in tg_sizes or ((256, 64) if spec.uses_simd else (256, 7)):
            jobs.append(dict(variant=variant, name=name, D=c["D"], K=c["K"],
                             grid=want.size * spec.lanes, tg=tg, codes=codes, inputs=inputs,
                             outputs=[(want.shape, out_dtype(name, c))]))
            wants.append(want)
    return jobs, wants


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("variant", ["metal", "cuda"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=PAIR_IDS)
def test_kernel_bodies_match_references_over_the_grid(emulator, case, variant, dtypes):
    binary, work = emulator
    c = make_case(*case[1:], vdt=dtypes[0], gdt=dtypes[1])
    jobs, wants = grid_jobs(c, variant)
    for job, want, (rc, outs) in zip(jobs, wants, emu.run_jobs(binary, work, jobs)):
        assert rc == 0, (job["name"], job["tg"], rc)
        close(outs[0], want, job["outputs"][0][1])


def test_shim_rejects_a_template_name_the_kernel_does_not_declare(tmp_path):
    """gather_rows declares only ValT: a body that casts to GateT must not compile (the old
    shim typedef'd every name globally, so this passed)."""
    spec = sources.KERNELS["gather_rows"]
    assert "GateT" not in spec.template_names
    body = spec.body.replace("xs[p * D + d] = x[t * D + d];",
                             "xs[p * D + d] = static_cast<ValT>(static_cast<GateT>(x[t * D + d]));")
    assert body != spec.body
    broken = dataclasses.replace(spec, body=body)
    rc, _, err = build_or_skip(tmp_path, {"broken": (broken, broken.metal_source,
                                                     broken.cuda_source)})
    assert rc != 0 and "GateT" in err
    rc, _, err = build_or_skip(tmp_path, {"good": (spec, spec.metal_source, spec.cuda_source)})
    assert rc == 0, err  # the same shim accepts the real body: the failure above is the name


MUTATIONS = [  # (entry, kernel, text in its body, replacement, variant): each must be caught
    ("gather_rows", "gather_rows", "order[p] / K", "order[p] % K", "metal"),
    ("combine", "combine", "k < K;", "k + 1 < K;", "metal"),
    ("combine_grad_ys", "combine_grad_ys", "gates[pair]", "gates[p]", "metal"),
    ("combine_grad_gates", "combine_grad_gates", "ys[row * D + d]", "ys[pair * D + d]", "metal"),
    ("gather_rows_grad", "gather_rows_grad", "pos[t * K + k]", "pos[t * K]", "metal"),
    ("unguarded", "gather_rows", "if (p >= n_rows) {\n  return;\n}", "", "metal"),  # sentinels
    # only lane 0's partial sum (D = 37 > 32 lanes): the SIMD reduction is what adds the rest
    ("no_simd_sum", "combine_grad_gates", "acc = simd_sum(acc);", "", "metal"),
    # lanes that return before the warp shuffle: CUDA's full-mask __shfl_xor_sync is then UB
    ("lanes_leave_early", "combine_grad_gates", "if (pair >= n_pairs) {",
     "if (pair >= n_pairs || lane >= 20) {", "cuda"),
    ("all_lanes_write", "combine_grad_gates", "if (lane == 0) {", "if (lane < 32) {\n"
     "  dgates[pair + lane] = static_cast<GateT>(acc);", "metal"),
]


def test_mutated_kernels_are_caught(tmp_path):
    entries = {}
    for entry, name, old, new, _ in MUTATIONS:
        spec = sources.KERNELS[name]
        assert old in spec.body, entry
        body = spec.body.replace(old, new)
        entries[entry] = (spec, sources.METAL_PROLOGUE + body, sources.CUDA_PROLOGUE + body)
    rc, binary, err = build_or_skip(tmp_path, entries)
    assert rc == 0, err
    c = make_case(13, 2, 4, 37, "random")
    jobs, wants = [], []
    for entry, name, _, _, variant in MUTATIONS:
        (job,), (want,) = grid_jobs(c, variant, names=[name], tg_sizes=[256])
        jobs.append(dict(job, name=entry))
        wants.append(want)
    for (entry, *_), want, (rc, outs) in zip(MUTATIONS, wants, emu.run_jobs(binary, tmp_path, jobs)):
        assert rc != 0 or not np.allclose(np.array(outs[0]), want, atol=1e-4), entry


# --------------------------------------------------------------------------- the Python glue


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=PAIR_IDS)
def test_python_glue_drives_the_kernels_forward_and_backward(emulator, monkeypatch, backend,
                                                             dtypes):
    """With a (faked) GPU default device, a full forward and backward through gather_rows and
    combine runs every kernel in the emulator, on the GPU stream, with a template that names
    every dtype, and matches MLX's autodiff of the naive formulas."""
    kernels = emu.EmulatedKernels(*emulator, sources.KERNELS)
    emu.fake_gpu(monkeypatch, backend, kernels)
    for case in (CASES[0], CASES[4], CASES[5]):
        c = make_case(*case[1:], vdt=dtypes[0], gdt=dtypes[1])
        K, order, pos = c["K"], c["order"], c["pos"]
        scale = mx.array(np.linspace(0.5, 2.0, c["D"], dtype=np.float32)).astype(dtypes[0])

        def loss(op_gather, op_combine, x, gates):
            ys = mx.tanh(op_gather(x)) * scale  # a stand-in for the experts
            return mx.sum(op_combine(ys, gates).astype(F32) * c["dy"].astype(F32))

        def fused(x, gates):
            return loss(lambda a: kd.gather_rows(a, order, K, pos),
                        lambda ys, g: kd.combine(ys, pos, g, order), x, gates)

        def naive(x, gates):
            return loss(lambda a: a[order // K],
                        lambda ys, g: mx.sum(ys[pos] * g[..., None], axis=1), x, gates)

        value, grads = mx.value_and_grad(fused, argnums=(0, 1))(c["x"], c["gates"])
        mx.eval(value, grads)
        f32 = lambda a: a.astype(F32)  # noqa: E731
        want_value, want_grads = mx.value_and_grad(naive, argnums=(0, 1))(f32(c["x"]),
                                                                          f32(c["gates"]))
        tol = F32 if dtypes == (F32, F32) else BF16  # half runs round more intermediates
        close(value, np.array(want_value), tol)
        for g, w in zip(grads, want_grads):
            close(g, np.array(w), tol)
    assert sorted(set(kernels.log)) == sorted(sources.KERNELS)  # every kernel ran, none fell back


def test_each_dtype_gets_its_own_compiled_kernel(emulator, monkeypatch):
    """MLX caches a compiled kernel by name + template: float32, then float16, then bfloat16 and
    mixed-dtype calls of the same kernels must never share a cache key (EmulatedKernels fails a
    launch that would reuse a binary built for other dtypes)."""
    kernels = emu.EmulatedKernels(*emulator, sources.KERNELS)
    emu.fake_gpu(monkeypatch, "metal", kernels)
    for vdt, gdt in DTYPE_PAIRS + [(F16, F32), (F32, BF16)]:
        c = make_case(6, 2, 4, 12, "random", vdt=vdt, gdt=gdt)
        _, (dx,) = mx.vjp(lambda a: kd.gather_rows(a, c["order"], 2, c["pos"]), [c["x"]],
                          [c["dxs"]])
        _, (dys, dg) = mx.vjp(lambda a, g: kd.combine(a, c["pos"], g, c["order"]),
                              [c["ys"], c["gates"]], [c["dy"]])
        mx.eval(dx, dys, dg)
    assert len({key[0] for key in kernels.compiled}) == len(sources.KERNELS)
    assert len(kernels.compiled) > len(sources.KERNELS)  # several instances per kernel
