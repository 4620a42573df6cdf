"""Fuzzing the readers of untrusted files: they raise ann2snn's own errors and nothing else."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ann2snn
from ann2snn.calibration.calibrate import load_statistics
from ann2snn.calibration.data import read_texts
from ann2snn.errors import Ann2SnnError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_calibration_reader_raises_only_its_own_errors(tmp_path, data, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    try:
        texts = read_texts(path)
    except Ann2SnnError:
        return
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)


@FUZZ
@given(lines=st.lists(json_values, min_size=1, max_size=5))
def test_jsonl_reader_raises_only_its_own_errors(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    try:
        read_texts(path)
    except Ann2SnnError:
        pass


@FUZZ
@given(config=json_values, recipe=json_values, files=json_values)
def test_export_loader_raises_only_its_own_errors(tmp_path, config, recipe, files):
    folder = tmp_path / "export"
    folder.mkdir(exist_ok=True)
    document = config if not isinstance(config, dict) else {**config, "recipe": recipe, "files": files, "format_version": 1}
    (folder / "snn_config.json").write_text(json.dumps(document))
    try:
        ann2snn.load(folder)
    except Ann2SnnError:
        pass


@FUZZ
@given(data=st.binary(max_size=600))
def test_statistics_loader_raises_only_its_own_errors(tmp_path, data):
    path = tmp_path / "calibration.safetensors"
    header = json.dumps({"a/absmax": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data if data[:1] == b"\x01" else data)
    try:
        load_statistics(path)
    except Ann2SnnError:
        pass


shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@FUZZ
@given(entries=st.dictionaries(st.sampled_from(["absmax", "p99.9", "top", "sample", "tokens", "other"]),
                               st.tuples(shapes, st.sampled_from(["float32", "int64"]), st.floats(-1e3, 1e3) | st.just(float("nan"))),
                               max_size=6))
def test_statistics_loader_checks_what_it_reads(tmp_path, entries):
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.layers.0.mlp.down_proj/{key}": torch.full(shape, value).to(getattr(torch, dtype))
               if dtype == "float32" else torch.zeros(shape, dtype=torch.int64)
               for key, (shape, dtype, value) in entries.items()}
    path = tmp_path / "stats.safetensors"
    save_file(tensors, str(path))
    try:
        statistics, _ = load_statistics(path)
    except Ann2SnnError:
        return
    for stats in statistics.values():  # what loads is usable: consistent shapes, finite numbers
        assert stats["p99.9"].shape == stats["absmax"].shape == stats["sample"].shape[1:]
