"""Launch tables: the built-in table per architecture, a measured JSON file shipped for the
running GPU's name merged over it, and MOLMOE_LITE_KERNEL_CONFIG pinning one (CPU only: the
device's name and capability are given, not detected)."""

import json

import pytest

from molmoe_lite.kernels import configs

MEASURED = {"device": "NVIDIA Test GPU", "capability": 86,
            "measured": {"when": "2026-11-30T00:00:00+00:00", "where": "test"},
            "table": {"down_decode": {"BLOCK_N": 4, "BLOCK_K": 1024, "EXPERT_SPLIT": 2, "fill_sms": 0}}}


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A launch_configs folder holding one measured file, and fresh resolution caches."""
    monkeypatch.setattr(configs, "MEASURED_DIR", tmp_path)
    monkeypatch.delenv(configs.ENV_VAR, raising=False)
    configs._resolved.cache_clear()
    (tmp_path / "nvidia-test-gpu.json").write_text(json.dumps(MEASURED))
    yield tmp_path
    configs._resolved.cache_clear()


@pytest.mark.parametrize("name,want", [("NVIDIA H200", "nvidia-h200.json"),
                                       ("NVIDIA GeForce RTX 4060 Laptop GPU", "nvidia-geforce-rtx-4060-laptop-gpu.json"),
                                       ("  A100-SXM4 (80GB) ", "a100-sxm4-80gb.json")],
                         ids=["plain", "spaces", "punctuation"])
def test_device_file_name(name, want):
    assert configs.device_file_name(name) == want


def test_measured_file_is_merged_over_the_arch_table(shipped):
    table = configs._resolved(86, "NVIDIA Test GPU", "")
    assert table["down_decode"] == {**configs.CONFIGS[86]["down_decode"], **MEASURED["table"]["down_decode"]}
    assert table["gate_up_decode"] == configs.CONFIGS[86]["gate_up_decode"]  # not measured: built in
    assert configs.CONFIGS[86]["down_decode"]["BLOCK_N"] == 8  # the built-in table is not modified


@pytest.mark.parametrize("name", ["NVIDIA Other GPU", None], ids=["unmeasured_gpu", "off_cuda"])
def test_without_a_measured_file_the_builtin_table_runs(shipped, name):
    assert configs._resolved(86, name, "") == configs.CONFIGS[86]


def test_pinned_arch_ignores_the_measured_file(shipped):
    assert configs._resolved(86, "NVIDIA Test GPU", "sm_80") == configs.CONFIGS[80]


def test_pinned_overrides_go_over_the_measured_file(shipped):
    table = configs._resolved(86, "NVIDIA Test GPU", '{"down_decode": {"BLOCK_N": 16}}')
    assert table["down_decode"]["BLOCK_N"] == 16 and table["down_decode"]["EXPERT_SPLIT"] == 2


def test_pinned_json_file(shipped, tmp_path):
    path = shipped / "nvidia-test-gpu.json"
    table = configs._resolved(90, None, str(path))
    assert table["down_decode"]["BLOCK_K"] == 1024 and table["gate_up_grouped"] == configs.CONFIGS[90]["gate_up_grouped"]


@pytest.mark.parametrize("content,msg", [("{nope", "not a readable"), ('{"device": "x"}', "needs a 'table'"),
                                         ('{"table": {"gate": {}}}', "unknown key"),
                                         ('{"table": {"down_decode": 3}}', "must map to an object")],
                         ids=["bad_json", "no_table", "unknown_kernel", "not_an_object"])
def test_bad_measured_file_says_which_file(shipped, content, msg):
    (shipped / "nvidia-test-gpu.json").write_text(content)
    with pytest.raises(configs.KernelConfigError, match=msg) as err:
        configs._resolved(86, "NVIDIA Test GPU", "")
    assert "nvidia-test-gpu.json" in str(err.value)


def test_get_config_off_cuda_reads_no_file(shipped, monkeypatch):
    monkeypatch.setattr(configs, "measured_table", lambda name: pytest.fail("off CUDA no device file is read")
                        if name else {})
    assert configs.get_config() == configs.CONFIGS[80]


def test_package_ships_only_valid_measured_files():
    for path in configs.MEASURED_DIR.glob("*.json"):
        record = json.loads(path.read_text())
        assert path.name == configs.device_file_name(record["device"])
        assert {"when", "where"} <= set(record["measured"])
        configs.read_measured(path)


def test_get_config_on_a_gpu_reads_its_measured_file(shipped, monkeypatch):
    """The running GPU's name and capability (mocked) pick the measured file and the arch table."""
    import torch

    configs._cuda_identity.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA Test GPU")
    try:
        table = configs.get_config(torch.device("cuda"))
    finally:
        configs._cuda_identity.cache_clear()
    assert table["down_decode"]["EXPERT_SPLIT"] == 2
    assert table["gate_up_grouped"] == configs.CONFIGS[86]["gate_up_grouped"]
