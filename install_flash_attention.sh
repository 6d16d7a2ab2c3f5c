#!/usr/bin/env bash
# install_flash_attention.sh: pick the flash-attention package that fits this machine (FA2, FA3 or FA4),
# install it without touching the installed torch, and prove it works; or, asked for, build SageAttention 2 (8-bit
# attention) from its source. Run with --help for the details.
#
# Every external fact comes from a command on PATH or a path an environment variable can override, so the
# tests can drive detection without a GPU: $PYTHON (default python3), nvidia-smi, nvcc, ninja, nproc, df,
# ${QWENDOCTOR_MEMINFO:-/proc/meminfo}. With QWENDOCTOR_SOURCE_ONLY=1 the script (when sourced) only defines
# its functions and returns.

PROG=install_flash_attention.sh

EXIT_OK=0
EXIT_FAILED=1
EXIT_USAGE=2
EXIT_NO_GPU=3
EXIT_CC=4
EXIT_NO_NVCC=5
EXIT_RESOURCES=6
EXIT_NO_INDEX=7
EXIT_TORCH=8

KB_PER_NVCC_JOB=5242880      # ~5 GiB of RAM per nvcc job (flash-attn's template-heavy kernels)
MIN_RAM_KB_SOURCE=8388608    # 8 GiB free RAM for any source build
MIN_DISK_KB_SOURCE=10485760  # 10 GiB free disk for a source build
MIN_DISK_KB_FA4=2097152      # 2 GiB free disk for FA4 (wheels only)
FA4_REQUIREMENT='flash-attn-4>=4.0.0b1'   # FA4 exists only as pre-releases: the specifier admits them
SAGE2_CCS="80 86 89 90 100 120 121"       # the compute capabilities SageAttention 2.2's setup.py builds for
ROUTE_TIMEOUT_S=30

