"""The machine a benchmark ran on, for the results' headers and folder names."""

import platform

import torch


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from mnv2_kernels import _extension

    isa = _extension.cpu_isa() if _extension.LOADED else "none (reference backend)"
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_isa": isa}


def machine_slug(machine: dict) -> str:
    name = "".join(c if c.isalnum() else "-" for c in machine["cpu"].lower()).strip("-")
    while "--" in name:
        name = name.replace("--", "-")
    return f"{name}-{machine['threads']}t"
