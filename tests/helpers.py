"""Shared by the parity tests."""
import torch


@torch.no_grad()
def randomize_(model):
    """Move every weight away from its init, so that a wrong or missing mapping cannot hide behind ones and
    zeros: LayerNorms around 1 / 0, biases random, embeddings N(0, 0.25), matrices N(0, 1/fan_in)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn_like(p))
        elif "embed" in name or "shared" in name:
            p.copy_(0.5 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)


def random_hf_model(cls, hf_cfg, seed=0):
    """A transformers model with weights away from init: norms ~ 1 + 0.2 N(0,1), embeddings N(0,1),
    matrices N(0, 4 / fan_in), so that logits are peaked and greedy decoding keeps moving."""
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif 'embed' in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, 2 / p.shape[1] ** 0.5)
    return model
