"""What the scripts ask of a device, the same on a GPU and a CPU: its peak memory,
waiting for it, handing memory back, and a line naming the machine."""

import gc
import os
import platform
import resource
from pathlib import Path

import torch


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS that getrusage reports to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's high-water mark so far


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    cpuinfo = Path("/proc/cpuinfo")
    fields = {}
    if cpuinfo.is_file():  # the first processor's fields
        for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields:  # a bare "AMD EPYC" says little; family and model name the generation
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return f"CPU {name}, {os.cpu_count()} logical CPUs"
