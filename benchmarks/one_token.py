"""One decoding step of an RWKV-7 time-mix: the fused C kernel against the tensor ops, on CPU.

For each width C (heads of 64, state width A = C), batch B and torch thread count, a perturbed ``TimeMix`` runs
one token without autograd through

    fused    wkv_impl="auto" with the preference rule lifted: one call of the C kernel
             (wuneng.fused.one_token.time_mix_one_token_planned, its work split across torch's threads)
    tensor   wkv_impl="chunked": the layer's tensor ops (token mixes, low_rank_bank, projections through the
             BLAS, wkv7_step, the read-out, the output projection)

and the table gives the median time of each and fused / tensor, beside the weight parameters x B x threads and what
the rule picks (fused while B <= ``TIME_MIX_MAX_BATCH``). The rule itself was chosen from whole-model steps,
``benchmarks/decode_step.py --grid``.

    python benchmarks/one_token.py
    python benchmarks/one_token.py --widths 384 --batches 1 8 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wuneng.fused import one_token
from wuneng.fused.cpu import fused_kernel_available, fused_kernel_error
from wuneng.layers.low_rank import derived_weights_session
from wuneng.layers.rwkv7 import TimeMix


def median_us(fn, steps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (median)")
    args = parser.parse_args()
    if not fused_kernel_available():
        raise SystemExit(f"the C kernel is unavailable: {fused_kernel_error()}")
    max_batch = one_token.TIME_MIX_MAX_BATCH
    print(f"torch {torch.__version__}; TIME_MIX_MAX_BATCH = {max_batch}; median of {args.steps} steps")
    print(f"{'threads':>7} {'C':>5} {'B':>4} {'work':>8} {'fused us':>9} {'tensor us':>10} {'fused/tensor':>13}  rule")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for width in args.widths:
            torch.manual_seed(0)
            mixer = TimeMix(width, width // 64, 64, 1, 3)
            with torch.no_grad():
                for p in mixer.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            params = sum(t.numel() for t in mixer.one_token_weights()[:-1] if t is not None)
            for batch in args.batches:
                x, v_first = torch.randn(batch, 1, width), torch.randn(batch, 1, width)
                state = (torch.randn(batch, width), torch.randn(batch, width // 64, 64, 64))
                times = {}
                with torch.no_grad(), derived_weights_session():  # as a model forward with a cache does
                    for impl in ("auto", "chunked"):
                        mixer.wkv_impl = impl
                        # measure the kernel wherever it applies
                        one_token.TIME_MIX_MAX_BATCH = 1 << 62
                        try:
                            times[impl] = median_us(lambda: mixer(x, v_first, state), args.steps)  # noqa: B023 - called here
                        finally:
                            one_token.TIME_MIX_MAX_BATCH = max_batch
                work = params * batch * threads
                pick = "fused" if batch <= max_batch else "tensor"
                print(
                    f"{threads:>7} {width:>5} {batch:>4} {work / 2**20:>7.0f}M {times['auto']:>9.0f} "
                    f"{times['chunked']:>10.0f} {times['auto'] / times['chunked']:>13.2f}  {pick}"
                )


if __name__ == "__main__":
    main()
