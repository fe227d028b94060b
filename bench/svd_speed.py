"""SVD cost: exact vs randomized truncated SVD, the randomized error, and OSD time over TruncSVD.

    python bench/svd_speed.py [--device cuda] [--sizes 384x384,1536x384,1024x1024,4096x4096]

Matrices are synthetic deltas with a slowly decaying spectrum (sigma_i ~ (1+i)^-0.5, close to
the flat spectra of real fine-tune deltas, the hard case for randomized SVD) plus noise. For each
size the exact SVD is computed once (its cost does not depend on k); the randomized one per k.
"""

from __future__ import annotations

import argparse
from functools import partial
import time

import torch

from osd_core.config import CompressionConfig
from osd_core.factorize import compress_matrix
from osd_core.svd import truncated_svd


def synthetic_delta(n: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = min(n, d)
    u, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, m, generator=gen))
    s = (1 + torch.arange(m, dtype=torch.float32)) ** -0.5
    return ((u * s) @ v.T * 1e-3).to(device)


def timed(fn, device: str, repeat: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="384x384,1536x384,1024x1024,4096x4096")
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    args = parser.parse_args()
    ranks = [int(k) for k in args.ranks.split(",")]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':>10} {'k':>3} {'exact s':>8} {'rand s':>8} {'speed-up':>8} {'excess err':>10} "
          f"{'sigma err':>9} {'osd/tsvd':>8}")
    for size in args.sizes.split(","):
        n, d = (int(x) for x in size.split("x"))
        delta = synthetic_delta(n, d, args.device)
        grad = torch.randn(n, d, device=args.device)
        exact_time, exact = timed(partial(truncated_svd, delta, min(n, d), method="exact"), args.device, repeat=1)
        norm = torch.linalg.norm(delta)
        for k in ranks:
            if k > min(n, d):
                continue
            rand_time, approx = timed(partial(truncated_svd, delta, k, method="randomized"), args.device)
            best = torch.linalg.norm(delta - (exact.u[:, :k] * exact.s[:k]) @ exact.v[:, :k].T) / norm
            got = torch.linalg.norm(delta - (approx.u * approx.s) @ approx.v.T) / norm
            sigma_err = float(((approx.s - exact.s[:k]).abs() / exact.s[:k]).max())
            tsvd_time, _ = timed(partial(compress_matrix, "w", delta, CompressionConfig(method="truncsvd", rank=k),
                                         device=args.device), args.device)
            osd_config = CompressionConfig(method="osd", rank=max(1, k // 2), extra_rank=k - max(1, k // 2))
            osd_time, _ = timed(partial(compress_matrix, "w", delta, osd_config, grad, device=args.device), args.device)
            print(f"{size:>10} {k:>3} {exact_time:8.3f} {rand_time:8.4f} {exact_time / rand_time:7.1f}x "
                  f"{float(got / best - 1):10.2e} {sigma_err:9.2e} {osd_time / tsvd_time:7.2f}x")


if __name__ == "__main__":
    main()
