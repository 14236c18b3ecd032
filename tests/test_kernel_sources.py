"""The source MLX really generates around tinymoe's kernels, checked off-Mac and without a GPU
(tests/generated_source.py): the Metal source captured from MLX itself, syntax-checked by the
system C++ compiler (and PyPI's libclang, which also enforces address spaces) behind a small
prelude; the CUDA twins' source compiled by NVRTC from PyPI for architectures MLX targets. Every
kernel in float32, float16, bfloat16 and with float32 gates beside bfloat16 values. Negative
controls (deliberately broken sources) must fail each check, so a pass means something.

What this cannot prove: that Apple's Metal compiler accepts the source (the prelude is a host-C++
model of MSL), or anything about running it. See docs/mac.md for what is verified where.
"""

import os
import shutil

import mlx.core as mx
import pytest

import generated_source as gs
from tinymoe.nn.kernels import sources

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
DTYPE_PAIRS = {"float32": (F32, F32), "float16": (F16, F16), "bfloat16": (BF16, BF16),
               "bfloat16+float32_gates": (BF16, F32)}
# "device": ordinary buffers; "constant": inputs under 8 elements, which MLX declares
# `const constant T*` (Metal's constant address space) instead of `const device T*`.
SIZES = {"device": dict(T=16, K=2, D=40), "constant": dict(T=2, K=2, D=3)}
# MLX JIT-compiles for the running GPU; Ampere and Hopper by default, any list on request:
# TINYMOE_NVRTC_ARCHS=sm_75,sm_86,sm_89,sm_100a,sm_120a pytest tests/test_kernel_sources.py -k nvrtc
ARCHS = tuple(os.environ.get("TINYMOE_NVRTC_ARCHS", "sm_80,sm_90a").split(","))


def cxx_or_skip():
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH: cannot syntax-check Metal source")
    return cxx


