"""Peak-memory helpers shared by the benchmarks (Linux /proc only), and the image the
memory runs use."""

import numpy as np


def blobs(n):
    """The memory benchmarks' image (``bench_pipeline.py --memory``, ``profile_fit.py``):
    float32 noise of sigma 10 on 100 plus a gradient, and 3000 5x5 sources of 10-500
    per 4096^2 (scaled with the area)."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((n, n), dtype=np.float32)
    image *= 10
    image += 100 + 0.01 * np.arange(n, dtype=np.float32)[:, None]
    for y, x in rng.integers(10, n - 10, (max(1, round(3000 * (n / 4096) ** 2)), 2)):
        image[y - 2 : y + 3, x - 2 : x + 3] += rng.uniform(10, 500)
    return image


def status_kb(field):
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Reset the peak RSS (VmHWM) to the current RSS, which is returned in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")