usage() {
    cat <<'EOF'
Usage: install_flash_attention.sh [--which auto|fa2|fa3|fa4|sage2] [--source DIR] [--wheel PATH]
                                  [--wheelhouse DIR] [--dry-run] [--help]

Detects Python/pip, torch (version, CUDA, C++11 ABI), the GPU's compute capability, nvcc, ninja, cores, free
RAM and disk; plans which flash-attention package fits; prints the plan; installs it; verifies it.

  --which auto   (default) cc 9.x (Hopper), 10.x-12.x (Blackwell): FA4 (flash-attn-4, CuTe DSL, no compile);
                 cc 8.x (Ampere/Ada): FA2 built from the flash-attn source distribution.
                 With --source DIR: FA3 from DIR/hopper on Hopper, else FA2 from DIR.
  --which fa2    flash-attn (FA2), built from source: --no-build-isolation, ninja, MAX_JOBS from free RAM
                 (~5 GiB a job) and cores, only this GPU's arch (TORCH_CUDA_ARCH_LIST, FLASH_ATTN_CUDA_ARCHS).
  --which fa3    FA3 (flash_attn_interface) built from a flash-attention checkout: needs --source DIR; Hopper only.
  --which fa4    flash-attn-4 and its CuTe DSL wheels (cc >= 9.0); on a CUDA 13 torch adds nvidia-cutlass-dsl[cu13].
  --which sage2  SageAttention 2 (8-bit attention: INT8 QK, FP8 PV on cc 8.9 and newer), built from a checkout of
                 github.com/thu-ml/SageAttention (--source DIR) or installed from a wheel built so (--wheel). Never
                 chosen by auto: it is lossy (qwendoctor's FP8 tier, backend "sageattn"). PyPI has 1.0.6 only.
  --source DIR   a flash-attention source tree (FA3 builds DIR/hopper; FA2 builds DIR), or SageAttention's.
  --wheel PATH   install this prebuilt wheel (kind read from its name: flash_attn-, flash_attn_3-, flash_attn_4-,
                 sageattention-2);
                 an FA2 wheel tagged +cuXXtorchX.YcxxabiTRUE/FALSE must match the installed torch.
  --wheelhouse DIR
                 offline: every pip call gets --no-index --find-links DIR (all wheels must be in DIR; for
                 FA4: flash-attn-4, nvidia-cutlass-dsl, -libs-base, -libs-core, -libs-cu12 or -cu13 as
                 torch's CUDA, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext, installed --no-deps).
  --dry-run      print the detection and the plan, run every check, install nothing.
  -h, --help     this text.

Safety: the installed torch is never changed: every pip call gets -c FILE with FILE = "torch==<installed>".
Idempotent: if the chosen package already imports and passes the numerical check, nothing is installed.
Verification (fresh python process): import, bf16 q/k/v [1, 256, 4, 64] against float64 SDPA (relative
error < 2e-2), then `qwendoctor check --only flash_attn` when `qwendoctor` is on PATH. SageAttention 2: q/k/v
[1, 1024, 4, 128] within 0.1 (qwendoctor's limit for 8-bit kernels), then `--only attention_backends`.

Environment: PYTHON (default python3) is the interpreter whose environment gets the package;
QWENDOCTOR_MEMINFO (default /proc/meminfo); MAX_JOBS, if set, caps the computed job count.

Exit codes:
  0  installed and verified, already installed, or --dry-run with every check passing
  1  install or verification failed
  2  usage error
  3  no NVIDIA GPU (nvidia-smi missing or shows no GPU)
  4  unsupported compute capability (< 8.0; FA3 on non-Hopper; FA4 below 9.0; SageAttention 2 not built for it)
  5  no nvcc (or one whose CUDA major differs from torch's, or too old for SageAttention 2 here) for a source build
  6  not enough free RAM (8 GiB, source build) or disk (10 GiB source build, 2 GiB FA4)
  7  no route to the package index (skipped with --wheelhouse or --wheel)
  8  torch/pip problem: python, pip or CUDA torch missing, or a wheel built for another torch/CUDA/ABI/Python
Errors are one line on stderr: "install_flash_attention.sh: error: ...".
EOF
}

die() {
    local code=$1
    shift
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

say() { printf '%s\n' "$*"; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# max_jobs RAM_KB CORES: nvcc jobs that fit: min(RAM / 5 GiB, cores), at least 1.
max_jobs() {
    local ram_kb=$1 cores=$2 jobs
    is_uint "$ram_kb" || ram_kb=0
    is_uint "$cores" || cores=1
    jobs=$((ram_kb / KB_PER_NVCC_JOB))
    ((cores < jobs)) && jobs=$cores
    ((jobs < 1)) && jobs=1
    printf '%s\n' "$jobs"
}

# cc_int "8.6" -> 86; empty when not a compute capability.
cc_int() {
    if [[ $1 =~ ^([0-9]+)\.([0-9]+)$ ]]; then
        printf '%s\n' "$((BASH_REMATCH[1] * 10 + BASH_REMATCH[2]))"
    fi
}

# fa_archs "8.6" -> 80: flash-attn's setup.py knows only 80/90/100/110/120 (an sm_80 binary runs on 8.6/8.9).
fa_archs() {
    local major=${1%%.*}
    printf '%s0\n' "$major"
}

gib() { awk -v kb="$1" 'BEGIN { printf "%.1f GiB", kb / 1048576 }'; }

# version_at_least "12.4" "12.3": whether the first MAJOR.MINOR is at or above the second.
version_at_least() {
    local a_major=${1%%.*} a_minor=${1#*.} b_major=${2%%.*} b_minor=${2#*.}
    a_minor=${a_minor%%.*} b_minor=${b_minor%%.*}
    ((a_major > b_major || (a_major == b_major && a_minor >= b_minor)))
}

# sage2_min_nvcc CC: the oldest CUDA SageAttention 2.2's setup.py accepts for this compute capability.
sage2_min_nvcc() {
    case "$1" in
    8.9) echo 12.4 ;;
    9.0) echo 12.3 ;;
    12.*) echo 12.8 ;;
    *) echo 12.0 ;;
    esac
}

# check_id KIND: the `qwendoctor check` probe that sees this package.
check_id() {
    if [[ $1 == sage2 ]]; then echo attention_backends; else echo flash_attn; fi
}

# free_kb PATH: available KB on PATH's filesystem (nearest existing parent), via df -Pk.
free_kb() {
    local p=$1
    while [[ -n $p && ! -e $p ]]; do p=$(dirname "$p"); done
    [[ -n $p ]] || p=/
    df -Pk "$p" 2>/dev/null | awk 'NR > 1 && $4 ~ /^[0-9]+$/ { kb = $4 } END { if (kb != "") print kb }'
}

# wheel_kind FILE -> fa2|fa3|fa4|sage2 from the wheel's distribution name.
wheel_kind() {
    local base
    base=$(basename "$1")
    case "$base" in
    flash_attn_4-* | flash-attn-4-*) echo fa4 ;;
    flash_attn_3-* | flash-attn-3-* | flashattn_hopper-*) echo fa3 ;;
    flash_attn-* | flash-attn-*) echo fa2 ;;
    sageattention-2.*) echo sage2 ;;
    *) echo unknown ;;
    esac
}

