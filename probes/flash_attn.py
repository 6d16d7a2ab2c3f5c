"""flash_attn: the flash-attention packages (FA2, FA3, FA4): installed?, do they import (in a subprocess, so an
ABI error or a segfault is a classified result), and do they give the right numbers.

The honest default: SDPA's default attention needs no package, and what FA4 gains over it is a few percent of a
step where it was measured (probes/measured.toml, quoted with its card and source), so "none installed" is `ok`.
A package that is installed but broken is `fail`: diffusers falls back to native attention with a warning, and
a crash on import can take a run down.
"""

from __future__ import annotations

import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from probes import measured
from probes.context import ProbeContext, cuda_device_name, exc_line
from probes.finding import Finding

B, S, H, D = 1, 256, 4, 64  # the numerical check's q/k/v, [B, S, H, D]
REL_ERR_LIMIT = 2e-2  # bf16 vs a float64 reference
IMPORT_TIMEOUT_S = 30.0
FA2_DEFAULT_VERSION = "2.8.3"
FA2_RELEASES = "https://github.com/Dao-AILab/flash-attention/releases/download"
FA4_DEPS = "nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-core quack-kernels apache-tvm-ffi torch-c-dlpack-ext"
# Modules FA4 imports -> the PyPI distribution that provides them.
DEP_DISTS = {"cutlass": "nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-core", "quack": "quack-kernels",
             "tvm_ffi": "apache-tvm-ffi", "torch_c_dlpack_ext": "torch-c-dlpack-ext", "einops": "einops"}
# The packages' own compiled extensions: "No module named" one of these is a broken install, not a dependency.
OWN_EXTENSIONS = {"flash_attn_2_cuda", "flash_attn_3_cuda", "flash_attn_3", "flash_attn_3._C", "flash_attn"}
NAMES = {"fa2": "FA2", "fa3": "FA3", "fa4": "FA4"}


def speed_note(gpu_name: str | None) -> str:
    """What FA4 and FlashAttention-2 did against the default attention where they were measured: on this GPU
    model, or on another card, labelled."""
    attention = measured.nearest(gpu_name, "fa4_attention_tflops")
    if attention is None:
        return f"FA4 not measured on {gpu_name or 'this machine'} nor on any GPU in {measured.DATA_LABEL}"
    rates = attention.values
    seq = "/".join(str(s) for s in rates["seq_len"])
    note = (f"{attention.where()}: flash-attn-4 ran Qwen-Image's attention at {min(rates['fa4']):.0f}-"
            f"{max(rates['fa4']):.0f} TFLOP/s against cuDNN's {min(rates['cudnn']):.0f}-{max(rates['cudnn']):.0f} "
            f"(S={seq}, B1 H24 D128 bf16)")
    step = measured.nearest(gpu_name, "fa4_w1_step")
    if step is not None and step.gpu == attention.gpu:
        fa4_ms, native_ms = step.values
        note += (f"; an eager 1328x1328 CFG step took {1 - fa4_ms / native_ms:.1%} less time, {fa4_ms:.1f} vs "
                 f"{native_ms:.1f} ms ({step.cite})")
    fa2 = measured.nearest(gpu_name, "sdpa_flash_tflops")
    if fa2 is not None and fa2.gpu == attention.gpu:
        note += (f"; torch SDPA's built-in FlashAttention-2 ran {fa2.values:.0f} TFLOP/s at S=7017, slower than "
                 f"the default attention ({fa2.cite})")
    return note


def _fa4_gain(gpu_name: str | None) -> str:
    """The summary's clause on what installing FA4 would give here."""
    step = measured.nearest(gpu_name, "fa4_w1_step")
    if step is not None and step.here:
        fa4_ms, native_ms = step.values
        return (f"measured on {step.gpu}, this GPU's model, FA4 took {1 - fa4_ms / native_ms:.1%} off an eager step "
                f"({step.source})")
    return (f"FA4's gain was not measured on {gpu_name or 'this machine (no GPU)'} (attention_truth times it once "
            "installed)")


def _version_mm(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text).split("+")[0])[:2])


def _dist_version(metadata, *dists: str) -> str | None:
    for dist in dists:
        try:
            return str(metadata.version(dist))
        except Exception:  # PackageNotFoundError
            continue
    return None


def _spec(util, name: str):
    """find_spec of a top-level module: never executes the package's code."""
    try:
        return util.find_spec(name)
    except Exception:
        return None


def _has_subdir(spec, sub: str) -> bool:
    import os

    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    return any(os.path.isdir(os.path.join(str(loc), sub)) for loc in locations)


