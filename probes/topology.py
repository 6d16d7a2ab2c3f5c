"""topology: how the GPUs are connected, for multi-GPU generation (`generate --gpus N`).

NVML gives each GPU's active NVLink links and each pair's closest common ancestor on the PCIe tree; torch says
whether each pair of visible devices has peer access (direct GPU-to-GPU copies, which NCCL uses). CFG-parallel
exchanges one latent-sized tensor per step and scales over PCIe too; Ulysses and ring move activations around
every attention call (~60 a pass), which wants NVLink. Skipped with fewer than two GPUs.
"""

from __future__ import annotations

from probes.context import ProbeContext, exc_line
from probes.finding import Finding

MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS on Hopper; queries past a GPU's last link raise, which ends the count
# nvmlDeviceGetTopologyCommonAncestor levels (nvmlGpuTopologyLevel_t), for pairs without NVLink.
PCIE_PATHS = {0: "same board", 10: "one PCIe switch", 20: "several PCIe switches", 30: "a PCIe host bridge",
              40: "one NUMA node (host bridges)", 50: "across CPU sockets (SMP interconnect)"}


def _nvlink_links(nvml, handle) -> int:
    """Active NVLink links of one GPU; 0 where NVML does not support the query (PCIe boards)."""
    active = 0
    for link in range(MAX_LINKS):
        try:
            active += int(nvml.nvmlDeviceGetNvLinkState(handle, link) == 1)
        except Exception:
            break
    return active


def _pcie_path(nvml, first, second) -> str | None:
    try:
        return PCIE_PATHS.get(int(nvml.nvmlDeviceGetTopologyCommonAncestor(first, second)))
    except Exception:
        return None


def _peer_access(ctx: ProbeContext) -> tuple[list[list[bool]] | None, str | None]:
    """can_device_access_peer for each ordered pair of torch-visible devices; (None, why) without CUDA."""
    try:
        torch = ctx.import_module("torch")
        if not torch.cuda.is_available():
            return None, "torch sees no CUDA device"
        count = torch.cuda.device_count()
        return [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(count)]
                for i in range(count)], None
    except Exception as exc:
        return None, exc_line(exc)


def probe(ctx: ProbeContext) -> Finding:
    try:
        nvml = ctx.nvml()
    except ImportError as exc:
        return Finding(id="topology", status="warn", summary="cannot read the GPU topology: nvidia-ml-py is not "
                       "installed", details=[exc_line(exc)], fix="pip install nvidia-ml-py")
    except Exception as exc:
        return Finding(id="topology", status="skip", summary="no NVIDIA GPU (NVML not available)",
                       details=[exc_line(exc)])
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(int(nvml.nvmlDeviceGetCount()))]
        if len(handles) < 2:
            return Finding(id="topology", status="skip",
                           summary=f"{len(handles)} GPU: multi-GPU generation does not apply")
        links = [_nvlink_links(nvml, handle) for handle in handles]
        paths = {f"{i}-{j}": _pcie_path(nvml, handles[i], handles[j])
                 for i in range(len(handles)) for j in range(i + 1, len(handles))}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    peer, peer_why = _peer_access(ctx)

    details = [f"GPU {i}: {n} NVLink link{'s' if n != 1 else ''} active" if n else f"GPU {i}: no NVLink (PCIe)"
               for i, n in enumerate(links)]
    if not all(links):
        details += [f"GPUs {pair} over PCIe: {path}" for pair, path in paths.items() if path]
    no_peer = [f"{i}->{j}" for i, row in enumerate(peer or []) for j, ok in enumerate(row) if not ok]
    if peer is None:
        details.append(f"peer access not checked: {peer_why}")
    else:
        details.append(f"peer access between all {len(peer)} visible GPUs" if not no_peer
                       else f"no peer access: {', '.join(no_peer)}")
    measured = {"gpus": len(handles), "nvlink_links": links, "pcie_paths": paths, "peer_access": peer}

    kind = "NVLink" if all(links) else ("partly NVLink" if any(links) else "PCIe only")
    summary = f"{len(handles)} GPUs, {kind}" + ("" if peer is None else
                                                 ", peer access " + ("on every pair" if not no_peer else "missing"))
    if all(links) and not no_peer:
        return Finding(id="topology", status="ok", summary=summary, details=details, measured=measured)
    return Finding(id="topology", status="warn", summary=summary, details=details, measured=measured,
                   fix="prefer `generate --gpus 2 --parallel cfg` (one exchange per step) over ulysses/ring, whose "
                       "per-attention exchanges are bandwidth bound without NVLink and peer access; "
                       "`nvidia-smi topo -m` shows the links")
