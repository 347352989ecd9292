"""Peak resident memory of this process on Linux, shared by the benchmarks that measure CPU memory."""


def rss_bytes(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak since the last `reset_peak_rss`) of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (`VmHWM`) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
