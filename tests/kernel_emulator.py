"""Run the Metal/CUDA kernel bodies of tinymoe.nn.kernels.sources as C++ on a machine with neither.

The exact source strings the library hands to MLX are pasted into C++ function templates whose
signatures mirror what MLX generates: inputs (typed by the kernel's template type parameters, or
uint32_t for the dispatch plan's indices), their `<name>_shape` arrays when the body uses them,
outputs, then the template ints. Only the type parameters a kernel *declares* (`KernelSpec.types`)
exist in its template, so a body that uses a type name its generated source would not declare
fails to compile here too. Half types are small structs that store IEEE half / bfloat16 bits and
round to nearest even when converted from float, so float16 and bfloat16 runs read and write the
same bytes as a GPU would; arithmetic goes through float, as in the kernels.

SIMD groups: a kernel whose spec has `lanes > 1` runs each group of 32 consecutive threads of a
threadgroup as 32 real OS threads, so Metal's `simd_sum` (a sum over the group's *active* lanes:
a lane that returned no longer takes part) and CUDA's `__shfl_xor_sync` (every lane named in the
mask must take part, else the emulator reports a fault) are modelled by rendezvous, not assumed.

The grid is rounded up to whole threadgroups (as CUDA does; Metal would trim it), and every
buffer is followed by padding filled with 0xFF bytes, so an out-of-bounds write fails the run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from tinymoe.nn.kernels.sources import INDEX_INPUTS, KernelSpec

CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2, mx.uint32: 3}

SHIM = (Path(__file__).parent / "data" / "emulator_shim.h").read_text()

MAIN = (Path(__file__).parent / "data" / "emulator_main.cpp").read_text()


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _ctype(spec: KernelSpec, name: str) -> str:
    if name in INDEX_INPUTS:
        return "uint32_t"
    return next(t for t, arrays in spec.types if name in arrays)


def kernel_functions(entry: str, spec: KernelSpec, metal_src: str, cuda_src: str,
                     cuda_header: str | None = None) -> str:
    """C++ for one entry: the Metal and CUDA variants as templates over the spec's declared type
    parameters only, each in its own namespace, and a launcher that instantiates them from
    dtype codes."""
    header = spec.cuda_header if cuda_header is None else cuda_header
    types = [t for t, _ in spec.types]
    tparams = ", ".join(f"typename {t}" for t in types)
    tlist = ", ".join(f"T{i}" for i in range(len(types)))
    local = {t: f"T{i}" for i, t in enumerate(types)}  # the launcher's names for them
    params, args = [], []
    for i, n in enumerate(spec.inputs):
        ctype = _ctype(spec, n)
        params.append(f"const {ctype}* {n}")
        args.append(f"(const {local.get(ctype, ctype)}*)in[{i}]")
        if f"{n}_shape" in metal_src or f"{n}_shape" in cuda_src:
            params.append(f"const int* {n}_shape")
            args.append(f"shapes[{i}]")
    for i, n in enumerate(spec.outputs):
        ctype = _ctype(spec, n)
        params.append(f"{ctype}* {n}")
        args.append(f"({local.get(ctype, ctype)}*)out[{i}]")
    p, a = ", ".join(params + ["int D", "int K"]), ", ".join(args + ["D", "K"])
    call = (f"if (!cuda) metal_{entry}::kernel<{tlist}>({a}, t);\n"
            f"else cuda_{entry}::kernel<{tlist}>({a}, dim3{{t.x / tg.x, 0, 0}}, "
            f"dim3{{tg.x, 1, 1}}, dim3{{t.x % tg.x, 0, 0}});")
    for i in reversed(range(len(types))):  # nested with_type: one lambda per type parameter
        call = f"with_type(codes[{i}], [&](auto v{i}) {{ using T{i} = decltype(v{i});\n{call}\n}});"
    return f"""