def _discover(ctx: ProbeContext) -> dict[str, dict]:
    """{key: {installed, version, module, dist}} from package metadata and find_spec (no package code runs)."""
    metadata = ctx.import_module("importlib.metadata")
    util = ctx.import_module("importlib.util")
    fa_spec = _spec(util, "flash_attn")

    fa2_version = _dist_version(metadata, "flash-attn", "flash_attn")
    # flash-attn-4 ships flash_attn/cute/ only (a namespace package): a regular flash_attn/__init__.py is FA2's.
    fa2 = fa2_version is not None or bool(fa_spec is not None and getattr(fa_spec, "origin", None))
    fa3_version = _dist_version(metadata, "flash-attn-3", "flash_attn_3")
    fa3_module = next((m for m in ("flash_attn_interface", "flash_attn_3") if _spec(util, m) is not None), None)
    fa4_version = _dist_version(metadata, "flash-attn-4", "flash_attn_4")
    fa4 = fa4_version is not None or bool(fa_spec is not None and _has_subdir(fa_spec, "cute"))
    return {
        "fa2": {"installed": fa2, "version": fa2_version, "module": "flash_attn", "dist": "flash-attn"},
        "fa3": {"installed": fa3_version is not None or fa3_module is not None, "version": fa3_version,
                "module": fa3_module or "flash_attn_interface", "dist": "flash-attn-3"},
        "fa4": {"installed": fa4, "version": fa4_version, "module": "flash_attn.cute", "dist": "flash-attn-4"},
    }


