"""The source MLX generates around tinymoe's kernel bodies, obtained without a GPU, and the tools that
check it: a host C++ compiler behind a Metal prelude, and NVRTC from PyPI for the CUDA twins.

Metal: on MLX >= 0.32 a `mx.fast.metal_kernel` call is accepted while `mx.export_function` traces
(it records the kernel on a placeholder GPU stream), and the export callback receives each
`CustomKernel` node with its host name and the complete generated source (signature, body and
the explicit template instantiation). Nothing is reconstructed: this is MLX's own text. Its
`metal::utils()` preamble is not in the CPU wheel; tests/data/metal_prelude.h stands in for it.

CUDA: `mx.fast.cuda_kernel` cannot be built on the CPU wheel, so the Python glue's calls are
recorded (the real `launch._make_kernel` against a stand-in `mx.fast.cuda_kernel`) and the source
is rebuilt by `cuda_source` in the layout MLX's CUDA backend gives a custom kernel (its device
header included, the body inside `mlx::core::cu`, one pointer per input and output, template
arguments as `constexpr int` / `using` declarations; the layout was checked against the strings
in the mlx-cuda-12 0.32.4 wheel, and a `gpu` test compares it with MLX's own output). It is
compiled the way MLX compiles custom kernels: NVRTC with a stand-in for MLX's device header
(tests/data/cuda_stand_in), `--device-as-default-execution-space`, one `--gpu-architecture`,
and the kernel's name expression.

`mx.custom_function` cannot be exported, so both drive the ops' forward and backward helpers
(the functions the custom functions and their vjps call), which launch all five kernels.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from tinymoe.nn.kernels import dispatch as kd
from tinymoe.nn.kernels import launch, trust

DATA = Path(__file__).parent / "data"
METAL_PRELUDE = (DATA / "metal_prelude.h").read_text()
# Our stand-in for MLX's device header, under the name the generated source includes
# (tests/data/cuda_stand_in/README.md says what it holds and why).
CUDA_HEADERS = {"mlx/backend/cuda/device/utils.cuh": (DATA / "cuda_stand_in" / "utils.cuh").read_text()}


def problem(vdt, gdt, T, K, D, seed=0):
    rng = np.random.default_rng(seed)
    experts = rng.integers(0, 4, size=T * K)
    order = np.argsort(experts, kind="stable").astype(np.uint32)
    pos = np.argsort(order).astype(np.uint32).reshape(T, K)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(vdt)
    gates = mx.array(rng.random((T, K)).astype(np.float32)).astype(gdt)
    return x, gates, mx.array(order), mx.array(pos), K


def training_step(x, gates, order, pos, K):
    """Forward and backward of both ops through the glue: all five kernels launch."""
    ys = kd._gather_rows_forward(x, order, K)
    y = kd._combine_forward(ys, pos, gates)
    dys, dgates = kd._combine_backward(mx.ones_like(y), ys, pos, gates, order)
    return [y, dgates, kd._gather_rows_backward(dys, pos, x.dtype)]


def _as_gpu(monkeypatch, backend):
    monkeypatch.setattr(launch, "_KERNEL_CACHE", {})
    monkeypatch.setattr(launch, "device_backend", lambda: backend)
    monkeypatch.setattr(trust, "kernels_trusted", lambda: True)


def capture_metal(monkeypatch, vdt, gdt, T=16, K=2, D=40) -> dict[str, str]:
    """{host name: the exact Metal source MLX generates} for every kernel at these dtypes."""
    x, gates, order, pos, K = problem(vdt, gdt, T, K, D)
    found: dict[str, str] = {}

    def on_node(node):
        if node.get("type") == "primitive" and node["name"] == "CustomKernel":
            found[node["arguments"][0]] = node["arguments"][1]

    with monkeypatch.context() as m:
        _as_gpu(m, "metal")
        mx.export_function(on_node, lambda a, b: training_step(a, b, order, pos, K), x, gates)
    return found


def record_cuda(monkeypatch, vdt, gdt, T=16, K=2, D=40) -> list[dict]:
    """What the glue hands `mx.fast.cuda_kernel` (construction and call arguments), per launch."""
    x, gates, order, pos, K = problem(vdt, gdt, T, K, D)
    calls = []

    def fake_cuda_kernel(**made):
        def call(*, inputs, template, output_shapes, output_dtypes, **launched):
            calls.append(dict(made, inputs=inputs, template=template, output_dtypes=output_dtypes,
                              **launched))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    with monkeypatch.context() as m:
        _as_gpu(m, "cuda")
        m.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
        mx.eval(training_step(x, gates, order, pos, K))
    return calls


# --------------------------------------------------------------------------- Metal: host compiler

_HOST_NAME = re.compile(r'^template \[\[host_name\("[^"]*"\)\]\] \[\[kernel\]\] ', re.M)


def for_clang(source: str) -> str:
    """Upstream clang rejects attributes on an explicit instantiation (Metal's clang takes them);
    drop just those two, keeping the instantiation that makes the compiler check each body."""
    out, n = _HOST_NAME.subn("template ", source)
    assert n == source.count("[[host_name("), "unexpected instantiation line"
    return out


def check_metal_gxx(sources: list[str], cxx: str) -> tuple[bool, str]:
    """(ok, diagnostics) of the sources, one translation unit, behind the prelude."""
    code = METAL_PRELUDE + "".join(f'\n#line 1 "generated_{i}.metal"\n{s}' for i, s in enumerate(sources))
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "kernels.metal.cpp"
        f.write_text(code)
        quiet = "-Wno-unknown-attributes" if "clang" in cxx else "-Wno-attributes"
        p = subprocess.run([cxx, "-fsyntax-only", "-std=c++17", "-x", "c++", quiet,
                            "-Werror=return-type", str(f)], capture_output=True, text=True)
    return p.returncode == 0, p.stderr


def check_metal_libclang(sources: list[str]) -> tuple[bool, str]:
    """The same with PyPI's libclang: real address spaces, so mixing them is an error."""
    from clang import cindex

    code = METAL_PRELUDE + "".join(f'\n#line 1 "generated_{i}.metal"\n{for_clang(s)}'
                                   for i, s in enumerate(sources))
    tu = cindex.Index.create().parse("k.metal.cpp", args=["-x", "c++", "-std=c++17",
                                                          "-Wno-unknown-attributes"],
                                     unsaved_files=[("k.metal.cpp", code)])
    errors = [str(d) for d in tu.diagnostics if d.severity >= cindex.Diagnostic.Error]
    return not errors, "\n".join(errors)


# --------------------------------------------------------------------------- CUDA: MLX's wrapper

CUDA_TYPE = {mx.uint32: "uint32_t", mx.int32: "int32_t", mx.float16: "__half",
             mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}
TYPE_STRING = {mx.uint32: "uint32_t", mx.int32: "int32_t", mx.float16: "float16_t",
               mx.bfloat16: "bfloat16_t", mx.float32: "float"}  # MLX's get_type_string


def cuda_source(call: dict) -> tuple[str, str]:
    """(kernel name, full source) MLX's CUDA backend builds for one recorded launch."""
    func = "custom_kernel_" + call["name"] + "".join(
        f"_{v}" if isinstance(v, int) else "_" + TYPE_STRING[v] for _, v in call["template"])
    source = call["source"]
    s = ('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
         + call.get("header", ""))
    s += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    s += "__global__ void " + func + "(\n"
    for n, a in zip(call["input_names"], call["inputs"]):
        s += f"    const {CUDA_TYPE[a.dtype]}* {n},\n"
        if a.ndim > 0:
            if n + "_shape" in source:
                s += f"    const __grid_constant__ Shape {n}_shape,\n"
            if n + "_strides" in source:
                s += f"    const __grid_constant__ Strides {n}_strides,\n"
            if n + "_ndim" in source:
                s += f"    const __grid_constant__ int {n}_ndim,\n"
    names = call["output_names"]
    for i, (n, dt) in enumerate(zip(names, call["output_dtypes"])):
        s += f"    {CUDA_TYPE[dt]}* {n}" + (",\n" if i < len(names) - 1 else ") {\n")
    for n, v in call["template"]:
        s += f"  constexpr int {n} = {v};\n" if isinstance(v, int) else f"  using {n} = {CUDA_TYPE[v]};\n"
    s += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return func, s


def nvrtc_available() -> str | None:
    """None when NVRTC and the CUDA headers from PyPI are installed, else why not."""
    try:
        nvrtc_paths()
    except (ImportError, StopIteration, FileNotFoundError) as exc:
        return f"NVRTC from PyPI not installed (nvidia-cuda-nvrtc-cu12 and friends): {exc}"
    return None


def nvrtc_paths() -> dict[str, Path]:
    import nvidia  # namespace package of the nvidia-* wheels

    roots = [Path(p) for p in nvidia.__path__]
    find = lambda rel: next(r / rel for r in roots if (r / rel).exists())  # noqa: E731
    lib = find("cuda_nvrtc/lib")
    return {"lib": lib, "builtins": next(lib.glob("libnvrtc-builtins.so.*")),
            "nvrtc": next(lib.glob("libnvrtc.so.*")), "cccl": find("cuda_cccl/include"),
            "runtime": find("cuda_runtime/include")}


class NVRTC:
    """NVRTC through ctypes, compiling as MLX's JitModule::compile does."""

    def __init__(self):
        paths = nvrtc_paths()
        # libnvrtc dlopens its builtins library by name: load it first, no LD_LIBRARY_PATH needed
        ctypes.CDLL(str(paths["builtins"]), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(paths["nvrtc"]))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        self.include = [paths["cccl"], paths["runtime"]]
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = (major.value, minor.value)

    def compile(self, source: str, kernels: list[str], arch: str) -> tuple[bool, str, int]:
        """(ok, log, cubin bytes) for one program defining `kernels` (names in mlx::core::cu)."""
        L, prog = self.lib, ctypes.c_void_p()
        n = len(CUDA_HEADERS)
        srcs = (ctypes.c_char_p * n)(*[h.encode() for h in CUDA_HEADERS.values()])
        names = (ctypes.c_char_p * n)(*[k.encode() for k in CUDA_HEADERS])
        assert L.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", n, srcs,
                                    names) == 0
        try:
            for k in kernels:
                assert L.nvrtcAddNameExpression(prog, f"mlx::core::cu::{k}".encode()) == 0
            opts = ["--device-as-default-execution-space", f"--gpu-architecture={arch}"]
            opts += [f"--include-path={p}" for p in self.include]
            arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            rc = L.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            L.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            L.nvrtcGetProgramLog(prog, log)
            cubin = ctypes.c_size_t(0)
            if rc == 0:
                for k in kernels:  # the mangled name MLX loads with cuModuleGetFunction
                    lowered = ctypes.c_char_p()
                    assert L.nvrtcGetLoweredName(prog, f"mlx::core::cu::{k}".encode(),
                                                 ctypes.byref(lowered)) == 0
                L.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
            return rc == 0, log.value.decode(errors="replace"), cubin.value
        finally:
            L.nvrtcDestroyProgram(ctypes.byref(prog))
