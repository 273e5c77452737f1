"""How far a quantised model is from the float one, on a user's own weights and image.

Both models see the same processed prompt; their logits are compared at every
position: top-1 agreement, KL(float || quantised) per position (natural log, in fp32),
and the relative Frobenius error of the logits. The models are run one after the
other, so a GPU only ever holds one of them; logits wait on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from molmoe_lite.errors import UsageError


@torch.inference_mode()
def model_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits [L, V] on the CPU for one processed (unbatched) prompt."""
    return model(**inputs)[0].float().cpu()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, Any]:
    """Agreement of two [L, V] logit tensors (reference = the float model)."""
    if reference.shape != candidate.shape:
        raise UsageError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    ref_logp = torch.log_softmax(reference.float(), dim=-1)
    cand_logp = torch.log_softmax(candidate.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)  # [L]
    top1 = reference.argmax(-1) == candidate.argmax(-1)  # [L]
    return {
        "positions": int(reference.shape[0]),
        "top1_agreement": float(top1.float().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_per_position": [round(float(v), 6) for v in kl],
        "rel_error": float((candidate - reference).norm() / reference.norm()),
    }


def compare_models(float_path, quant_path, image: Any, prompt: str, device=None, dtype=None,
                   threads: int | None = None) -> dict[str, Any]:
    """Load each model in turn and compare their logits on ``image`` + ``prompt``
    (``device``, ``dtype`` and ``threads`` as ``load`` takes them)."""
    import gc

    from molmoe_lite.api import load

    results = []
    for path in (float_path, quant_path):
        model = load(path, device=device, dtype=dtype, threads=threads)
        inputs = model.processor.process(images=image, text=prompt)
        results.append(model_logits(model, inputs))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return compare_logits(*results)