def _error_line(text: str) -> str:
    """The exception line of a traceback (the last 'SomethingError: ...' line), else the last line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln if len(ln) <= 300 else ln[:297] + "..."
    return (lines[-1][:300] if lines else "")


def _torch_facts(torch) -> dict:
    if torch is None:
        return {}
    facts = {"torch": str(getattr(torch, "__version__", "?")), "cuda": getattr(torch.version, "cuda", None)}
    try:
        facts["cxx11abi"] = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    except Exception:
        facts["cxx11abi"] = None
    return facts


def fa2_wheel(facts: dict, fa2_version: str | None) -> str | None:
    """The prebuilt FA2 wheel name that matches this torch/CUDA/C++ ABI/Python, e.g.
    flash_attn-2.8.3+cu12torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl."""
    if not facts.get("cuda") or facts.get("cxx11abi") is None:
        return None
    import platform

    mm = ".".join(str(p) for p in _version_mm(facts["torch"]))
    cuda_major = str(facts["cuda"]).split(".")[0]
    version = (fa2_version or FA2_DEFAULT_VERSION).split("+")[0]
    py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    abi = "TRUE" if facts["cxx11abi"] else "FALSE"
    return f"flash_attn-{version}+cu{cuda_major}torch{mm}cxx11abi{abi}-{py}-{py}-linux_{platform.machine()}.whl"


def _reinstall_fix(key: str, facts: dict, version: str | None, cc: tuple | None = None) -> str:
    if key == "fa2":
        wheel = fa2_wheel(facts, version)
        alt = "or pip uninstall -y flash-attn (torch's SDPA already has FA2 and cuDNN kernels)"
        if wheel:
            ver = (version or FA2_DEFAULT_VERSION).split("+")[0]
            return (f"pip install --no-deps --force-reinstall {FA2_RELEASES}/v{ver}/{wheel}  (the wheel built for "
                    f"this torch; if the release has none: MAX_JOBS=8 pip install --no-build-isolation "
                    f"--force-reinstall --no-binary flash-attn flash-attn), {alt}")
        return f"MAX_JOBS=8 pip install --no-build-isolation --force-reinstall --no-binary flash-attn flash-attn, {alt}"
    if key == "fa3":
        return ("rebuild FA3 against this torch: cd flash-attention/hopper && MAX_JOBS=8 python setup.py install, "
                "or pip uninstall -y flash-attn-3 (default SDPA needs no package; attention_truth times both)")
    return f"pip install --force-reinstall flash-attn-4 {FA4_DEPS}, or pip uninstall -y flash-attn-4"


def classify(key: str, returncode: int, text: str, facts: dict, version: str | None,
             cc: tuple | None = None) -> tuple[str, str]:
    """(problem, fix) for a failed import or call of package `key`, from its error output."""
    name = NAMES[key]
    if returncode is not None and returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        problem = f"importing {name} crashes the interpreter ({sig}): usually a wheel built for another torch/CUDA"
        return problem, _reinstall_fix(key, facts, version)
    if returncode == 124 and "timed out" in text:
        return f"importing {name} hangs (over {IMPORT_TIMEOUT_S:g} s)", _reinstall_fix(key, facts, version)
    if "undefined symbol" in text:
        want = (f" (this torch {facts.get('torch')}, CUDA {facts.get('cuda')}, cxx11abi "
                f"{facts.get('cxx11abi')})" if facts else "")
        problem = f"ABI mismatch: this wheel was built for another torch/CUDA/C++ ABI{want}"
        wheel = fa2_wheel(facts, version) if key == "fa2" else None
        if wheel:
            problem += f"; the matching wheel is {wheel}"
        return problem, _reinstall_fix(key, facts, version)
    missing = re.search(r"No module named '([^']+)'", text)
    if missing:
        mod = missing.group(1)
        top = mod.split(".")[0]
        if (key == "fa4" and top in DEP_DISTS) or top == "cutlass":
            return (f"missing dependency: {mod} (FA4 runs on the CuTe DSL)",
                    f"pip install {FA4_DEPS}")
        if top == "torch":
            return "missing dependency: torch", "pip install torch (see the torch_build probe for the right index)"
        if mod in OWN_EXTENSIONS:
            return (f"broken install: its compiled extension {mod} is missing", _reinstall_fix(key, facts, version))
        return f"missing dependency: {mod}", f"pip install {DEP_DISTS.get(top, top.replace('_', '-'))}"
    if ("no kernel image is available" in text or "only supports Ampere" in text
            or re.search(r"\bsm_\d+", text)):
        here = f"sm_{cc[0]}{cc[1]}" if cc else "this GPU"
        problem = f"wrong GPU architecture: this {name} build has no kernels for {here}"
        if key == "fa2" and cc:
            fix = (f"FLASH_ATTN_CUDA_ARCHS={cc[0]}{cc[1]} MAX_JOBS=8 pip install --no-build-isolation "
                   "--force-reinstall --no-binary flash-attn flash-attn, or pip uninstall -y flash-attn")
        else:
            fix = _reinstall_fix(key, facts, version)
        return problem, fix
    lib = re.search(r"(lib[\w.+-]*\.so[\w.]*): cannot open shared object file", text)
    if lib:
        problem = (f"missing shared library {lib.group(1)}: built for another CUDA/torch than this one "
                   f"(CUDA {facts.get('cuda')})")
        return problem, _reinstall_fix(key, facts, version)
    if re.search(r"GLIBCXX_[\d.]+' not found|GLIBC_[\d.]+' not found", text):
        return ("the system C/C++ runtime is older than the wheel needs (GLIBC/GLIBCXX)",
                "use a wheel built for this OS, or conda install -c conda-forge libstdcxx-ng")
    line = _error_line(text) or f"exit code {returncode}"
    return f"{name} fails: {line}", _reinstall_fix(key, facts, version)


def _check_device(torch):
    """(device, dtype) for the numerical check, or None where the kernels cannot run (no CUDA)."""
    try:
        if torch is not None and torch.cuda.is_available():
            return "cuda", torch.bfloat16
    except Exception:
        pass
    return None


def rel_err(torch, fn, device, dtype) -> float:
    """Relative error of fn(q, k, v) ([B, S, H, D]) against SDPA math in float64 on the same rounded inputs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    out = fn(q, k, v)
    if isinstance(out, (tuple, list)):  # FA3/FA4 may return (out, lse)
        out = out[0]
    if device == "cuda":
        torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.to("cpu", torch.float64).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = out.detach().to("cpu", torch.float64)
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _attention_fn(ctx: ProbeContext, key: str, module: str):
    mod = ctx.import_module(module)
    fn = getattr(mod, "flash_attn_func", None)
    if fn is None:
        raise AttributeError(f"{module} has no flash_attn_func")
    return fn