# wheel_mismatch FILE: one line naming why this prebuilt wheel cannot load with the installed torch, or nothing.
wheel_mismatch() {
    local base torch_mm cuda_major abi py_tag
    base=$(basename "$1")
    torch_mm=$(printf '%s' "$T_TORCH" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
    cuda_major=${T_CUDA%%.*}
    if [[ $base =~ \+cu([0-9]+)torch([0-9]+\.[0-9]+)cxx11abi(TRUE|FALSE) ]]; then
        local w_cuda=${BASH_REMATCH[1]} w_torch=${BASH_REMATCH[2]} w_abi=${BASH_REMATCH[3]}
        w_cuda=${w_cuda:0:2}
        if [[ $w_torch != "$torch_mm" ]]; then
            echo "wheel $base is built for torch $w_torch but torch $T_TORCH is installed (undefined symbol at import)"
            return
        fi
        if [[ $w_cuda != "$cuda_major" ]]; then
            echo "wheel $base is built for CUDA $w_cuda but torch uses CUDA $T_CUDA"
            return
        fi
        abi=FALSE
        [[ $T_ABI == 1 || $T_ABI == True ]] && abi=TRUE
        if [[ $w_abi != "$abi" ]]; then
            echo "wheel $base has cxx11abi$w_abi but torch has cxx11abi$abi (undefined symbol at import)"
            return
        fi
    fi
    py_tag="cp${T_PY//./}"
    if [[ $base =~ -(cp[0-9]+)-[^-]+-[^-]+\.whl$ && ${BASH_REMATCH[1]} != "$py_tag" && $T_PY != unknown ]]; then
        echo "wheel $base is for ${BASH_REMATCH[1]} but $PYTHON is Python $T_PY"
    fi
}

# The torch facts, from one python call: the first line is the spec'd one, site/scripts/build_missing follow.
DETECT_PY='import importlib.util, sys, sysconfig
py = "%d.%d" % sys.version_info[:2]
try:
    import pip
    pipv = pip.__version__
except Exception:
    pipv = "none"
try:
    import torch
    tv = torch.__version__
    cu = torch.version.cuda or "none"
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
except Exception:
    tv, cu, abi = "none", "none", "none"
print("torch=%s cuda=%s cxx11abi=%s python=%s pip=%s" % (tv, cu, abi, py, pipv))
print("site=" + sysconfig.get_paths()["purelib"])
print("scripts=" + sysconfig.get_paths()["scripts"])
missing = [m for m in ("setuptools", "wheel", "packaging", "psutil") if importlib.util.find_spec(m) is None]
print("build_missing=" + ",".join(missing))'

# Verification, in a fresh process: argv = [-c, verify, fa2|fa3|fa4|sage2]. Prints one "version=" line and one
# result line; exit 0 only when it imports and matches float64 SDPA.
VERIFY_PY='import importlib, importlib.metadata as md, sys
kind = sys.argv[2]
mod_name, dists = {
    "fa2": ("flash_attn", ("flash-attn",)),
    "fa3": ("flash_attn_interface", ("flash_attn_3", "flash-attn-3", "flashattn-hopper")),
    "fa4": ("flash_attn.cute", ("flash-attn-4",)),
    "sage2": ("sageattention", ("sageattention",)),
}[kind]
# SageAttention quantizes q and k to 8 bits: held to the 8-bit limit qwendoctor checks its kernels against.
limit, shape = (0.1, (1, 1024, 4, 128)) if kind == "sage2" else (2e-2, (1, 256, 4, 64))
version = "unknown"
for d in dists:
    try:
        version = md.version(d)
        break
    except md.PackageNotFoundError:
        pass
print("version=" + version)
if kind == "sage2" and not version.startswith("2."):
    print("sageattention %s is not SageAttention 2 (PyPI has 1.x only): build it with --source DIR" % version)
    sys.exit(1)
try:
    import torch
    mod = importlib.import_module(mod_name)
    if kind == "sage2":
        fn = lambda q, k, v: mod.sageattn(q, k, v, tensor_layout="NHD")
    else:
        fn = getattr(mod, "flash_attn_func")
except Exception as exc:
    print("import failed: %s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
    sys.exit(1)
try:
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = fn(q, k, v)
    if isinstance(out, (tuple, list)):
        out = out[0]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)
    err = ((out.double() - ref).norm() / ref.norm()).item()
except Exception as exc:
    print("attention call failed: %s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
    sys.exit(1)
if not err < limit:
    print("wrong numbers: relative error %.3g vs float64 SDPA (limit %g)" % (err, limit))
    sys.exit(1)
print("%s imports and matches float64 SDPA: relative error %.2e (bf16 q/k/v %s)" % (mod_name, err, list(shape)))'

detect_torch() {
    local out line key
    T_TORCH=none T_CUDA=none T_ABI=none T_PY=unknown T_PIP=none T_SITE="" T_SCRIPTS="" T_BUILD_MISSING=""
    out=$("$PYTHON" -c "$DETECT_PY" detect 2>/dev/null) || return 1
    while IFS= read -r line; do
        if [[ $line == torch=* ]]; then
            local tok
            for tok in $line; do
                key=${tok%%=*}
                case "$key" in
                torch) T_TORCH=${tok#*=} ;;
                cuda) T_CUDA=${tok#*=} ;;
                cxx11abi) T_ABI=${tok#*=} ;;
                python) T_PY=${tok#*=} ;;
                pip) T_PIP=${tok#*=} ;;
                esac
            done
        elif [[ $line == site=* ]]; then
            T_SITE=${line#site=}
        elif [[ $line == scripts=* ]]; then
            T_SCRIPTS=${line#scripts=}
        elif [[ $line == build_missing=* ]]; then
            T_BUILD_MISSING=${line#build_missing=}
        fi
    done <<<"$out"
    [[ $T_TORCH != none || $out == *torch=* ]]
}

detect_gpu() {
    GPU_CC="" GPU_NAME="" GPU_COUNT=0 GPU_NOTE=""
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    local out line cc name ccs=""
    out=$(nvidia-smi --query-gpu=compute_cap,name --format=csv,noheader 2>/dev/null) || return 0
    while IFS= read -r line; do
        [[ -n ${line//[[:space:]]/} ]] || continue
        cc=$(printf '%s' "${line%%,*}" | tr -d '[:space:]')
        name=$(printf '%s' "${line#*,}" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+$//')
        GPU_COUNT=$((GPU_COUNT + 1))
        if [[ -z $GPU_CC ]]; then
            GPU_CC=$cc GPU_NAME=$name
        fi
        [[ " $ccs " == *" $cc "* ]] || ccs="$ccs $cc"
    done <<<"$out"
    if [[ $ccs == *" "*" "* ]]; then
        GPU_NOTE="GPUs of different compute capabilities ($ccs ): planning for the first"
    fi
}

detect_tools() {
    NVCC="" NVCC_VERSION="" NINJA_VERSION=""
    if command -v nvcc >/dev/null 2>&1; then
        NVCC=$(command -v nvcc)
    elif [[ -n ${CUDA_HOME:-} && -x ${CUDA_HOME}/bin/nvcc ]]; then
        NVCC=${CUDA_HOME}/bin/nvcc
    fi
    if [[ -n $NVCC ]]; then
        NVCC_VERSION=$("$NVCC" --version 2>/dev/null | sed -nE 's/.*release ([0-9]+\.[0-9]+).*/\1/p' | head -n 1)
        [[ -n $NVCC_VERSION ]] || NVCC=""
    fi
    if command -v ninja >/dev/null 2>&1; then
        NINJA_VERSION=$(ninja --version 2>/dev/null | head -n 1)
    fi
    CORES=""
    command -v nproc >/dev/null 2>&1 && CORES=$(nproc 2>/dev/null)
    is_uint "${CORES:-x}" || CORES=$(getconf _NPROCESSORS_ONLN 2>/dev/null)
    is_uint "${CORES:-x}" || CORES=1
    RAM_KB=$(awk '$1 == "MemAvailable:" { print $2 }' "${QWENDOCTOR_MEMINFO:-/proc/meminfo}" 2>/dev/null)
    is_uint "${RAM_KB:-x}" || RAM_KB=0
    PIP_CACHE=${PIP_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/pip}
    # The least free space among where pip builds (TMPDIR), caches and installs.
    DISK_KB=""
    DISK_WHERE=""
    local p kb
    for p in "${T_SITE:-}" "$PIP_CACHE" "${TMPDIR:-/tmp}"; do
        [[ -n $p ]] || continue
        kb=$(free_kb "$p")
        is_uint "${kb:-x}" || continue
        if [[ -z $DISK_KB ]] || ((kb < DISK_KB)); then
            DISK_KB=$kb DISK_WHERE=$p
        fi
    done
}

# shell_words ARGS...: the arguments as one line a shell reads back the same (quotes only where needed).
shell_words() {
    local a out=""
    for a in "$@"; do
        if [[ ! $a =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
            a="'${a//\'/\'\\\'\'}'"
        fi
        out+="${out:+ }$a"
    done
    printf '%s\n' "$out"
}

# pip_cmd ARGS...: run $PYTHON -m pip with ARGS (already carrying -c); echo it first.
pip_cmd() {
    say "+ $(shell_words "$PYTHON" -m pip "$@")"
    "$PYTHON" -m pip "$@"
}

# Build the plan: PLAN_KIND, PLAN_SOURCE (build or wheel), PIP_STEPS (arrays), PLAN_ENV.
make_plan() {
    local cc=$1 cci
    cci=$(cc_int "$cc")
    [[ -n $cci ]] || die $EXIT_CC "could not read the GPU's compute capability from nvidia-smi (got '$cc'; driver too old?)"
    ((cci < 80)) && die $EXIT_CC "compute capability $cc ($GPU_NAME) is below 8.0: flash-attention needs Ampere or newer"

    PLAN_KIND=$WHICH
    if [[ -n $WHEEL ]]; then
        local wk
        wk=$(wheel_kind "$WHEEL")
        if [[ $WHICH == auto ]]; then
            [[ $wk != unknown ]] || die $EXIT_USAGE "cannot tell FA2/FA3/FA4/SageAttention 2 from the wheel's name $(basename "$WHEEL"); add --which fa2|fa3|fa4|sage2"
            PLAN_KIND=$wk
        elif [[ $wk != unknown && $wk != "$WHICH" ]]; then
            die $EXIT_USAGE "--which $WHICH but $(basename "$WHEEL") is an $wk wheel"
        fi
    elif [[ $WHICH == auto ]]; then
        if [[ -n $SOURCE ]]; then
            if ((cci >= 90 && cci < 100)); then PLAN_KIND=fa3; else PLAN_KIND=fa2; fi
        elif ((cci >= 90)); then
            PLAN_KIND=fa4
        else
            PLAN_KIND=fa2
        fi
    fi

    case "$PLAN_KIND" in
    fa3)
        ((cci >= 90 && cci < 100)) || die $EXIT_CC "FA3 runs on Hopper (cc 9.x) only; this GPU ($GPU_NAME) is cc $cc"
        ;;
    fa4)
        ((cci >= 90)) || die $EXIT_CC "FA4 needs cc 9.0 or newer (Hopper/Blackwell); this GPU ($GPU_NAME) is cc $cc: use --which fa2"
        ;;
    sage2)
        [[ " $SAGE2_CCS " == *" $cci "* ]] || die $EXIT_CC "SageAttention 2's setup.py builds for cc 8.0, 8.6, 8.9, 9.0, 10.0, 12.0 and 12.1; this GPU ($GPU_NAME) is cc $cc"
        ;;
    esac

    if [[ -n $WHEEL ]]; then
        PLAN_MODE=wheel
    elif [[ $PLAN_KIND == fa4 ]]; then
        PLAN_MODE=index
    else
        PLAN_MODE=build
        if [[ $PLAN_KIND == fa3 ]]; then
            [[ -n $SOURCE ]] || die $EXIT_USAGE "FA3 is built from a flash-attention checkout: pass --source DIR (DIR/hopper/setup.py)"
            [[ -f $SOURCE/hopper/setup.py ]] || die $EXIT_USAGE "--source $SOURCE has no hopper/setup.py (FA3 builds from DIR/hopper)"
        fi
        if [[ $PLAN_KIND == sage2 ]]; then
            [[ -n $SOURCE ]] || die $EXIT_USAGE "SageAttention 2 is not on PyPI: pass --source DIR (a checkout of github.com/thu-ml/SageAttention) or --wheel PATH"
            [[ -f $SOURCE/setup.py && -f $SOURCE/sageattention/__init__.py ]] || die $EXIT_USAGE "--source $SOURCE is not a SageAttention checkout (no setup.py and sageattention/__init__.py)"
        fi
    fi
}

# fill PIP_ARGS_COMMON, PLAN_TARGETS, PLAN_PREP (build deps to install first), PLAN_ENV.
fill_plan_commands() {
    PIP_ARGS_COMMON=(-c "$CONSTRAINTS")
    [[ -n $WHEELHOUSE ]] && PIP_ARGS_COMMON+=(--no-index --find-links "$WHEELHOUSE")
    PLAN_TARGETS=()
    PLAN_PREP=()
    PLAN_ENV=()
    PLAN_BUILD_FLAGS=()
    local cuda_major=${T_CUDA%%.*}
    case "$PLAN_KIND" in
    fa4)
        if [[ $PLAN_MODE == wheel ]]; then PLAN_TARGETS+=("$WHEEL"); else PLAN_TARGETS+=("$FA4_REQUIREMENT"); fi
        if [[ -n $WHEELHOUSE ]]; then
            # Offline, name the CuTe DSL set for this torch's CUDA and skip the resolver: nvidia-cutlass-dsl
            # requires the ~92 MB cu12 runtime even for a CUDA 13 torch, which a wheelhouse need not carry.
            # FA4's other needs (einops, typing_extensions, cuda-bindings, protobuf) must already be installed.
            PLAN_BUILD_FLAGS=(--no-deps)
            PLAN_TARGETS+=(nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base nvidia-cutlass-dsl-libs-core
                "nvidia-cutlass-dsl-libs-cu$cuda_major" quack-kernels 'apache-tvm-ffi<0.2' torch-c-dlpack-ext)
        elif [[ $cuda_major == 13 ]]; then
            PLAN_TARGETS+=("nvidia-cutlass-dsl[cu13]")
        fi
        ;;
    fa2 | fa3 | sage2)
        if [[ $PLAN_MODE == wheel ]]; then
            PLAN_TARGETS+=("$WHEEL")
        else
            if [[ $PLAN_KIND == fa3 ]]; then
                PLAN_TARGETS+=("$SOURCE/hopper")
            elif [[ -n $SOURCE ]]; then
                PLAN_TARGETS+=("$SOURCE")
            else
                PLAN_TARGETS+=(flash-attn)
            fi
            PLAN_BUILD_FLAGS=(--no-build-isolation)
            # SageAttention needs nothing but torch: with no dependency to resolve, an offline machine builds it.
            [[ $PLAN_KIND == sage2 ]] && PLAN_BUILD_FLAGS+=(--no-deps)
            [[ -n $NINJA_VERSION ]] || PLAN_PREP+=(ninja)
            local m
            IFS=, read -r -a _missing <<<"$T_BUILD_MISSING"
            for m in "${_missing[@]}"; do [[ -n $m ]] && PLAN_PREP+=("$m"); done
            JOBS=$(max_jobs "$RAM_KB" "$CORES")
            if is_uint "${MAX_JOBS:-x}" && ((MAX_JOBS >= 1 && MAX_JOBS < JOBS)); then JOBS=$MAX_JOBS; fi
            PLAN_ENV=("MAX_JOBS=$JOBS" "NVCC_THREADS=${NVCC_THREADS:-1}" "TORCH_CUDA_ARCH_LIST=$GPU_CC")
            # SageAttention's setup.py reads TORCH_CUDA_ARCH_LIST only (and runs nvcc with --threads=8 itself).
            [[ $PLAN_KIND == sage2 ]] || PLAN_ENV+=("FLASH_ATTN_CUDA_ARCHS=$(fa_archs "$GPU_CC")")
            # Offline: stop flash-attn's setup.py from trying to fetch a prebuilt wheel from GitHub.
            [[ -n $WHEELHOUSE ]] && PLAN_ENV+=("FLASH_ATTENTION_FORCE_BUILD=TRUE")
        fi
        ;;
    esac
}

print_detection() {
    say "== detection"
    say "python:   $PYTHON (Python $T_PY, pip $T_PIP)"
    say "torch:    $T_TORCH, CUDA $T_CUDA, C++11 ABI $T_ABI"
    if [[ -n $GPU_CC ]]; then
        say "GPU:      $GPU_NAME, compute capability $GPU_CC ($GPU_COUNT GPU(s))"
        [[ -n $GPU_NOTE ]] && say "          note: $GPU_NOTE"
    else
        say "GPU:      none (nvidia-smi missing or reports no GPU)"
    fi
    if [[ -n $NVCC ]]; then say "nvcc:     $NVCC (CUDA $NVCC_VERSION)"; else say "nvcc:     not found"; fi
    say "ninja:    ${NINJA_VERSION:-not found}"
    local disk="unknown"
    [[ -n $DISK_KB ]] && disk="$(gib "$DISK_KB") (least of site-packages, pip cache, TMPDIR: $DISK_WHERE)"
    say "cores:    $CORES; free RAM $(gib "$RAM_KB"); free disk $disk"
}

print_plan() {
    local label
    case "$PLAN_KIND" in
    fa2) label="FA2 (flash-attn, import flash_attn)" ;;
    fa3) label="FA3 (flash_attn_interface)" ;;
    fa4) label="FA4 (flash-attn-4, CuTe DSL, import flash_attn.cute)" ;;
    sage2) label="SageAttention 2 (8-bit attention, import sageattention; qwendoctor backend sageattn)" ;;
    esac
    say "== plan"
    say "package:  $label"
    case "$PLAN_MODE" in
    wheel) say "from:     prebuilt wheel $WHEEL" ;;
    index)
        if [[ -n $WHEELHOUSE ]]; then say "from:     wheelhouse $WHEELHOUSE (offline, no compile step)"
        else say "from:     the package index (no compile step)"; fi
        ;;
    build) say "from:     source build of ${PLAN_TARGETS[0]}${WHEELHOUSE:+ (offline, wheelhouse $WHEELHOUSE)}; MAX_JOBS from $(gib "$RAM_KB") free / 5 GiB a job and $CORES cores" ;;
    esac
    say "torch pin: torch==$T_TORCH (constraints file passed to every pip call)"
    if ((${#PLAN_PREP[@]})); then
        say "step:     $(shell_words "$PYTHON" -m pip install "${PIP_ARGS_COMMON[@]}" "${PLAN_PREP[@]}")"
    fi
    say "step:     $(shell_words "${PLAN_ENV[@]}" "$PYTHON" -m pip install "${PLAN_BUILD_FLAGS[@]}" "${PIP_ARGS_COMMON[@]}" "${PLAN_TARGETS[@]}")"
    say "verify:   fresh-process import + bf16 check vs float64 SDPA; then qwendoctor check --only $(check_id "$PLAN_KIND")"
}

check_resources() {
    local need_disk
    if [[ $PLAN_MODE == build ]]; then
        [[ -n $NVCC ]] || die $EXIT_NO_NVCC "no nvcc on PATH (or \$CUDA_HOME/bin) for the $PLAN_KIND source build: install the CUDA $T_CUDA toolkit, or use --wheel PATH"
        local cuda_major=${T_CUDA%%.*} nvcc_major=${NVCC_VERSION%%.*}
        [[ $cuda_major == "$nvcc_major" ]] || die $EXIT_NO_NVCC "nvcc is CUDA $NVCC_VERSION but torch is built with CUDA $T_CUDA: the majors must match for the source build"
        if [[ $PLAN_KIND == sage2 ]]; then
            local need
            need=$(sage2_min_nvcc "$GPU_CC")
            version_at_least "$NVCC_VERSION" "$need" || die $EXIT_NO_NVCC "SageAttention 2 for cc $GPU_CC needs nvcc $need or newer; this one is CUDA $NVCC_VERSION"
        fi
        ((RAM_KB >= MIN_RAM_KB_SOURCE)) || die $EXIT_RESOURCES "only $(gib "$RAM_KB") RAM free; the $PLAN_KIND source build needs 8 GiB (nvcc jobs take ~5 GiB each)"
        need_disk=$MIN_DISK_KB_SOURCE
    elif [[ $PLAN_KIND == fa4 ]]; then
        need_disk=$MIN_DISK_KB_FA4
    else
        need_disk=0
    fi
    if [[ -n $DISK_KB ]] && ((DISK_KB < need_disk)); then
        die $EXIT_RESOURCES "only $(gib "$DISK_KB") disk free at $DISK_WHERE; the $PLAN_KIND install needs $(gib "$need_disk")"
    fi
}

check_route() {
    [[ -n $WHEELHOUSE || $PLAN_MODE == wheel ]] && return 0
    [[ $PLAN_KIND == sage2 && ${#PLAN_PREP[@]} -eq 0 ]] && return 0  # a local checkout, nothing to fetch
    local tmp rc
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/fa-route.XXXXXX") || die $EXIT_FAILED "cannot create a temporary directory"
    local t=()
    command -v timeout >/dev/null 2>&1 && t=(timeout "$ROUTE_TIMEOUT_S")
    "${t[@]}" "$PYTHON" -m pip download --no-deps --dest "$tmp" --quiet --timeout 10 --retries 1 \
        -c "$CONSTRAINTS" "$FA4_REQUIREMENT" >/dev/null 2>&1
    rc=$?
    rm -rf "$tmp"
    ((rc == 0)) || die $EXIT_NO_INDEX "no route to the package index: 'pip download $FA4_REQUIREMENT' failed within ${ROUTE_TIMEOUT_S}s (rc $rc); offline, use --wheelhouse DIR or --wheel PATH"
}

# verify KIND [quiet]: fresh-process import + numerics, then qwendoctor check. Sets VERIFIED_VERSION.
verify() {
    local kind=$1 quiet=${2:-} out rc
    out=$("$PYTHON" -c "$VERIFY_PY" verify "$kind" 2>&1)
    rc=$?
    VERIFIED_VERSION=$(printf '%s\n' "$out" | sed -n 's/^version=//p' | head -n 1)
    if ((rc != 0)); then
        [[ -n $quiet ]] || printf '%s\n' "$out" | grep -v '^version=' | tail -n 5
        return 1
    fi
    [[ -n $quiet ]] || printf '%s\n' "$out" | grep -v '^version=' | tail -n 1
    local probe
    probe=$(check_id "$kind")
    if command -v qwendoctor >/dev/null 2>&1; then
        [[ -n $quiet ]] || say "+ qwendoctor check --only $probe"
        if [[ -n $quiet ]]; then
            qwendoctor check --only "$probe" >/dev/null 2>&1 || return 1
        else
            qwendoctor check --only "$probe" || return 1
        fi
    else
        [[ -n $quiet ]] || say "qwendoctor not on PATH: skipped 'qwendoctor check --only $probe'"
    fi
    return 0
}

parse_args() {
    WHICH=auto SOURCE="" WHEEL="" WHEELHOUSE="" DRY_RUN=0
    while (($#)); do
        case "$1" in
        -h | --help)
            usage
            exit $EXIT_OK
            ;;
        --dry-run) DRY_RUN=1 ;;
        --which | --source | --wheel | --wheelhouse)
            (($# >= 2)) || die $EXIT_USAGE "$1 needs a value (see --help)"
            case "$1" in
            --which)
                case "$2" in auto | fa2 | fa3 | fa4 | sage2) WHICH=$2 ;; *) die $EXIT_USAGE "--which takes auto, fa2, fa3, fa4 or sage2, not '$2'" ;; esac
                ;;
            --source)
                [[ -d $2 ]] || die $EXIT_USAGE "--source $2: not a directory"
                SOURCE=$(cd "$2" && pwd)
                ;;
            --wheel)
                [[ -f $2 && $2 == *.whl ]] || die $EXIT_USAGE "--wheel $2: not a .whl file"
                WHEEL=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
                ;;
            --wheelhouse)
                [[ -d $2 ]] || die $EXIT_USAGE "--wheelhouse $2: not a directory"
                WHEELHOUSE=$(cd "$2" && pwd)
                ;;
            esac
            shift
            ;;
        --self-test-max-jobs)
            (($# == 3)) || die $EXIT_USAGE "--self-test-max-jobs takes RAM_KB CORES"
            max_jobs "$2" "$3"
            exit $EXIT_OK
            ;;
        *) die $EXIT_USAGE "unknown argument '$1' (see --help)" ;;
        esac
        shift
    done
    if [[ -n $WHEEL && -n $SOURCE ]]; then die $EXIT_USAGE "--wheel and --source exclude each other"; fi
}

