"""Fixtures: tiny random MolmoE checkpoints and tokenizers in the release's exact layout, and test guards.

Real weights cannot be downloaded where this project is built and tested, so the tests,
the offline demo and the benchmarks make their own small models here. Nothing in the
runtime imports this package.
"""

from molmoe_lite.testing.guards import DenseExpertError, no_dense_experts
from molmoe_lite.testing.tiny_release import (
    full_size_config_dict,
    random_state_dict,
    save_release_checkpoint,
    tiny_config_dict,
    write_config,
    write_tiny_release,
)
from molmoe_lite.testing.tiny_tokenizer import write_tiny_tokenizer

__all__ = [
    "DenseExpertError",
    "full_size_config_dict",
    "no_dense_experts",
    "random_state_dict",
    "save_release_checkpoint",
    "tiny_config_dict",
    "write_config",
    "write_tiny_release",
    "write_tiny_tokenizer",
]
