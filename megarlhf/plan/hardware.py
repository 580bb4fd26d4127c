"""Accelerators the planner knows: memory, peak bf16 FLOP/s, HBM and link bandwidths.

Layer: plan/ (pure Python). Figures are the vendors' datasheet values for the SXM parts
(dense bf16, no sparsity); bandwidths are per GPU and per direction. What a framework
actually achieves is a fraction of these, set by the named factors in `plan/timing.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarlhf.config.errors import ConfigError

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator and the links around it."""

    name: str
    memory_bytes: float
    """HBM capacity as the driver reports it (what `torch.cuda.mem_get_info` starts from)."""
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    hbm_bytes_per_s: float
    """HBM bandwidth, bytes/s."""
    nvlink_bytes_per_s: float
    """Intra-node GPU-GPU bandwidth per GPU and direction (NVLink / NVSwitch), bytes/s."""
    network_bytes_per_s: float
    """Inter-node bandwidth per GPU (one NIC per GPU in HGX/DGX nodes), bytes/s."""
    pcie_bytes_per_s: float
    """Host link per GPU and direction (optimizer / weight offload traffic), bytes/s."""
    note: str = ""


GPUS = {
    g.name: g
    for g in (
        # H100 SXM5 80GB (HGX H100): 989 TFLOP/s bf16 dense, HBM3 3.35 TB/s, NVLink4 900 GB/s
        # bidirectional, 8x ConnectX-7 400 Gb/s per node, PCIe Gen5 x16.
        GPU("H100", 79.6 * GIB, 989e12, 3.35e12, 450 * GB, 50 * GB, 64 * GB, "H100 SXM5 80GB"),
        # H200 SXM 141GB: the H100's compute with HBM3e, 4.8 TB/s.
        GPU("H200", 140.4 * GIB, 989e12, 4.8e12, 450 * GB, 50 * GB, 64 * GB, "H200 SXM 141GB"),
        # A100 SXM4 80GB: 312 TFLOP/s bf16, HBM2e 2.04 TB/s, NVLink3 600 GB/s bidirectional,
        # HDR 200 Gb/s per GPU, PCIe Gen4.
        GPU("A100", 79.2 * GIB, 312e12, 2.039e12, 300 * GB, 25 * GB, 32 * GB, "A100 SXM4 80GB"),
        # A800: the A100 for the Chinese market, NVLink capped at 400 GB/s bidirectional.
        GPU("A800", 79.2 * GIB, 312e12, 2.039e12, 200 * GB, 25 * GB, 32 * GB, "A800 SXM4 80GB (NVLink 400 GB/s)"),
        # B200 (HGX B200, 1000 W): 2.25 PFLOP/s bf16 dense, HBM3e 8 TB/s, 180 GB usable,
        # NVLink5 1.8 TB/s bidirectional, 400 Gb/s per GPU, PCIe Gen5.
        GPU("B200", 178.0 * GIB, 2250e12, 8.0e12, 900 * GB, 50 * GB, 64 * GB, "B200 (HGX, 180 GB)"),
    )
}


def get_gpu(name: str) -> GPU:
    """The GPU called `name` (case-insensitive), or ConfigError listing the known ones."""
    for key, gpu in GPUS.items():
        if key.lower() == name.lower():
            return gpu
    raise ConfigError(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)}")
