"""Dispatch kernels: references against numpy loops, custom vjps against independent gradients,
and the Metal/CUDA kernel bodies compiled as C++ and run over their whole grid.

No Metal or CUDA device is needed. The C++ emulator pastes the exact source strings exported by
`tinymoe.nn.kernels.dispatch` into functions whose signatures mirror what MLX generates, maps the
Metal qualifiers and thread builtins onto plain C++, and launches the body once per thread of a
grid rounded up to whole threadgroups (as CUDA does; Metal would trim it), with sentinel padding
after every buffer so an out-of-bounds write fails the test. Mutated copies of the sources must
fail, so the comparison is known to have teeth.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.nn.kernels import dispatch as kd

# (id, T, K, E, D, routing): edge cases of the dispatch plan and of the grid.
CASES = [
    ("random", 13, 2, 4, 37, "random"),  # N*D = 962: not a multiple of any threadgroup
    ("empty_expert", 9, 2, 5, 16, "skip0"),  # expert 0 receives no token
    ("one_expert", 7, 1, 4, 8, "one"),  # every pair routed to the same expert
    ("k1", 20, 1, 3, 5, "random"),
    ("k_equals_e", 6, 4, 4, 12, "random"),
    ("decode_t1", 1, 2, 8, 64, "random"),  # inputs under 8 elements: Metal's constant space
    ("wide", 3, 2, 4, 300, "random"),  # D > threadgroup, T*K < threadgroup
]
IDS = [c[0] for c in CASES]


def make_case(T, K, E, D, routing, seed=0):
    rng = np.random.default_rng(seed)
    if routing == "one":
        idx = np.full((T, K), E - 1)
    else:
        lo = 1 if routing == "skip0" else 0
        idx = np.stack([rng.choice(np.arange(lo, E), K, replace=False) for _ in range(T)])
    order = np.argsort(idx.reshape(-1), kind="stable").astype(np.uint32)  # (N,)
    pos = np.empty(T * K, np.uint32)
    pos[order] = np.arange(T * K, dtype=np.uint32)
    f32 = np.float32
    return {
        "T": T, "K": K, "D": D, "order": order, "pos": pos.reshape(T, K),
        "x": rng.standard_normal((T, D)).astype(f32),
        "ys": rng.standard_normal((T * K, D)).astype(f32),
        "gates": rng.uniform(0.1, 1.0, (T, K)).astype(f32),
        "dy": rng.standard_normal((T, D)).astype(f32),
        "dxs": rng.standard_normal((T * K, D)).astype(f32),
    }


def expected(c):
    """{kernel: (inputs in its argument order, float64 output)} from plain loops. The loops use
    the scatter form where the ops use gathers, so the inverse-permutation bookkeeping is
    checked rather than repeated."""
    T, K, D = c["T"], c["K"], c["D"]
    x, ys, gates, dy, dxs, order, pos = (c[k] for k in ("x", "ys", "gates", "dy", "dxs",
                                                        "order", "pos"))
    y, dx, dys, dg = np.zeros((T, D)), np.zeros((T, D)), np.zeros((T * K, D)), np.zeros((T, K))
    for p, pair in enumerate(order):
        dx[pair // K] += dxs[p]
    for (t, k), p in np.ndenumerate(pos):
        y[t] += gates[t, k] * ys[p].astype(np.float64)
        dys[p] += gates[t, k] * dy[t].astype(np.float64)
        dg[t, k] = np.dot(dy[t].astype(np.float64), ys[p])
    return {
        "gather_rows": ([x, order], np.stack([x[pair // K] for pair in order])),
        "combine": ([ys, pos, gates], y),
        "combine_grad_ys": ([dy, gates, order], dys),
        "combine_grad_gates": ([dy, ys, pos], dg),
        "gather_rows_grad": ([dxs, pos], dx),
    }


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5, atol=1e-5)


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
        close(ref(*map(mx.array, inputs)), want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("pass_plan", [True, False], ids=["full_plan", "inverse_computed"])
def test_custom_vjps_match_numpy_and_naive_autodiff(case, pass_plan):
    c = make_case(*case[1:])
    K = c["K"]
    x, ys, gates, dy, dxs = (mx.array(c[k]) for k in ("x", "ys", "gates", "dy", "dxs"))
    order, pos = mx.array(c["order"]), mx.array(c["pos"])
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
    x, gates = mx.array(c["x"]), mx.array(c["gates"])
    order, pos = mx.array(c["order"]), mx.array(c["pos"])

    def loss(x, gates, order, pos):
        return mx.sum(kd.combine(kd.gather_rows(x, order, 2, pos) * 3.0, pos, gates, order))

    _, grads = mx.vjp(loss, [x, gates, order, pos], [mx.array(1.0)])
    mx.eval(grads)
    assert sorted(calls) == sorted(["gather_rows_grad_reference", "combine_grad_ys_reference",
                                    "combine_grad_gates_reference"])
    for g, idx in zip(grads[2:], (order, pos)):
        assert g.shape == idx.shape and not np.any(np.array(g))
    # d/dx sum_t sum_k g[t,k] * 3 x[t] = 3 * sum_k g[t,k] on every feature.
    close(grads[0], np.repeat(3.0 * c["gates"].sum(1, keepdims=True), 6, axis=1))


def test_half_precision_dtypes_follow_the_values():
    c = make_case(4, 2, 4, 8, "random")
    ys = mx.array(c["ys"]).astype(mx.bfloat16)
    gates, pos = mx.array(c["gates"]), mx.array(c["pos"])
    y, (dys, dg) = mx.vjp(lambda a, g: kd.combine(a, pos, g), [ys, gates], [mx.ones((4, 8))])
    assert (y[0].dtype, dys.dtype, dg.dtype) == (mx.bfloat16, mx.bfloat16, mx.float32)
    want = expected(c)["combine"][1]
    np.testing.assert_allclose(np.array(y[0].astype(mx.float32)), want, atol=0.05)


def test_shape_errors_are_clear():
    x = mx.zeros((3, 4))
    with pytest.raises(ValueError, match="T\\*K"):
        kd.gather_rows(x, mx.zeros((5,), dtype=mx.uint32), 2)
    with pytest.raises(ValueError, match="T\\*K"):
        kd.combine(mx.zeros((5, 4)), mx.zeros((3, 2), dtype=mx.uint32), mx.zeros((3, 2)))


def test_kernels_are_built_lazily_and_construct_on_this_platform():
    kd._KERNEL_CACHE.clear()
    c = make_case(4, 2, 4, 8, "random")
    mx.eval(kd.gather_rows(mx.array(c["x"]), mx.array(c["order"]), 2))
    assert kd.metal_available() == bool(mx.metal.is_available())
    if not kd.metal_available() and not kd.cuda_available():
        assert kd._KERNEL_CACHE == {}  # the reference ran; nothing was built
    for spec in kd.KERNELS.values():  # constructing is allowed everywhere; calling is not
        assert kd._make_kernel(spec, "metal") is not None


def test_sources_are_per_thread_gathers():
    exported = [kd.GATHER_ROWS_SOURCE, kd.COMBINE_SOURCE, kd.COMBINE_GRAD_YS_SOURCE,
                kd.COMBINE_GRAD_GATES_SOURCE, kd.GATHER_ROWS_GRAD_SOURCE]
    assert exported == [s.metal_source for s in kd.KERNELS.values()]
    for spec in kd.KERNELS.values():
        for banned in ("threadgroup", "barrier", "atomic", "simd"):
            assert banned not in spec.body, (spec.name, banned)
        assert spec.cuda_source.endswith(spec.body) and "thread_position" not in spec.cuda_source


# --------------------------------------------------------------------------- C++ emulation

SHIM = r"""
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>
// Metal address spaces and builtins, as plain C++.
#define device
#define constant
#define thread
typedef unsigned int uint;
struct uint3 { uint32_t x, y, z; };
struct dim3 { uint32_t x, y, z; };
typedef float ValT;
typedef float GateT;
typedef void (*Launch)(bool, void**, int**, void**, int, int, uint3, uint3);
"""

MAIN = r"""
static const uint32_t SENTINEL = 0x7fc0beefu;  // a NaN no kernel computes
int main(int argc, char** argv) {
  // <dir>/job.txt: variant name D K grid(3) threadgroup(3) n_in n_out, then "count ndim dims"
  // per input and "count" per output; data in <dir>/in<i>.bin and <dir>/out<i>.bin.
  std::string dir = argv[1], variant, name;
  std::ifstream job(dir + "/job.txt");
  int D, K, n_in, n_out;
  uint3 g, tg;
  job >> variant >> name >> D >> K >> g.x >> g.y >> g.z >> tg.x >> tg.y >> tg.z >> n_in >> n_out;
  uint3 r = {(g.x + tg.x - 1) / tg.x * tg.x, (g.y + tg.y - 1) / tg.y * tg.y,
             (g.z + tg.z - 1) / tg.z * tg.z};
  size_t pad = size_t(r.x) * r.y * r.z + 64;  // room for whatever an unguarded thread writes
  std::vector<std::vector<uint32_t>> buf(n_in + n_out);
  std::vector<std::vector<int>> shape(n_in);
  std::vector<size_t> count(n_in + n_out);
  std::vector<void*> ptr;
  std::vector<int*> shape_ptr;
  for (int i = 0; i < n_in + n_out; ++i) {
    int ndim = 0;
    job >> count[i];
    buf[i].assign(count[i] + pad, i < n_in ? 0u : SENTINEL);
    ptr.push_back(buf[i].data());
    if (i >= n_in) continue;
    job >> ndim;
    shape[i].assign(ndim + 1, 0);
    for (int j = 0; j < ndim; ++j) job >> shape[i][j];
    shape_ptr.push_back(shape[i].data());
    std::ifstream f(dir + "/in" + std::to_string(i) + ".bin", std::ios::binary);
    if (!f.read(reinterpret_cast<char*>(buf[i].data()), 4 * count[i])) return 2;
  }
  if (!job) return 2;
  Launch launch = nullptr;
  for (const auto& e : kEntries) if (name == e.name) launch = e.fn;
  if (!launch) return 4;
  for (uint32_t z = 0; z < r.z; ++z)
    for (uint32_t y = 0; y < r.y; ++y)
      for (uint32_t x = 0; x < r.x; ++x)
        launch(variant == "cuda", ptr.data(), shape_ptr.data(), ptr.data() + n_in, D, K,
               uint3{x, y, z}, tg);
  for (int i = n_in; i < n_in + n_out; ++i) {
    for (size_t j = count[i]; j < buf[i].size(); ++j)
      if (buf[i][j] != SENTINEL) return 3;  // a thread wrote past the end
    std::ofstream f(dir + "/out" + std::to_string(i - n_in) + ".bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(buf[i].data()), 4 * count[i]);
  }
  return 0;
}
"""

INDEX_INPUTS = ("order", "pos")


def shim_functions(entry, spec, metal_src, cuda_src):
    """Signatures the way MLX writes them (inputs, then `<name>_shape` if the source uses it,
    then outputs), plus the thread builtins; the bodies are the sources, verbatim."""
    params, args = [], []
    for i, n in enumerate(spec.inputs):
        ctype = "uint32_t" if n in INDEX_INPUTS else "float"
        params.append(f"const {ctype}* {n}")
        args.append(f"(const {ctype}*)in[{i}]")
        if f"{n}_shape" in metal_src:
            params.append(f"const int* {n}_shape")
            args.append(f"shapes[{i}]")
    for i, n in enumerate(spec.outputs):
        params.append(f"float* {n}")
        args.append(f"(float*)out[{i}]")
    p, a = ", ".join(params + ["int D", "int K"]), ", ".join(args + ["D", "K"])
    return f"""
static void metal_{entry}({p}, uint3 thread_position_in_grid) {{
{metal_src}
}}
static void cuda_{entry}({p}, dim3 blockIdx, dim3 blockDim, dim3 threadIdx) {{
{cuda_src}
}}
static void launch_{entry}(bool cuda, void** in, int** shapes, void** out, int D, int K,
                           uint3 t, uint3 tg) {{
  if (!cuda) {{ metal_{entry}({a}, t); return; }}
  cuda_{entry}({a}, dim3{{t.x / tg.x, t.y / tg.y, t.z / tg.z}}, dim3{{tg.x, tg.y, tg.z}},
               dim3{{t.x % tg.x, t.y % tg.y, t.z % tg.z}});
}}
"""


def build_emulator(directory, entries):
    """entries: {entry name: (spec, metal source, cuda source)} -> path of the binary."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler found")
    code = SHIM + "".join(shim_functions(e, *v) for e, v in entries.items())
    table = ", ".join(f'{{"{e}", launch_{e}}}' for e in entries)
    code += "struct Entry { const char* name; Launch fn; };\n"
    code += f"static const Entry kEntries[] = {{{table}}};\n" + MAIN
    src, binary = directory / "emu.cpp", directory / "emu"
    src.write_text(code)
    cmd = [compiler, "-O1", "-std=c++17", "-fno-strict-aliasing", "-o", str(binary), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return binary


def run_emulator(binary, work, variant, name, D, K, grid, tg, inputs, out_sizes):
    """Returns (exit code, [float32 outputs or None])."""
    head = [variant, name, D, K, *grid, *tg, len(inputs), len(out_sizes)]
    lines = [" ".join(map(str, head))]
    for i, a in enumerate(inputs):
        a = np.ascontiguousarray(a, np.uint32 if a.dtype == np.uint32 else np.float32)
        a.tofile(work / f"in{i}.bin")
        lines.append(" ".join(map(str, [a.size, a.ndim, *a.shape])))
    (work / "job.txt").write_text("\n".join(lines + [str(n) for n in out_sizes]) + "\n")
    rc = subprocess.run([str(binary), str(work)]).returncode
    if rc != 0:
        return rc, None
    return rc, [np.fromfile(work / f"out{i}.bin", np.float32) for i in range(len(out_sizes))]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel_emulator")
    entries = {n: (s, s.metal_source, s.cuda_source) for n, s in kd.KERNELS.items()}
    return build_emulator(d, entries), tmp_path_factory.mktemp("kernel_runs")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("variant", ["metal", "cuda"])
def test_kernel_bodies_match_references_over_the_grid(emulator, case, variant):
    binary, work = emulator
    c = make_case(*case[1:])
    for name, (inputs, want) in expected(c).items():
        for tg in (kd.THREADS_PER_GROUP, 7):
            rc, outs = run_emulator(binary, work, variant, name, c["D"], c["K"],
                                    (want.size, 1, 1), (tg, 1, 1), inputs, [want.size])
            assert rc == 0, (name, tg, rc)
            close(outs[0].reshape(want.shape), want)


MUTATIONS = [  # (entry, kernel, text in its body, replacement): each must be caught
    ("gather_rows", "gather_rows", "order[p] / K", "order[p] % K"),
    ("combine", "combine", "k < K;", "k + 1 < K;"),
    ("combine_grad_ys", "combine_grad_ys", "gates[pair]", "gates[p]"),
    ("combine_grad_gates", "combine_grad_gates", "ys[row * D + d]", "ys[gid * D + d]"),
    ("gather_rows_grad", "gather_rows_grad", "pos[t * K + k]", "pos[t * K]"),
    ("unguarded", "gather_rows", "if (p >= n_rows) {\n  return;\n}", ""),  # the sentinels
]


def test_mutated_kernels_are_caught(tmp_path):
    entries = {}
    for entry, name, old, new in MUTATIONS:
        spec = kd.KERNELS[name]
        assert old in spec.body
        body = spec.body.replace(old, new)
        entries[entry] = (spec, kd.METAL_PROLOGUE + body, kd.CUDA_PROLOGUE + body)
    binary = build_emulator(tmp_path, entries)
    c = make_case(13, 2, 4, 37, "random")
    for entry, name, _, _ in MUTATIONS:
        inputs, want = expected(c)[name]
        rc, outs = run_emulator(binary, tmp_path, "metal", entry, c["D"], c["K"],
                                (want.size, 1, 1), (256, 1, 1), inputs, [want.size])
        assert rc != 0 or not np.allclose(outs[0].reshape(want.shape), want, atol=1e-5), entry


def emulated_kernels(binary, work, log):
    """A stand-in for `_make_kernel`: objects called like `mx.fast.metal_kernel` ones that run
    the C++ emulator with the grid, threadgroup and template the Python glue chose."""

    def make(spec, backend):
        def call(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            t = dict(template)
            assert all(v == mx.float32 for k, v in t.items() if k.endswith("T"))
            assert output_dtypes == [mx.float32] and len(inputs) == len(spec.inputs)
            log.append(spec.name)
            sizes = [int(np.prod(s)) for s in output_shapes]
            rc, outs = run_emulator(binary, work, backend, spec.name, t["D"], t["K"], grid,
                                    threadgroup, [np.array(a) for a in inputs], sizes)
            assert rc == 0
            return [mx.array(o.reshape(s)) for o, s in zip(outs, output_shapes)]

        return call

    return make


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=[IDS[0], IDS[4], IDS[5]])
def test_python_glue_drives_the_kernels_forward_and_backward(emulator, monkeypatch, backend, case):
    binary, work = emulator
    log = []
    monkeypatch.setattr(kd, "_KERNEL_CACHE", {})
    monkeypatch.setattr(kd, "metal_available", lambda: backend == "metal")
    monkeypatch.setattr(kd, "cuda_available", lambda: backend == "cuda")
    monkeypatch.setattr(kd, "_make_kernel", emulated_kernels(binary, work, log))
    c = make_case(*case[1:])
    K = c["K"]
    x, gates = mx.array(c["x"]), mx.array(c["gates"])
    order, pos = mx.array(c["order"]), mx.array(c["pos"])
    scale = mx.array(np.linspace(0.5, 2.0, c["D"], dtype=np.float32))

    def loss(op_gather, op_combine, x, gates):
        ys = mx.tanh(op_gather(x)) * scale  # a stand-in for the experts
        return mx.sum(op_combine(ys, gates) * mx.array(c["dy"]))

    def fused(x, gates):
        return loss(lambda a: kd.gather_rows(a, order, K, pos),
                    lambda ys, g: kd.combine(ys, pos, g, order), x, gates)

    def naive(x, gates):
        return loss(lambda a: a[order // K],
                    lambda ys, g: mx.sum(ys[pos] * g[..., None], axis=1), x, gates)

    value, grads = mx.value_and_grad(fused, argnums=(0, 1))(x, gates)
    mx.eval(value, grads)
    want_value, want_grads = mx.value_and_grad(naive, argnums=(0, 1))(x, gates)
    close(value, np.array(want_value))
    for g, w in zip(grads, want_grads):
        close(g, np.array(w))
    assert sorted(set(log)) == sorted(kd.KERNELS)  # every kernel ran, none fell back
