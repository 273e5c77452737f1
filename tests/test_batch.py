"""Batch jobs (``molmoe_lite.batch``): inputs, bad rows, the output file, resume, and answers.

On the tiny random model (``conftest.tiny_model`` / ``tiny_release``), CPU, float32. The
oracle for answers is ``model.generate`` on one image at a time; images of different
sizes give prompts of different lengths, so every batch is padded.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molmoe_lite.batch import FIELDS, BatchInputError, ResultsFile, ResultsFileError, run
from molmoe_lite.batch.answer import Answer, Prepared, record
from molmoe_lite.batch.rows import Row, read_rows
from molmoe_lite.demo import demo_image
from molmoe_lite.errors import UsageError

TOKENS = 6
# (relative path, width, height): different tile counts, one in a subfolder, one upper-case extension
GOOD = [("a.png", 536, 354), ("sub/b.jpg", 300, 900), ("c.JPG", 64, 48), ("sub/deeper/d.webp", 700, 500)]


def _write_images(folder: Path, specs=GOOD) -> None:
    for rel, w, h in specs:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        demo_image(w, h).save(path)


def _write_bad(folder: Path) -> dict[str, str]:
    """Bad files an image folder may hold -> a word their error must contain."""
    png = (folder / "a.png").read_bytes()
    (folder / "corrupt.png").write_bytes(png[: len(png) // 3])  # a truncated download
    (folder / "notes.jpg").write_text("a text file named .jpg\n")
    (folder / "empty.png").write_bytes(b"")
    return {"corrupt.png": "truncated", "notes.jpg": "not an image", "empty.png": "empty"}


def _lines(path: Path) -> list[dict]:
    data = path.read_text(encoding="utf-8")
    assert data == "" or data.endswith("\n"), "the output ends in a partial line"
    return [json.loads(line) for line in data.split("\n")[:-1]]  # not splitlines: U+2028 may be in a line


def _without_seconds(records: list[dict]) -> set[str]:
    return {json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in records}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_images(root)
    (root / "readme.txt").write_text("not an image extension: not a row\n")
    return root


def test_folder_input_answers_every_image_and_records_bad_files(tiny_model, tmp_path, folder):
    images = tmp_path / "images"
    _write_images(images)
    bad = _write_bad(images)
    (images / "readme.txt").write_text("ignored\n")
    out = tmp_path / "out" / "answers.jsonl"  # its folder is made
    summary = run(tiny_model, images, out, max_new_tokens=TOKENS, batch_size=3, progress=False)
    records = _lines(out)
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records) == len(GOOD) + len(bad)
    assert set(by_id) == {rel for rel, _, _ in GOOD} | set(bad)
    for r in records:
        assert tuple(r) == FIELDS
    for name, word in bad.items():
        r = by_id[name]
        assert word in r["error"] and name in r["error"], r["error"]
        assert r["answer"] is None and r["points"] is None and r["new_tokens"] == 0
    for rel, _, _ in GOOD:
        r = by_id[rel]
        assert r["error"] is None and isinstance(r["answer"], str) and r["points"] == []
        assert 1 <= r["new_tokens"] <= TOKENS and r["seconds"] > 0
        assert r["image"] == rel and r["prompt"] == "Describe this image."
    assert (summary.done, summary.failed, summary.skipped) == (len(GOOD), len(bad), 0)


def test_greedy_answers_equal_generate_one_by_one(tiny_model, tmp_path, folder):
    """JSONL rows with their own prompts, batched 3 at a time, against one generate() per row."""
    prompts = ["Describe this image.", "What colour is the roof?", None, "Point to the sun."]
    rows = [{"id": f"r{i}", "image": str(folder / rel), **({"prompt": p} if p else {})}
            for i, ((rel, _, _), p) in enumerate(zip(GOOD, prompts))]
    rows.append({"id": "r4", "image": str(folder / GOOD[0][0]), "prompt": "How many windows?"})
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(tiny_model, jsonl, tmp_path / "out.jsonl", prompt="Caption it.", max_new_tokens=TOKENS,
        batch_size=3, progress=False)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    for row in rows:
        prompt = row.get("prompt", "Caption it.")
        alone = tiny_model.generate(row["image"], prompt, max_new_tokens=TOKENS)
        assert got[row["id"]]["prompt"] == prompt
        assert got[row["id"]]["answer"] == alone, row
        assert got[row["id"]]["new_tokens"] == tiny_model.last_stats.new_tokens


def test_rows_that_end_early_stop_as_they_do_alone(tiny_model, tmp_path, folder, monkeypatch):
    """End-of-text mid-batch: the random model never says it, so a token it does say (the
    third of one answer) is made the end-of-text token; rows then stop at different steps."""
    tok = tiny_model.processor.tokenizer
    inputs = tiny_model.processor.process(images=str(folder / "a.png"), text="Describe this image.")
    ids = tiny_model.generate_from_batch(inputs, max_new_tokens=8)[0, inputs["input_ids"].numel():].tolist()
    monkeypatch.setattr(tok, "eos_token_id", ids[2])
    rows = [{"id": rel, "image": str(folder / rel)} for rel, _, _ in GOOD]
    run(tiny_model, rows, tmp_path / "out.jsonl", max_new_tokens=8, batch_size=len(rows), progress=False)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    counts = set()
    for row in rows:
        alone = tiny_model.generate(row["image"], "Describe this image.", max_new_tokens=8)
        assert got[row["id"]]["answer"] == alone
        assert got[row["id"]]["new_tokens"] == tiny_model.last_stats.new_tokens
        counts.add(tiny_model.last_stats.new_tokens)
    assert got["a.png"]["new_tokens"] <= 3 and len(counts) > 1, "rows should stop at different steps"


def test_jsonl_paths_are_relative_to_the_file_and_a_missing_file_is_a_row_error(tiny_model, tmp_path, monkeypatch):
    _write_images(tmp_path / "data" / "pics", GOOD[:2])
    jsonl = tmp_path / "data" / "rows.jsonl"
    jsonl.write_text(
        json.dumps({"id": 1, "image": "pics/a.png"}) + "\n\n"  # a blank line is no row
        + json.dumps({"id": "gone", "image": "pics/missing.png", "prompt": "Anything?"}) + "\n"
        + json.dumps({"id": "b", "image": "pics/sub/b.jpg", "prompt": ""}) + "\n"
    )
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    summary = run(tiny_model, "data/rows.jsonl", "out.jsonl", max_new_tokens=2, progress=False)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    assert set(got) == {"1", "gone", "b"}  # ids are strings
    assert got["1"]["error"] is None and got["b"]["error"] is None
    assert got["b"]["prompt"] == "Describe this image."  # an empty prompt takes the default
    assert "no such file" in got["gone"]["error"] and "missing.png" in got["gone"]["error"]
    assert got["gone"]["image"] == "pics/missing.png" and got["gone"]["prompt"] == "Anything?"
    assert (summary.done, summary.failed) == (2, 1)


WEB_IMAGES = ["https://example.com/cat.jpg", "HTTP://example.com/a/b.png?size=2"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "dicts"])
def test_a_web_address_row_says_images_are_read_from_local_files(tmp_path, kind):
    from molmoe_lite.batch.answer import prepare

    items = [{"id": str(i), "image": url} for i, url in enumerate(WEB_IMAGES)]
    if kind == "jsonl":
        source = tmp_path / "rows.jsonl"
        source.write_text("".join(json.dumps(item) + "\n" for item in items))
    elif kind == "csv":
        source = tmp_path / "rows.csv"
        source.write_text("id,image\n" + "".join(f"{item['id']},{item['image']}\n" for item in items))
    else:
        source = items
    for row, url in zip(read_rows(source), WEB_IMAGES):
        error = prepare(None, row).error  # refused before the processor is needed
        assert row.image == url and error.startswith(f"{url}: ")  # the address as given, slashes kept
        assert "read from local files only" in error and "download it first" in error
        assert "no such file" not in error


def test_csv_rows(tiny_model, tmp_path, folder):
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text(f"id,image,prompt\nx,{folder / 'a.png'},Where is the house?\ny,{folder / 'c.JPG'},\n")
    run(tiny_model, csv_file, tmp_path / "out.jsonl", max_new_tokens=2, progress=False)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    assert got["x"]["prompt"] == "Where is the house?" and got["y"]["prompt"] == "Describe this image."
    assert got["x"]["answer"] == tiny_model.generate(folder / "a.png", "Where is the house?", max_new_tokens=2)


@pytest.mark.parametrize("suffix, text", [
    (".csv", "id,image,prompt\nx,a.png,Où est la maison ?\n"),
    (".jsonl", '{"id": "x", "image": "a.png", "prompt": "Où est la maison ?"}\n'),
], ids=["csv", "jsonl"])
def test_rows_files_saved_with_a_byte_order_mark_are_read(tmp_path, suffix, text):
    source = tmp_path / f"rows{suffix}"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Excel's "CSV UTF-8" and Notepad save
    (row,) = read_rows(source)
    assert (row.id, row.image, row.prompt) == ("x", "a.png", "Où est la maison ?")


@pytest.mark.parametrize("suffix, text", [
    (".csv", "id,image,prompt\nx,a.png,Où est la maison ?\n"),
    (".jsonl", '{"id": "x", "image": "a.png", "prompt": "Où est la maison ?"}\n'),
], ids=["csv", "jsonl"])
def test_a_rows_file_not_in_utf8_stops_the_job_in_one_line(tiny_release, tmp_path, suffix, text):
    source = tmp_path / f"latin1{suffix}"
    source.write_bytes(text.encode("latin-1"))
    with pytest.raises(BatchInputError, match="not UTF-8") as err:
        run(tiny_release, source, tmp_path / "out.jsonl", progress=False)
    assert str(source) in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_the_input_file_as_output_is_refused(tiny_release, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "x", "image": "a.png"}\n')
    with pytest.raises(UsageError, match="the output is the input file"):
        run(tiny_release, rows, tmp_path / "." / "rows.jsonl", progress=False)
    assert rows.read_text() == '{"id": "x", "image": "a.png"}\n'


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("not_json", '{"id": 1, "image": "a.png"}\n{oops\n', ["line 2", "not JSON"]),
        ("no_id", '{"image": "a.png"}\n', ["line 1", "'id'"]),
        ("no_image", '{"id": "a"}\n', ["line 1", "'image'"]),
        ("repeated_id", '{"id": "a", "image": "a.png"}\n{"id": "a", "image": "b.png"}\n', ["line 2", "repeats"]),
        ("not_an_object", '["a", "a.png"]\n', ["line 1", "not an object"]),
        ("empty", "\n", ["no rows"]),
        ("csv_without_image_column", "id,prompt\na,hi\n", ["image"]),
        ("unknown_extension", "whatever", ["expected a folder"]),
        ("empty_folder", None, ["no images"]),
        ("missing", None, ["no such file"]),
    ],
)
def test_input_problems_stop_the_job_before_any_work(tiny_release, tmp_path, name, content, words):
    suffix = {"csv_without_image_column": ".csv", "unknown_extension": ".txt"}.get(name, ".jsonl")
    source = tmp_path / (name + ("" if content is None else suffix))
    if name == "empty_folder":
        source.mkdir()
        (source / "notes.txt").write_text("no images here\n")
    elif content is not None:
        source.write_text(content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(BatchInputError) as err:
        run(tiny_release, source, out, progress=False)
    for word in words:
        assert word in str(err.value), str(err.value)
    assert name in str(err.value)  # names the file
    assert not out.exists()


def test_resume_skips_done_ids_and_drops_a_partial_last_line(tiny_model, tmp_path, folder):
    full = tmp_path / "full.jsonl"
    run(tiny_model, folder, full, max_new_tokens=TOKENS, batch_size=2, progress=False)
    lines = full.read_bytes().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # two whole lines, then a torn one
    summary = run(tiny_model, folder, out, max_new_tokens=TOKENS, batch_size=2, progress=False)
    assert (summary.skipped, summary.done + summary.failed) == (2, len(GOOD) - 2)
    assert out.read_bytes().startswith(b"".join(lines[:2]))  # the done lines are left as they were
    records = _lines(out)
    assert sorted(r["id"] for r in records) == sorted(rel for rel, _, _ in GOOD)
    assert _without_seconds(records) == _without_seconds(_lines(full))
    again = run(tiny_model, folder, out, progress=False)  # nothing left: the model is not even used
    assert (again.skipped, again.done, again.failed) == (len(GOOD), 0, 0)
    assert len(_lines(out)) == len(GOOD)


def test_an_output_that_is_not_ours_is_refused(tiny_model, tmp_path, folder):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "x"}\nhello\n')
    with pytest.raises(ResultsFileError, match="line 2"):
        run(tiny_model, folder, out, progress=False)
    assert out.read_text() == '{"id": "x"}\nhello\n'


NOT_OURS = [
    ("text_then_unterminated_text", b"my notes\nsecond line"),
    ("one_unterminated_line", b"garbage"),
    ("record_then_unterminated_text", b'{"id": "x"}\nnot a record'),
]


@pytest.mark.parametrize("name, data", NOT_OURS, ids=[n for n, _ in NOT_OURS])
def test_an_output_ending_in_text_not_ours_is_refused_untouched(tmp_path, name, data):
    out = tmp_path / "notes.txt"
    out.write_bytes(data)
    with pytest.raises(ResultsFileError, match="is not a batch record"):
        ResultsFile(out)
    assert out.read_bytes() == data


TORN = [
    ("torn_record", b'{"id": "b", "ima'),
    ("torn_in_its_first_bytes", b'{"i'),
    ("zeros_after_a_crash", b"\0" * 16),
    ("blanks_after_an_edit", b"  \t"),
]


@pytest.mark.parametrize("name, tail", TORN, ids=[n for n, _ in TORN])
def test_a_torn_last_record_is_cut(tmp_path, name, tail):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a"}\n' + tail)
    with ResultsFile(out) as results:
        assert results.done == {"a"}
    assert out.read_bytes() == b'{"id": "a"}\n'


def test_answers_with_unicode_line_separators_resume(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+0085, U+2028 and U+2029 raw inside a line
    out = tmp_path / "out.jsonl"
    with ResultsFile(out) as results:
        results.append([{"id": "a", "answer": "x\x85y\u2028z\u2029", "error": None}, {"id": "b", "error": None}])
    with ResultsFile(out) as again:
        assert again.done == {"a", "b"}
    assert [r["answer"] for r in _lines(out)] == ["x\x85y\u2028z\u2029", None]


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    with ResultsFile(tmp_path / "out.jsonl") as first:
        first.append([{"id": "a", "answer": "x", "error": None}])
        with pytest.raises(ResultsFileError, match="another batch job"):
            ResultsFile(tmp_path / "out.jsonl")
    with ResultsFile(tmp_path / "out.jsonl") as again:  # free once the first one closed
        assert again.done == {"a"}


def test_a_row_too_long_for_the_context_fails_alone(tiny_model, tmp_path, folder):
    """A prompt longer than the model's context is refused for that row; the rows around it
    still get the answers they get alone."""
    rows = [{"id": "ok1", "image": str(folder / "a.png")},
            {"id": "long", "image": str(folder / "c.JPG"), "prompt": "word " * 5000},
            {"id": "ok2", "image": str(folder / "sub/b.jpg")}]
    summary = run(tiny_model, rows, tmp_path / "out.jsonl", max_new_tokens=3, batch_size=3, progress=False)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    assert "context" in got["long"]["error"] and got["long"]["answer"] is None
    for key in ("ok1", "ok2"):
        image = rows[0]["image"] if key == "ok1" else rows[2]["image"]
        assert got[key]["answer"] == tiny_model.generate(image, "Describe this image.", max_new_tokens=3)
    assert (summary.done, summary.failed) == (2, 1)


def test_pointing_answers_get_pixel_points():
    row = Row("p", "p.png", "/x/p.png", "Point to the dog.")
    prepared = Prepared(row, inputs={}, size=(200, 100), seconds=0.5)
    text = 'Here: <point x="50" y="25" alt="dog">dog</point> and <points x1="10" y1="90" x2="100" y2="0">cups</points>'
    r = record(prepared, Answer(text, new_tokens=30, seconds=1.0))
    assert r["points"] == [{"x": 100.0, "y": 25.0, "label": "dog"}, {"x": 20.0, "y": 90.0, "label": "cups"},
                           {"x": 200.0, "y": 0.0, "label": "cups"}]
    assert (r["answer"], r["new_tokens"], r["seconds"], r["error"]) == (text, 30, 1.5, None)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"batch_size": 0}, "batch_size"), ({"max_new_tokens": 0}, "max_new_tokens"),
     ({"device": "cpu"}, "already loaded"), ({"threads": 1}, "already loaded"), ({"ray_address": "local"}, "path"),
     ({"workers": 2}, "needs a Ray run")],
)
def test_bad_arguments_are_usage_errors(tiny_model, tmp_path, folder, kwargs, word):
    from molmoe_lite.errors import UsageError

    with pytest.raises(UsageError, match=word):
        run(tiny_model, folder, tmp_path / "out.jsonl", progress=False, **kwargs)


def test_cli_load_options_reach_load_for_batch_and_serve(monkeypatch):
    """--threads, --quantize, --preset, --device and --dtype of `batch` and `serve` go to load()."""
    import molmoe_lite.batch as batch_pkg
    import molmoe_lite.serve.server as server
    from molmoe_lite.cli import main

    seen = {}
    monkeypatch.setattr(batch_pkg, "run", lambda *a, **kw: seen.update(batch=kw))
    monkeypatch.setattr(server, "serve", lambda options: seen.update(serve=options) or 0)
    common = ["--threads", "1", "--quantize", "int8", "--preset", "small", "--device", "cpu", "--dtype", "float32"]
    assert main(["batch", "M", "IN", "--out", "o.jsonl", *common]) == 0
    assert main(["serve", "M", *common]) == 0
    want = {"threads": 1, "quantize": "int8", "preset": "small", "device": "cpu", "dtype": "float32"}
    assert {k: seen["batch"][k] for k in want} == want
    assert {k: getattr(seen["serve"], k) for k in want} == want


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "molmoe_lite.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_reports_a_bad_input_in_one_line(tiny_release, tmp_path):
    proc = _cli("batch", str(tiny_release), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "nowhere" in err and "no such file" in err


@pytest.mark.slow
def test_killed_run_resumes_with_every_id_once_and_no_partial_line(tiny_release, tmp_path):
    """SIGKILL a CLI run once a batch is on disk, run it again: every id exactly once."""
    specs = [(f"img{i:02d}.png", 64 + 40 * (i % 3), 48 + 30 * (i % 4)) for i in range(16)]
    _write_images(tmp_path / "imgs", specs)
    out = tmp_path / "out.jsonl"
    args = ["batch", str(tiny_release), str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "16", "--device", "cpu"]
    proc = _cli(*args)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no batch written in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = _lines(out)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(before) < len(specs), "the run must be killed mid-way for this test to mean anything"
    resumed = _cli(*args)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    records = _lines(out)
    assert sorted(r["id"] for r in records) == sorted(rel for rel, _, _ in specs)
    assert all(r["error"] is None for r in records)
    assert f"{len(before)} skipped" in err  # the summary line
    assert records[: len(before)] == before


def test_bench_batch_prints_one_record_per_run(tmp_path):
    """benchmarks/bench_batch.py on the CPU, tiny sizes: its record (numbers themselves meaningless)."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_batch.py"
    res = subprocess.run([sys.executable, str(bench), "--images", "3", "--batch-sizes", "1,2", "--max-new-tokens", "2",
                          "--image-size", "64x48", "--size", "tiny"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(record["images_per_s"]) == {"1", "2"} and all(v > 0 for v in record["images_per_s"].values())
    assert record["speedup"]["1"] == 1.0 and record["images"] == 3


def test_a_longer_prompt_later_grows_the_engine_context(tiny_model, tmp_path, folder, monkeypatch):
    """Small images first, then large ones: the engine sized for the first prompts is replaced
    by a larger one once the rows in flight finish, and every answer is still the one alone."""
    from molmoe_lite.batch.answer import EngineDecoder

    contexts = []
    grow = EngineDecoder._grow

    def recording_grow(self, tokens):
        grow(self, tokens)
        contexts.append(self.engine.max_context)

    monkeypatch.setattr(EngineDecoder, "_grow", recording_grow)
    order = ["c.JPG", "c.JPG", "a.png", "sub/deeper/d.webp", "sub/b.jpg"]
    rows = [{"id": str(i), "image": str(folder / rel)} for i, rel in enumerate(order)]
    run(tiny_model, rows, tmp_path / "out.jsonl", max_new_tokens=4, batch_size=2, progress=False)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    assert len(contexts) >= 2 and contexts == sorted(contexts), contexts
    for row in rows:
        assert got[row["id"]]["answer"] == tiny_model.generate(row["image"], "Describe this image.", max_new_tokens=4)
