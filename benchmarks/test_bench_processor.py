"""pytest-benchmark: the processor on typical image sizes (CPU work before every prompt).

Times ``Processor.process`` (RGB conversion, resize-and-pad, tiling into crops, patches,
masks, token layout) with the tiny tokenizer, which gives the release's token layout.
Run with ``pytest benchmarks/test_bench_processor.py --benchmark-enable``; in the test
suite it runs once per size as a smoke test (timing off).
"""

import pytest

from molmoe_lite.demo import demo_image
from molmoe_lite.processor import PreprocessorConfig, Processor
from molmoe_lite.testing import write_tiny_tokenizer

SIZES = [(536, 354), (1920, 1080), (4032, 3024)]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proc")
    write_tiny_tokenizer(folder)
    PreprocessorConfig().save(folder)
    return Processor.from_pretrained(folder)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_process_image(benchmark, processor, size):
    image = demo_image(*size)
    out = benchmark(processor.process, image, "Describe this image.")
    benchmark.extra_info.update(width=size[0], height=size[1], crops=int(out["images"].shape[0]),
                                tokens=int(out["input_ids"].numel()))
    assert out["images"].shape[1:] == (576, 588)