main() {
    parse_args "$@"
    PYTHON=${PYTHON:-python3}

    command -v "$PYTHON" >/dev/null 2>&1 || die $EXIT_TORCH "python '$PYTHON' not found (set PYTHON=/path/to/python)"
    detect_torch || die $EXIT_TORCH "'$PYTHON' failed to report its torch (is it a working Python?)"
    detect_gpu
    detect_tools
    print_detection

    [[ -n $GPU_CC ]] || die $EXIT_NO_GPU "no NVIDIA GPU: nvidia-smi is missing or lists no GPU"
    [[ $T_PIP != none ]] || die $EXIT_TORCH "pip is not installed for $PYTHON (python -m ensurepip)"
    [[ $T_TORCH != none ]] || die $EXIT_TORCH "torch is not installed for $PYTHON: install a CUDA build of torch first"
    [[ $T_CUDA != none ]] || die $EXIT_TORCH "torch $T_TORCH is a CPU-only build: install a CUDA build of torch first"

    make_plan "$GPU_CC"
    if [[ $PLAN_MODE == wheel ]]; then
        local why
        why=$(wheel_mismatch "$WHEEL")
        [[ -z $why ]] || die $EXIT_TORCH "$why"
    fi

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-flash-attention.XXXXXX") || die $EXIT_FAILED "cannot create a temporary directory"
    trap 'rm -rf "$WORK"' EXIT
    CONSTRAINTS=$WORK/constraints.txt
    printf 'torch==%s\n' "$T_TORCH" >"$CONSTRAINTS"
    fill_plan_commands
    print_plan

    local wheel_version=""
    if [[ -n $WHEEL ]]; then
        wheel_version=$(basename "$WHEEL" | cut -d- -f2)
    fi
    if verify "$PLAN_KIND" quiet && [[ -z $wheel_version || $wheel_version == "$VERIFIED_VERSION" ]]; then
        say "== $PLAN_KIND already installed (version ${VERIFIED_VERSION:-unknown}) and verified: nothing to do"
        exit $EXIT_OK
    fi

    check_resources
    check_route

    if ((DRY_RUN)); then
        say "== dry run: every check passed; nothing installed"
        exit $EXIT_OK
    fi

    say "== install"
    if ((${#PLAN_PREP[@]})); then
        pip_cmd install "${PIP_ARGS_COMMON[@]}" "${PLAN_PREP[@]}" || die $EXIT_FAILED "installing the build tools (${PLAN_PREP[*]}) failed"
        if [[ -n $T_SCRIPTS && ":$PATH:" != *":$T_SCRIPTS:"* ]]; then PATH=$T_SCRIPTS:$PATH; fi
        ninja --version >/dev/null 2>&1 || die $EXIT_FAILED "ninja still does not run after 'pip install ninja' (is $T_SCRIPTS on PATH?)"
    fi
    (
        for kv in "${PLAN_ENV[@]}"; do export "${kv?}"; done
        pip_cmd install "${PLAN_BUILD_FLAGS[@]}" "${PIP_ARGS_COMMON[@]}" "${PLAN_TARGETS[@]}"
    ) || die $EXIT_FAILED "pip install of $PLAN_KIND failed (see pip's output above; the installed torch was kept)"

    local before=$T_TORCH
    detect_torch
    [[ $T_TORCH == "$before" ]] || die $EXIT_FAILED "torch changed from $before to $T_TORCH during the install"

    say "== verify"
    verify "$PLAN_KIND" || die $EXIT_FAILED "$PLAN_KIND installed but failed verification (see above)"
    say "== $PLAN_KIND ${VERIFIED_VERSION:+$VERIFIED_VERSION }installed and verified"
    exit $EXIT_OK
}

if [[ ${QWENDOCTOR_SOURCE_ONLY:-0} == 1 ]]; then
    # shellcheck disable=SC2317  # 'exit' is reached only when executed rather than sourced.
    return 0 2>/dev/null || exit 0
fi
main "$@"