@pytest.fixture(scope="module")
def metal_sources():
    """{(dtypes id, size id): {host name: source}} captured from MLX."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for pid, (vdt, gdt) in DTYPE_PAIRS.items():
            for sid, shape in SIZES.items():
                out[pid, sid] = gs.capture_metal(mp, vdt, gdt, **shape)
    return out


def unique(metal_sources) -> dict[str, str]:
    """{host name: source}: the gates dtype does not reach gather_rows(_grad), so the mixed pair
    shares those two kernels with plain bfloat16 (same name, same source)."""
    merged = {}
    for found in metal_sources.values():
        for name, src in found.items():
            assert merged.setdefault(name, src) == src, name
    return merged


def test_mlx_generates_metal_source_for_every_kernel_dtype_and_address_space(metal_sources):
    # 5 kernels x 3 dtypes, plus the 3 that take gates for float32 gates, x 2 address spaces
    assert len(unique(metal_sources)) == (5 * 3 + 3) * 2
    for (pid, sid), found in metal_sources.items():
        assert sorted(n.split("__")[0] for n in found) == sorted(
            f"custom_kernel_tinymoe_{k}" for k in sources.KERNELS), (pid, sid)
        for name, src in found.items():
            spec = sources.KERNELS[name.split("__")[0].removeprefix("custom_kernel_tinymoe_")]
            assert spec.body.strip() in src  # the very body, verbatim
            assert src.count(f'[[host_name("{name}")]]') == 1  # instantiated with real dtypes
            assert f"template <typename {spec.types[0][0]}" in src  # every dtype in the template
        value_type = {"float32": "float", "float16": "float16_t"}.get(pid, "bfloat16_t")
        assert all(f"device {value_type}*" in src or f"constant {value_type}*" in src
                   for src in found.values())
        if sid == "constant":
            assert any("const constant" in src for src in found.values())


def test_generated_metal_source_compiles_behind_the_prelude(metal_sources):
    cxx = cxx_or_skip()
    ok, err = gs.check_metal_gxx(list(unique(metal_sources).values()), cxx)
    assert ok, err


def test_generated_metal_source_passes_libclang_with_address_spaces(metal_sources):
    pytest.importorskip("clang.cindex", reason="PyPI's libclang is not installed (test extra, Linux "
                        "x86-64): address spaces are checked only with it")
    ok, err = gs.check_metal_libclang(list(unique(metal_sources).values()))
    assert ok, err


def metal_controls(good: str) -> dict[str, tuple[str, bool]]:
    """Broken variants of one real source: {name: (source, caught by g++ too)}."""
    assert "static_cast<ValT>(acc)" in good and "float acc = 0.0f;" in good
    swap = lambda old, new: good.replace(old, new)  # noqa: E731
    return {
        "undeclared_template_name": (swap("static_cast<ValT>(acc)", "static_cast<OutT>(acc)"), True),
        "syntax_error": (swap("float acc = 0.0f;", "float acc = 0.0f"), True),
        "write_to_const_input": (swap("float acc = 0.0f;", "float acc = 0.0f; ys[0] = ys[1];"), True),
        "error_only_once_instantiated": (swap("static_cast<ValT>(acc)", "ValT::lowest()"), True),
        "unknown_builtin": (swap("float acc = 0.0f;", "float acc = metal::expp(0.0f);"), True),
        "simd_sum_of_a_pointer": (swap("float acc = 0.0f;", "float acc = simd_sum(ys);"), True),
        # a thread-space pointer bound to device memory: a Metal error; g++ has no address spaces
        "wrong_address_space": (swap("float acc = 0.0f;",
                                     "float acc = 0.0f; const thread uint32_t* pp = pos; (void)pp;"),
                                False),
    }


@pytest.mark.parametrize("checker", ["g++", "libclang"])
def test_metal_negative_controls_are_rejected(metal_sources, checker):
    good = next(src for name, src in metal_sources["bfloat16", "device"].items()
                if name.startswith("custom_kernel_tinymoe_combine__"))
    if checker == "g++":
        cxx = cxx_or_skip()
        check = lambda s: gs.check_metal_gxx([s], cxx)  # noqa: E731
    else:
        pytest.importorskip("clang.cindex", reason="PyPI's libclang is not installed")
        check = lambda s: gs.check_metal_libclang([s])  # noqa: E731
    assert check(good)[0]
    for name, (src, gxx_sees_it) in metal_controls(good).items():
        if checker == "g++" and not gxx_sees_it:
            continue
        ok, _ = check(src)
        assert not ok, f"{checker} accepted the broken source '{name}'"


# --------------------------------------------------------------------------- CUDA twins


@pytest.fixture(scope="module")
def cuda_launches():
    with pytest.MonkeyPatch.context() as mp:
        return {pid: gs.record_cuda(mp, *dts) for pid, dts in DTYPE_PAIRS.items()}


@pytest.fixture(scope="module")
def nvrtc():
    reason = gs.nvrtc_available()
    if reason:
        pytest.skip(reason)
    return gs.NVRTC()


def test_the_glue_launches_every_cuda_twin_with_its_header_and_full_template(cuda_launches):
    for pid, calls in cuda_launches.items():
        assert sorted(c["name"] for c in calls) == sorted(f"tinymoe_{k}" for k in sources.KERNELS)
        for c in calls:
            spec = sources.KERNELS[c["name"].removeprefix("tinymoe_")]
            assert c["source"] == spec.cuda_source and c["header"] == spec.cuda_header
            assert c["stream"] == mx.gpu
            assert [n for n, _ in c["template"]] == list(spec.template_names)


def test_cuda_twins_compile_with_nvrtc(cuda_launches, nvrtc):
    built = {}  # one program per architecture (MLX compiles one per kernel; NVRTC's diagnostics
    for calls in cuda_launches.values():  # are the same, and the headers are parsed once)
        for c in calls:
            name, src = gs.cuda_source(c)
            assert built.setdefault(name, src) == src, name  # a name is one source: every dtype
    assert len(built) == 5 * 3 + 3  # is in the template (MLX < 0.32.1 keys CUDA kernels by name)
    for arch in ARCHS:
        ok, log, cubin = nvrtc.compile("".join(built.values()), list(built), arch)
        assert ok and cubin > 0, f"{arch}:\n{log}"


def test_cuda_negative_controls_are_rejected(cuda_launches, nvrtc):
    combine = next(c for c in cuda_launches["bfloat16"] if c["name"] == "tinymoe_combine")
    gates = next(c for c in cuda_launches["bfloat16"] if c["name"] == "tinymoe_combine_grad_gates")
    swap = lambda c, old, new: dict(c, source=c["source"].replace(old, new))  # noqa: E731
    controls = {  # each is its own program (~1 s of NVRTC each: cooperative_groups and CCCL)
        "undeclared_template_name": swap(combine, "static_cast<ValT>(acc)", "static_cast<OutT>(acc)"),
        "write_to_const_input": swap(combine, "float acc = 0.0f;", "float acc = 0.0f; ys[0] = ys[1];"),
        "metal_builtin_in_cuda": swap(combine, "blockIdx.x * blockDim.x + threadIdx.x",
                                      "thread_position_in_grid.x"),
        "template_missing_a_dtype": dict(combine, template=[t for t in combine["template"]
                                                            if t[0] != "ValT"]),
        "simd_kernel_without_its_header": dict(gates, header=""),
    }
    for name, call in controls.items():
        func, src = gs.cuda_source(call)
        ok, _, _ = nvrtc.compile(src, [func], "sm_80")
        assert not ok, f"NVRTC accepted the broken source '{name}'"


@pytest.mark.gpu
def test_the_cuda_source_port_matches_what_mlx_prints(capfd, monkeypatch):
    """On MLX's CUDA build: `verbose=True` prints the source MLX compiles; it must equal the port's,
    so the NVRTC test above checks what a CUDA user runs."""
    if not hasattr(mx, "cuda") or not mx.cuda.is_available():
        pytest.skip("needs MLX's CUDA backend")
    (call,) = [c for c in gs.record_cuda(monkeypatch, BF16, BF16) if c["name"] == "tinymoe_combine"]
    kernel = mx.fast.cuda_kernel(name=call["name"], input_names=call["input_names"],
                                 output_names=call["output_names"], source=call["source"],
                                 header=call["header"])
    capfd.readouterr()
    out = kernel(inputs=call["inputs"], template=call["template"], grid=(256, 1, 1),
                 threadgroup=(256, 1, 1), output_shapes=[(16, 40)], output_dtypes=[BF16],
                 verbose=True, stream=mx.gpu)
    mx.eval(out)
    printed = capfd.readouterr().out
    _, want = gs.cuda_source(call)
    assert want.strip() in printed
