"""The Triton kernels of the chunked loss against its PyTorch ops, in float64.

On a CPU the kernels run in Triton's interpreter (tests/triton_interpreter.py); on CUDA the end-to-end
checks of ``chunked`` in tests/test_losses.py run them compiled.
"""

import pytest

from tests.triton_interpreter import run_interpreted

pytest.importorskip("triton")

CHECK = r"""
import json, torch
from losses.kernels import chunked_triton as chunk_kernels
from losses.kernels.chunked import FILTER_SLAB, _chunk_logit_grad, _chunk_row_stats

errors = {}
gen = torch.Generator().manual_seed(0)
# vocab 5000 spans two kernel blocks with a ragged end; 300 is less than one block.
for vocab in (5000, 300):
    for softcap, smoothing, z_loss in [(0.0, 0.0, 0.0), (4.0, 0.1, 1e-2)]:
        n = 6
        raw = torch.randn(n, vocab, generator=gen) * 3
        col = torch.randint(0, vocab, (n,), generator=gen)
        owned = torch.tensor([True, False, True, True, True, True])  # row 1: another shard's target
        weight = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25])  # row 2: an ignored token
        capped = softcap * torch.tanh(raw.double() / softcap) if softcap else raw.double()

        row_max, sums = chunk_kernels.row_stats(raw.clone(), col, owned, smoothing > 0, softcap)
        ref_max, ref_sums = _chunk_row_stats(capped, col, owned, smoothing > 0, softcap)
        lse = ref_max + ref_sums[0].log()
        grad = chunk_kernels.logit_grad(raw.clone(), lse.float(), col, owned, weight, 2 * vocab, softcap, z_loss,
                                        smoothing)
        ref_grad = _chunk_logit_grad(capped, lse, col, owned, weight.double(), 2 * vocab, softcap, z_loss, smoothing)
        # The gradient filter's per-slab maxima (unweighted, over the rows whose weight is not 0).
        slab_max, ref_slab_max = torch.zeros(-(-vocab // FILTER_SLAB)), torch.zeros(-(-vocab // FILTER_SLAB)).double()
        chunk_kernels.logit_grad(raw.clone(), lse.float(), col, owned, weight, 2 * vocab, softcap, z_loss, smoothing,
                                 slab_max)
        _chunk_logit_grad(capped, lse, col, owned, weight.double(), 2 * vocab, softcap, z_loss, smoothing,
                          ref_slab_max)
        key = f"vocab={vocab} softcap={softcap} smoothing={smoothing} z_loss={z_loss}"
        errors[key] = {
            "max": ((row_max.double() - ref_max).abs().max() / ref_max.abs().max()).item(),
            "sums": ((sums.double() - ref_sums).abs().amax(1) / ref_sums.abs().amax(1)).max().item(),
            "grad": ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item(),
            "grad_ignored_row": grad[2].abs().max().item(),
            "slab_max": ((slab_max.double() - ref_slab_max).abs() / ref_slab_max).max().item(),
        }
print(json.dumps(errors))
"""


def test_kernels_match_the_pytorch_ops_in_the_interpreter():
    errors = run_interpreted(CHECK)
    assert len(errors) == 4
    for case, err in errors.items():
        # fp32 arithmetic on fp32 logits against float64: relative errors near 1e-7.
        assert err["max"] < 1e-6 and err["sums"] < 1e-5 and err["grad"] < 1e-5, (case, err)
        assert err["grad_ignored_row"] == 0.0, case
        assert err["slab_max"] < 1e-5, case
