"""AdamW from bf16 gradients (training/adamw_kernel.py) against torch's fused AdamW on their fp32 casts.

On a CPU the kernel runs in Triton's interpreter (tests/triton_interpreter.py); the ``cuda`` test runs it
compiled, through ``FlatAdamW``, beside the same optimizer handed fp32 gradients.
"""

import pytest
import torch

from tests.triton_interpreter import run_interpreted

pytest.importorskip("triton")

CHECK = r"""
import json, torch, triton, triton.language as tl
from training.adamw_kernel import Bf16GradAdamW, _bf16_bits

@triton.jit
def cast(x_ptr, out_ptr, N: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, N), _bf16_bits(tl.load(x_ptr + tl.arange(0, N))))

# Ties either way, just below and above them, the largest float (rounds to inf), infinities, NaN, a
# denormal, -0.0, then random values.
bits = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001,
        0xFFFFFFFF, 0x00018000, 0x80000000]
special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
x = torch.cat([special, torch.randn(128 - len(bits), generator=torch.Generator().manual_seed(1)) * 100])
out = torch.empty(128, dtype=torch.int16)
cast[(1,)](x, out, N=128)
ref = x.bfloat16()
nan = ref.isnan()  # a NaN's bits are the device's own (torch's CPU and CUDA casts differ): NaN for NaN
same_bits = torch.equal(out[~nan], ref.view(torch.int16)[~nan])
result = {"cast": same_bits and out.view(torch.bfloat16)[nan].isnan().all().item()}

gen = torch.Generator().manual_seed(0)
# Against 1024-element blocks: one tensor below a block, one of exactly four, ragged ones, a scalar.
shapes = [(300,), (4096,), (3, 1500), (8193,), ()]
settings = {
    "plain": dict(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8),
    "beta1 0, no decay": dict(lr=3e-3, beta1=0.0, beta2=0.999, weight_decay=0.0, eps=1e-6),
}
for name, hyper in settings.items():
    for clipped in (False, True):
        params = [torch.randn(s, generator=gen) for s in shapes]
        ref = [p.clone() for p in params]
        moments = [[torch.zeros_like(p) for p in params] for _ in range(4)]
        steps, ref_steps = torch.zeros(len(shapes)), torch.zeros(len(shapes))
        # bf16 copies the update writes, none for indices 1 and 3
        copies = [None if i in (1, 3) else p.bfloat16() for i, p in enumerate(params)]
        kernel = Bf16GradAdamW(params, moments[0], moments[1], steps)
        chosen = [0, 1, 3, 4]  # index 2 has no gradient this time: left alone
        skipped, copied = {}, True
        for it in range(4):
            grads = [(torch.randn(s, generator=gen) * 3).bfloat16() for s in shapes]
            scale = torch.tensor(1.5 + it) if clipped else None
            found_inf = torch.tensor(1.0 if it == 2 else 0.0)  # the third update is skipped
            before = [p.clone() for p in params]
            steps[chosen] += 1 - found_inf
            ref_steps[chosen] += 1 - found_inf
            kernel.step(
                chosen, [grads[i] for i in chosen], [copies[i] for i in chosen], **hyper, grad_scale=scale,
                found_inf=found_inf,
            )
            torch._fused_adamw_(
                [ref[i] for i in chosen], [grads[i].float() for i in chosen], [moments[2][i] for i in chosen],
                [moments[3][i] for i in chosen], [], [ref_steps[i] for i in chosen], amsgrad=False, maximize=False,
                grad_scale=scale, found_inf=found_inf, **hyper,
            )
            if it == 2:
                skipped = all(torch.equal(a, b) for a, b in zip(before, params))
            # bitwise the cast of the updated weights (index 2, not updated, keeps the cast it had)
            copied &= all(torch.equal(copies[i], params[i].bfloat16()) for i in (0, 2, 4))
        def worst(a, b):
            return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))
        result[f"{name}, clipped={clipped}"] = {
            "params": worst(params, ref),
            "exp_avg": worst(moments[0], moments[2]),
            "exp_avg_sq": worst(moments[1], moments[3]),
            "left_alone": torch.equal(params[2], ref[2]) and not moments[0][2].any().item(),
            "skipped": skipped,
            "copied": copied,
        }
print(json.dumps(result))
"""


def test_kernel_matches_torch_fused_adamw_in_the_interpreter():
    result = run_interpreted(CHECK)
    assert result.pop("cast")  # the copies' rounding: torch's, bit for bit
    assert len(result) == 4
    for case, r in result.items():
        # fp32 arithmetic against torch's (some of it float64) after three updates: fp32 rounding.
        assert r["params"] < 1e-6 and r["exp_avg"] < 1e-6 and r["exp_avg_sq"] < 1e-6, (case, r)
        assert r["left_alone"] and r["skipped"] and r["copied"], (case, r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flat_adamw_reads_bf16_gradients_as_torch_reads_their_fp32_casts():
    from training.flat_adamw import FlatAdamW

    gen = torch.Generator(device="cuda").manual_seed(0)
    # Qwen3-like shapes: a large matrix, an odd-sized one, norm weights.
    shapes = [(2048, 6144), (1000, 37), (128,), (2048,), (151, 2048)]
    hyper = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    bf16, fp32 = (
        [
            torch.nn.Parameter(torch.randn(s, device="cuda", generator=torch.Generator("cuda").manual_seed(1)))
            for s in shapes
        ]
        for _ in range(2)
    )
    for p in bf16:
        p.grad_dtype = None
    opt_bf16, opt_fp32 = FlatAdamW(bf16, **hyper), FlatAdamW(fp32, **hyper)
    for step in range(20):
        grads = [torch.randn(s, device="cuda", generator=gen).bfloat16() for s in shapes]
        for a, b, g in zip(bf16, fp32, grads):
            a.grad, b.grad = g, g.float()
        for opt in (opt_bf16, opt_fp32):
            opt.grad_scale = torch.tensor(2.0 + step % 3, device="cuda") if step % 2 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(bf16, fp32):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert opt_bf16._buckets[0].bf16_grads is not None  # the kernel ran, not the cast
