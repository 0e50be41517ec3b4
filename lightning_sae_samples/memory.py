"""Memory free on a device, read from the operating system or the CUDA driver."""

from __future__ import annotations

import os
from typing import Optional

import torch


def available_memory_bytes(device: torch.device | str) -> Optional[int]:
    """Memory free for new tensors on ``device``: host RAM (``MemAvailable``, else free pages) or CUDA memory.

    ``None`` where it cannot be told (other accelerators).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
