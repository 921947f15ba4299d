"""Peak memory of SparseGPT's inverse-Hessian factor (core.factor.inverse_hessian_factor)
for an n x n Hessian, against n² fp32 bytes; the previous implementation for comparison.

    .venv/bin/python scripts/bench_factor.py            # n = 4096, CPU (and CUDA when present)
    .venv/bin/python scripts/bench_factor.py --n 8192

Each variant runs in a process of its own. On the CPU the figure is the rise of the resident
high-water mark (VmHWM, reset just before the call) over what the process held with H alone; on
CUDA it is torch's peak allocation above the same baseline. Both count every temporary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from llmprune.io.memory import peak_rss_bytes, reset_peaks
from llmprune.core.factor import inverse_hessian_factor

n, variant, device = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)

def previous(H, damp):  # the implementation before the memory fix, for comparison
    mean_diag = H.diagonal().mean()
    flipped = H.flip(0, 1)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    lower, _ = torch.linalg.cholesky_ex(flipped + eye * (damp * mean_diag))
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1), damp

H = torch.randn(n, n, device=device)
H = H @ H.T / n
H.diagonal().add_(1.0)
warm = torch.eye(64, device=device)  # load the linear-algebra kernels before measuring
torch.linalg.solve_triangular(torch.linalg.cholesky(warm), warm, upper=False)
solve = previous if variant == "previous" else inverse_hessian_factor
if device == "cpu":
    reset_peaks()
    base = peak_rss_bytes()
    U, _ = solve(H, 0.01)
    extra = peak_rss_bytes() - base
else:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    U, _ = solve(H, 0.01)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
print(json.dumps({"extra_bytes": extra, "n2_bytes": n * n * 4}))
"""


def measure(n: int, variant: str, device: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, str(n), variant, device], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["extra_bytes"] / result["n2_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"n = {args.n}, n² fp32 = {args.n ** 2 * 4 / 2**20:.0f} MiB")
    print(f"{'device':<8}{'implementation':<16}{'peak beyond H':>15}{'with H':>10}")
    for device in devices:
        for variant in ("previous", "current"):
            ratio = measure(args.n, variant, device)
            print(f"{device:<8}{variant:<16}{ratio:>12.2f} n²{ratio + 1:>7.2f} n²")


if __name__ == "__main__":
    main()