namespace metal_{entry} {{
using namespace metal;
template <{tparams}>
void kernel({p}, uint3 thread_position_in_grid) {{
{metal_src}
}}
}}  // namespace metal_{entry}
namespace cuda_{entry} {{
#undef TINYMOE_SIMD_SUM  // the header's guard is per program; here each entry has a namespace
{header}
template <{tparams}>
void kernel({p}, dim3 blockIdx, dim3 blockDim, dim3 threadIdx) {{
{cuda_src}
}}
}}  // namespace cuda_{entry}
static void launch_{entry}(bool cuda, const int* codes, void** in, int** shapes, void** out,
                           int D, int K, uint3 t, uint3 tg) {{
{call}
}}
"""


def build(directory: Path, entries: dict) -> tuple[int, Path, str]:
    """entries: {entry: (spec, metal source, cuda source[, cuda header])} -> (compiler exit code,
    binary, diagnostics). Callers skip when `compiler()` is None."""
    code = SHIM + "".join(kernel_functions(e, *v) for e, v in entries.items())
    table = ", ".join(f'{{"{e}", launch_{e}, {str(v[0].uses_simd).lower()}}}'
                      for e, v in entries.items())
    code += "struct Entry { const char* name; Launch fn; bool simd; };\n"
    code += f"static const Entry kEntries[] = {{{table}}};\n" + MAIN
    src, binary = directory / "emu.cpp", directory / "emu"
    src.write_text(code)
    cmd = [compiler(), "-O1", "-std=c++17", "-pthread", "-fno-strict-aliasing", "-o", str(binary),
           str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, binary, proc.stderr


# --------------------------------------------------------------------------- data exchange


def to_bytes(a) -> tuple[int, bytes]:
    """(dtype code, raw little-endian bytes) of an mx or numpy array."""
    a = a if isinstance(a, mx.array) else mx.array(a)
    code = CODES[a.dtype]
    if a.dtype in (mx.float16, mx.bfloat16):
        return code, np.array(a.view(mx.uint16)).tobytes()
    return code, np.ascontiguousarray(np.array(a)).tobytes()


def from_bytes(raw: bytes, dtype, shape) -> mx.array:
    if dtype in (mx.float16, mx.bfloat16):
        return mx.array(np.frombuffer(raw, np.uint16).reshape(shape)).view(dtype)
    np_dtype = np.uint32 if dtype == mx.uint32 else np.float32
    return mx.array(np.frombuffer(raw, np_dtype).reshape(shape))


def run_jobs(binary: Path, work: Path, jobs: list[dict]) -> list[tuple[int, list | None]]:
    """jobs: dicts with variant, name, D, K, grid (int), tg (int), codes (template type codes),
    inputs (arrays), outputs [(shape, dtype)]. One process runs them all. Returns, per job,
    (exit code, [mx arrays] or None)."""
    dirs = []
    for j, job in enumerate(jobs):
        d = work / f"job{j}"
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*"):
            stale.unlink()
        head = [job["variant"], job["name"], job["D"], job["K"], job["grid"], job["tg"],
                len(job["codes"]), *job["codes"], len(job["inputs"]), len(job["outputs"])]
        lines = [" ".join(map(str, head))]
        for i, a in enumerate(job["inputs"]):
            code, raw = to_bytes(a)
            (d / f"in{i}.bin").write_bytes(raw)
            lines.append(" ".join(map(str, [code, int(np.prod(a.shape)), len(a.shape), *a.shape])))
        for shape, dtype in job["outputs"]:
            lines.append(f"{CODES[dtype]} {int(np.prod(shape))}")
        (d / "job.txt").write_text("\n".join(lines) + "\n")
        dirs.append(d)
    subprocess.run([str(binary), *map(str, dirs)], check=True)
    results = []
    for d, job in zip(dirs, jobs):
        rc = int((d / "rc.txt").read_text())
        outs = None
        if rc == 0:
            outs = [from_bytes((d / f"out{i}.bin").read_bytes(), dtype, shape)
                    for i, (shape, dtype) in enumerate(job["outputs"])]
        results.append((rc, outs))
    return results


# --------------------------------------------------------------------------- stand-in kernels


class EmulatedKernels:
    """A stand-in for `launch._make_kernel`: kernel objects called like MLX's, which run the
    emulator with the grid, threadgroup and template the Python glue chose.

    It also models MLX's compiled-kernel cache (name + template -> the binary built for the first
    call's dtypes): a later call with the same key but other dtypes would run that stale binary,
    so it fails here. Every launch must name the GPU stream. A spec whose sources differ from
    the prebuilt binary's (a test's monkeypatched body) gets its own build; if that fails to
    compile, calling the kernel raises as MLX does when Apple's compiler rejects a source.
    """

    def __init__(self, binary: Path, work: Path, built: dict):
        self.binary, self.work, self.built = binary, work, dict(built)
        self.log: list[str] = []
        self.compiled: dict = {}
        self._extra: dict = {}

    def _binary_for(self, spec: KernelSpec):
        if self.built.get(spec.name) == spec:
            return self.binary, ""
        if spec not in self._extra:
            d = self.work / f"build_{len(self._extra)}"
            d.mkdir(parents=True, exist_ok=True)
            rc, binary, err = build(d, {spec.name: (spec, spec.metal_source, spec.cuda_source)})
            first = next((ln for ln in err.splitlines() if "error" in ln), err[:200])
            self._extra[spec] = (binary if rc == 0 else None, first)
        return self._extra[spec]

    def __call__(self, spec: KernelSpec, backend: str):
        def call(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                 stream=None, **_):
            assert stream == mx.gpu, f"{spec.name} launched without the GPU stream ({stream})"
            key = (spec.name, backend, tuple((k, str(v)) for k, v in template))
            signature = tuple(str(a.dtype) for a in inputs) + tuple(map(str, output_dtypes))
            first = self.compiled.setdefault(key, signature)
            assert first == signature, (f"MLX would run {spec.name}'s binary built for {first} "
                                        f"on {signature}: a dtype is missing from the template")
            binary, error = self._binary_for(spec)
            if binary is None:
                raise RuntimeError(f"[metal::Device] Unable to build metal library from source\n"
                                   f"{error}")
            # Like MLX, the signature's types come from the arrays, not from the template.
            dtypes = dict(zip(spec.inputs, (a.dtype for a in inputs)))
            dtypes.update(zip(spec.outputs, output_dtypes))
            t = dict(template)
            job = dict(variant=backend, name=spec.name, D=t["D"], K=t["K"], grid=grid[0],
                       tg=threadgroup[0], codes=[CODES[dtypes[arrays[0]]] for _, arrays in spec.types],
                       inputs=inputs, outputs=list(zip(output_shapes, output_dtypes)))
            ((rc, outs),) = run_jobs(binary, self.work, [job])
            assert rc == 0, f"{spec.name}: emulator exit code {rc}"
            self.log.append(spec.name)
            return outs

        return call


def fake_gpu(monkeypatch, backend: str, make_kernel, trusted: bool = True) -> None:
    """Make this process look like one whose default device is a Metal or CUDA GPU, with kernel
    objects from `make_kernel` (an EmulatedKernels). `trusted`: skip the first-use check (the
    kernels count as verified); otherwise it runs, as in a fresh process."""
    from tinymoe.nn.kernels import launch, trust

    monkeypatch.setattr(trust, "_VERDICTS", {})
    monkeypatch.setattr(trust, "_state", {"bypass": 0, "quiet": 0, "warned": False})
    if trusted:
        monkeypatch.setattr(trust, "kernels_trusted", lambda: True)

    monkeypatch.setattr(launch, "_KERNEL_CACHE", {})
    monkeypatch.setattr(launch, "default_device_is_gpu", lambda: True)
    monkeypatch.setattr(launch, "metal_available", lambda: backend == "metal")
    monkeypatch.setattr(launch, "cuda_available", lambda: backend == "cuda")
    monkeypatch.setattr(launch, "_make_kernel", make_kernel)
