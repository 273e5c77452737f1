"""Batch jobs on Ray Data (``molmoe_lite.batch.scale_out``).

The actor plan from the nodes' resources needs no Ray. The run starts a local Ray, answers
a folder with two actors (one CPU each), and must give the same rows as the single-process
run, skip the ids already in the output, and leave no Ray process behind.
"""

import json
import time

import pytest

from molmoe_lite.batch.scale_out import plan_workers
from molmoe_lite.demo import demo_image
from molmoe_lite.errors import UsageError


@pytest.mark.parametrize(
    "nodes, workers, device, expected",
    [
        pytest.param([{"CPU": 32, "GPU": 4}], None, None, {"workers": 4, "num_gpus": 1.0, "num_cpus": 1},
                     id="one_actor_per_gpu"),
        pytest.param([{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}], None, None,
                     {"workers": 4, "num_gpus": 1.0, "num_cpus": 1}, id="gpus_of_every_node"),
        pytest.param([{"CPU": 32, "GPU": 4}], 2, None, {"workers": 2, "num_gpus": 1.0, "num_cpus": 1},
                     id="fewer_workers_than_gpus"),
        pytest.param([{"CPU": 8, "GPU": 1}], 2, None, {"workers": 2, "num_gpus": 0.5, "num_cpus": 1},
                     id="two_workers_share_a_gpu"),
        pytest.param([{"CPU": 8, "GPU": 3}], 4, None, {"workers": 4, "num_gpus": 0.5, "num_cpus": 1},
                     id="uneven_share_gives_whole_slots"),
        pytest.param([{"CPU": 32}], None, None, {"workers": 4, "num_gpus": 0, "num_cpus": 8},
                     id="cpu_node_one_worker_per_8_cpus"),
        pytest.param([{"CPU": 12}, {"CPU": 4}, {"CPU": 4}], None, None, {"workers": 5, "num_gpus": 0, "num_cpus": 4},
                     id="small_nodes_set_the_reservation"),
        pytest.param([{"CPU": 2}], None, None, {"workers": 1, "num_gpus": 0, "num_cpus": 2},
                     id="small_machine_one_worker"),
        pytest.param([{"CPU": 2}], 2, None, {"workers": 2, "num_gpus": 0, "num_cpus": 1}, id="cpu_workers_given"),
        pytest.param([{"CPU": 16, "GPU": 2}], None, "cpu", {"workers": 2, "num_gpus": 0, "num_cpus": 8},
                     id="device_cpu_ignores_gpus"),
    ],
)
def test_plan_workers_from_the_nodes_resources(nodes, workers, device, expected):
    assert plan_workers(nodes, workers, device) == expected


def test_plan_workers_refuses_cuda_without_gpus():
    with pytest.raises(UsageError, match="no GPUs"):
        plan_workers([{"CPU": 8}], None, "cuda")


def _lines(path):
    data = path.read_text(encoding="utf-8")
    assert data.endswith("\n")
    return [json.loads(line) for line in data.splitlines()]


def _rows_without_seconds(records):
    return {json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in records}


@pytest.mark.slow
def test_ray_run_with_two_actors_gives_the_single_process_rows(tiny_release, tmp_path):
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from molmoe_lite.batch import run

    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(536, 354), (300, 900), (64, 48), (700, 500), (120, 90)]):
        demo_image(w, h).save(images / f"im{i}.png")
    (images / "notes.jpg").write_text("not an image\n")
    kwargs = dict(max_new_tokens=4, batch_size=2, device="cpu", dtype="float32", progress=False)
    single = tmp_path / "single.jsonl"
    run(tiny_release, images, single, **kwargs)
    expected = _lines(single)

    out = tmp_path / "ray.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in expected[:2]))  # done before: skipped
    assert not ray.is_initialized()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    summary = run(tiny_release, images, out, ray_address="local", workers=2, **kwargs)
    records = _lines(out)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in expected)  # each id once
    assert _rows_without_seconds(records) == _rows_without_seconds(expected)
    assert (summary.skipped, summary.done, summary.failed) == (2, 3, 1)

    assert not ray.is_initialized(), "the local Ray must be shut down"
    deadline = time.monotonic() + 30
    while (left := {p.pid for p in psutil.Process().children(recursive=True)} - children_before):
        assert time.monotonic() < deadline, f"Ray left processes behind: {left}"
        time.sleep(0.5)
