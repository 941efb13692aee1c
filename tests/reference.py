"""The loss spec in float64 with materialized logits: the independent reference for every loss test."""

import torch

IGNORE = -100


def reference(
    e, c, targets, bias=None, *, shift=0, softcap=0.0, z_loss_weight=0.0, label_smoothing=0.0, reduction="mean"
):
    """Float64 materialized loss, per the spec; written independently of losses/."""
    e, c = e.double(), c.double()
    targets = targets[..., shift:]
    e = e[..., : e.shape[-2] - shift, :] if shift else e
    logits = e @ c.T + (0 if bias is None else bias.double())
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != IGNORE
    lse = logits.logsumexp(-1)
    target_logit = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    per_token = (1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logits.mean(-1))
    per_token = torch.where(valid, per_token + z_loss_weight * lse**2, 0.0)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total
