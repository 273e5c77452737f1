"""The model on a GPU in bfloat16 / float16 against float32 on the CPU (skipped without CUDA)."""

import pytest
import torch

from molmoe_lite import load
from molmoe_lite.demo import demo_image

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Low-precision logits against fp32: bf16 keeps 8 mantissa bits, so a relative error of a few
# percent over a whole tiny model is expected; top-1 agreement is the stronger check.
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision_matches_cpu_fp32(tiny_release, tiny_model, dtype):
    gpu = load(tiny_release, device="cuda", dtype=dtype)
    inputs = tiny_model.processor.process(images=demo_image(), text="Describe this image.")
    with torch.no_grad():
        ref = tiny_model(**inputs)[0].float()
        got = gpu(**inputs)[0].float().cpu()
    assert torch.isfinite(got).all()
    rel = float((got - ref).norm() / ref.norm())
    assert rel <= TOLERANCE[dtype], rel
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    # generation on the GPU: the first new token is the argmax of the GPU's own prompt logits,
    # and generate's text is the decode of generate_from_batch's tokens (up to EOS)
    tok = gpu.processor.tokenizer
    new = gpu.generate_from_batch(inputs, max_new_tokens=8)[0, inputs["input_ids"].numel():].tolist()
    with torch.no_grad():
        assert new[0] == int(gpu(**inputs)[0, -1].argmax())
    kept = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    text_gpu = gpu.generate(demo_image(), "Describe this image.", max_new_tokens=8)
    assert text_gpu == tok.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_cuda_graph_decode_equals_eager_decode(tiny_release):
    from molmoe_lite.fast_decode import StaticDecoder

    model = load(tiny_release, device="cuda", dtype=torch.bfloat16, quantize="int4")
    inputs = model.processor.process(images=demo_image(), text="Describe this image.")
    batch = {k: v[None].cuda() for k, v in inputs.items()}
    tokens = torch.tensor([5, 17, 42, 7, 99], device="cuda")
    outs = {}
    for use_graph in (False, True):
        with torch.no_grad():
            cache = model.new_cache(1, batch["input_ids"].shape[1] + len(tokens))
            model(**batch, cache=cache, logits_at="last")
            dec = StaticDecoder(model, cache, batch["input_ids"] != -1, use_graph=use_graph)
            outs[use_graph] = torch.stack([dec.step(t.view(1)).clone()[0].float() for t in tokens])
            assert dec.captured == use_graph
    rel = float((outs[True] - outs[False]).norm() / outs[False].norm())
    assert rel <= 1e-3, rel
