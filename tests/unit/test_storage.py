from potential_meme.storage import LocalStore, open_store, read_json, sync_down, sync_up, write_json


def test_local_store_keys_uris_and_atomic_writes(tmp_path):
    store = open_store(str(tmp_path / "root"))
    assert isinstance(store, LocalStore) and store.uri == (tmp_path / "root").as_uri() + "/"
    assert open_store((tmp_path / "root").as_uri()).root == store.root
    write_json(store, "stage/manifest.json", {"a": 1})
    assert read_json(store, "stage/manifest.json") == {"a": 1}
    assert not list((tmp_path / "root").rglob("*.partial"))
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"\1\2")
    assert sync_up(store, tmp_path / "src", "stage/student") == ["stage/student/sub/w.bin"]
    assert store.list("stage") == ["stage/manifest.json", "stage/student/sub/w.bin"]
    sync_down(store, "stage/student", tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "w.bin").read_bytes() == b"\1\2"
    store.delete_prefix("stage/student/")
    assert store.list() == ["stage/manifest.json"] and not store.exists("stage/student/sub/w.bin")


def test_unsupported_scheme_and_bucketless_s3_are_refused():
    import pytest

    with pytest.raises(ValueError, match="unsupported scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        open_store("s3:///x")
