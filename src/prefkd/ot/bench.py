"""Batched :func:`prefkd.ot.sinkhorn` against a per-example loop of POT's ``sinkhorn_log`` (issue 5).

    python -m prefkd.ot.bench [--B 8] [--m 256] [--n 256] [--eps 0.1] [--tol 1e-6] [--device cpu]

Problem: B pairs of random point clouds in R^2 (the student cloud shifted), Euclidean cost scaled by its
mean (as the MCW-KD costs are), uniform marginals, same ε. Stopping: ours at ‖P1 − a‖₁ < tol, POT at
‖Pᵀ1 − b‖₂ < tol (``stopThr``); L2 ≤ L1, so POT's test is the looser one. POT runs on float32 numpy
arrays (our solver computes in fp32); the fp64 figure is printed for reference. Needs ``pot``.
"""

from __future__ import annotations

import argparse
import time

import torch

from prefkd.ot.costs import euclidean_cost, scale_cost
from prefkd.ot.sinkhorn import sinkhorn


def _problem(B: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m, 2, generator=g)
    y = torch.randn(B, n, 2, generator=g) * 1.2 + 0.5
    return scale_cost(euclidean_cost(x, y), mode="mean")


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def benchmark(B: int = 8, m: int = 256, n: int = 256, eps: float = 0.1, tol: float = 1e-6,
              device: str = "cpu", repeats: int = 5, max_iter: int = 10000) -> dict:
    """Times (seconds, best of ``repeats``) of the batched solver and of POT's per-example loop; prints them."""
    import numpy as np

    import ot

    cost = _problem(B, m, n).to(device)
    a, b = np.full(m, 1.0 / m), np.full(n, 1.0 / n)
    sync = torch.cuda.synchronize if cost.is_cuda else (lambda: None)

    def ours():
        res = sinkhorn(cost, eps, max_iter=max_iter, tol=tol)
        sync()
        return res

    def pot(dtype):
        c = cost.double().cpu().numpy().astype(dtype)
        aa, bb = a.astype(dtype), b.astype(dtype)
        return lambda: [ot.sinkhorn(aa, bb, c[k], eps, method="sinkhorn_log", stopThr=tol, numItermax=max_iter,
                                    log=True) for k in range(B)]

    res = ours()
    pot32 = pot(np.float32)()
    t_ours = _best(ours, repeats)
    t_pot32 = _best(pot(np.float32), max(1, repeats // 2))
    t_pot64 = _best(pot(np.float64), max(1, repeats // 2))
    diff = max(float(np.abs(res.plan[k].cpu().numpy() - pot32[k][0]).max()) for k in range(B))
    out = {
        "ours_s": t_ours, "pot_f32_loop_s": t_pot32, "pot_f64_loop_s": t_pot64,
        "speedup_vs_f32": t_pot32 / t_ours, "speedup_vs_f64": t_pot64 / t_ours,
        "ours_iterations": res.iterations, "ours_marginal_error": float(res.marginal_error.max()),
        "pot_iterations": [int(p[1]["niter"]) for p in pot32], "max_plan_diff": diff,
    }
    print(f"B={B} m={m} n={n} eps={eps} tol={tol} device={device} torch_threads={torch.get_num_threads()}")
    print(f"  prefkd.ot.sinkhorn (batched, fp32): {t_ours * 1e3:9.2f} ms  "
          f"({res.iterations} iterations, max marginal error {out['ours_marginal_error']:.2e})")
    its = out["pot_iterations"]
    print(f"  POT sinkhorn_log loop, float32:     {t_pot32 * 1e3:9.2f} ms  "
          f"(iterations {min(its)}-{max(its)})  speed-up {out['speedup_vs_f32']:.1f}x")
    print(f"  POT sinkhorn_log loop, float64:     {t_pot64 * 1e3:9.2f} ms  speed-up {out['speedup_vs_f64']:.1f}x")
    print(f"  max |P_ours - P_POT| = {diff:.2e} (plan entries ~ {1.0 / (m * n):.1e})")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark(args.B, args.m, args.n, args.eps, args.tol, args.device, args.repeats)


if __name__ == "__main__":
    main()