def probe(ctx: ProbeContext) -> Finding:
    found = _discover(ctx)
    try:
        torch = ctx.import_module("torch")
    except Exception:
        torch = None
    facts = _torch_facts(torch)
    check = _check_device(torch)
    cc = None
    if check is not None:
        try:
            cc = tuple(torch.cuda.get_device_capability(0))
        except Exception:
            cc = None

    measured = {key: {"installed": bool(info["installed"]), "version": info["version"], "imports": None,
                      "error": None, "rel_err": None, "problem": None} for key, info in found.items()}
    details: list[str] = []
    broken: dict[str, tuple[str, str]] = {}  # key -> (problem, fix)
    unusable: dict[str, tuple[str, str]] = {}
    working: list[str] = []

    installed = [k for k, info in found.items() if info["installed"]]
    # Import each installed package in its own interpreter, concurrently (FA4's CuTe DSL import is slow).
    argv = {k: [sys.executable, "-c", f"import {found[k]['module']}"] for k in installed}
    with ThreadPoolExecutor(max_workers=max(1, len(installed))) as pool:
        results = dict(zip(installed, pool.map(lambda k: ctx.run(argv[k], IMPORT_TIMEOUT_S), installed)))

    for key in installed:
        info, m, name = found[key], measured[key], NAMES[key]
        label = f"{name} ({info['dist']} {info['version'] or 'version unknown'}, module {info['module']})"
        res = results[key]
        text = f"{getattr(res, 'stderr', '') or ''}\n{getattr(res, 'stdout', '') or ''}"
        m["imports"] = res.returncode == 0
        if key == "fa3" and cc is not None and cc[0] != 9:
            m["problem"] = f"FA3 is Hopper-only: this GPU is sm_{cc[0]}{cc[1]}, FA3 kernels need sm_90"
            if not m["imports"]:
                m["error"] = _error_line(text)
            fix = "pip uninstall -y flash-attn-3 (it cannot run on this GPU; default SDPA is used either way)"
            unusable[key] = (m["problem"], fix)
            details.append(f"{label}: {m['problem']}")
            continue
        if not m["imports"]:
            m["error"] = _error_line(text) or f"exit code {res.returncode}"
            problem, fix = classify(key, res.returncode, text, facts, info["version"], cc)
            m["problem"] = problem
            broken[key] = (problem, fix)
            details.append(f"{label}: import fails: {problem}")
            details.append(f"  {m['error']}")
            continue
        if check is None:
            working.append(key)
            details.append(f"{label}: imports; numerical check skipped (no CUDA GPU: the kernels need one)")
            continue
        device, dtype = check
        ctx.use_gpu()
        try:
            err = rel_err(torch, _attention_fn(ctx, key, info["module"]), device, dtype)
        except Exception as exc:
            m["error"] = exc_line(exc)
            problem, fix = classify(key, 1, str(exc), facts, info["version"], cc)
            m["problem"] = f"imports, but its attention call fails: {problem}"
            broken[key] = (m["problem"], fix)
            details.append(f"{label}: {m['problem']}")
            continue
        m["rel_err"] = float(f"{err:.3g}")
        if not err < REL_ERR_LIMIT:  # also catches NaN
            m["problem"] = f"wrong numbers: relative error {err:.2e} > {REL_ERR_LIMIT:.0e} vs a float64 reference"
            broken[key] = (m["problem"], _reinstall_fix(key, facts, info["version"], cc))
            details.append(f"{label}: {m['problem']}")
        else:
            working.append(key)
            details.append(f"{label}: imports and matches a float64 reference (relative error {err:.1e}, "
                           f"q/k/v [B={B}, S={S}, H={H}, D={D}] bf16)")

    if facts.get("torch") and _version_mm(facts["torch"]) < (2, 5):
        details.append(f"torch {facts['torch']} < 2.5: SDPA defaults to its built-in FA2 here; the cuDNN "
                       "backend (_native_cudnn) is the first fix and needs no install")
    gpu_name = cuda_device_name(torch) if check is not None else None
    details.append("honest default: " + speed_note(gpu_name))

    def finding(status, summary, fix=None):
        return Finding(id="flash_attn", status=status, summary=summary, details=details, fix=fix, measured=measured)

    if broken:
        summary = "; ".join(f"{NAMES[k]} {found[k]['version'] or ''} installed but broken: {p}".replace("  ", " ")
                            for k, (p, _) in broken.items())
        if len(summary) > 300:
            summary = summary[:297] + "..."
        return finding("fail", summary, "; ".join(f for _, f in broken.values()))
    if unusable:
        return finding("warn", "; ".join(p for p, _ in unusable.values()),
                       "; ".join(f for _, f in unusable.values()))
    if not installed:
        details.append("once installed and working, FA2 (`flash`), FA3 (`_flash_3`) and FA4 (`fa4`) are searched by "
                       "`qwendoctor tune` as diffusers attention backends, and attention_truth times them")
        if gpu_name is None:  # GPU-only advice stays off a machine without one
            return finding("ok", "no flash-attention package installed; it runs on NVIDIA GPUs only, so this machine "
                                 "needs none")
        return finding("ok", "no flash-attention package installed: the default SDPA attention (cuDNN where torch "
                             f"picks it) serves; {_fa4_gain(gpu_name)} (./install_flash_attention.sh --which fa4)")
    names = ", ".join(f"{NAMES[k]} {found[k]['version'] or ''}".strip() for k in working)
    checked = "numbers match" if check is not None else "numbers not checked (no CUDA GPU)"
    return finding("ok", f"{names} import{'s' if len(working) == 1 else ''}; {checked}")
