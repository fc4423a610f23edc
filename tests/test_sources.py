import json
import sys
import socket

import pytest

from lmjax.config import default_config
from lmjax.data import sources


def data_cfg(tmp_path, source):
    c = default_config().data
    c.source = source
    c.cache_dir = str(tmp_path / "cache")
    return c


def test_pystdlib_split_is_stable_disjoint_and_nontrivial():
    train = sources.pystdlib_split_files("train", 0.05)
    val = sources.pystdlib_split_files("validation", 0.05)
    assert train == sources.pystdlib_split_files("train", 0.05)
    assert val == sources.pystdlib_split_files("validation", 0.05)
    assert not set(train) & set(val)
    assert sorted(train + val) == sources.pystdlib_files()
    assert len(train) > 300 and len(val) > 10
    assert not any("/test/" in f or f.startswith("test/") or "site-packages" in f for f in train + val)
    assert sources.describe_pystdlib()["python_version"] == sys.version.split()[0]


def test_split_assignment_depends_only_on_the_key():
    assert sources.stable_fraction("json/decoder.py") == sources.stable_fraction("json/decoder.py")
    fractions = [sources.stable_fraction(f"doc{i}") for i in range(2000)]
    assert 0.04 < sum(f < 0.05 for f in fractions) / 2000 < 0.06


def test_text_txt_files_are_documents_and_blank_line_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    (tmp_path / "b.txt").write_text("only one\n")
    c = data_cfg(tmp_path, f"text:{tmp_path}/*.txt")
    c.val_fraction = 0.0
    assert sources.get_split(c, "train").documents() == ["first para\n\nsecond para\n", "only one\n"]
    c.doc_split = "blank_line"
    assert sources.get_split(c, "train").documents() == ["first para", "second para", "only one"]


def test_text_jsonl_reads_text_key(tmp_path):
    rows = [{"body": f"document number {i}"} for i in range(50)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = data_cfg(tmp_path, f"text:{tmp_path}/d.jsonl")
    c.text_key = "body"
    c.val_fraction = 0.2
    train = sources.get_split(c, "train").documents()
    val = sources.get_split(c, "validation").documents()
    assert sorted(train + val) == sorted(r["body"] for r in rows)
    assert 0 < len(val) < 25
    c.text_key = "text"
    with pytest.raises(ValueError, match="text_key='text'"):
        sources.get_split(c, "train")


def test_single_file_tail_split_is_nanogpt_split(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    (tmp_path / "input.txt").write_text(text)
    c = data_cfg(tmp_path, f"text:{tmp_path}/input.txt")
    c.text_split = "tail"
    c.val_fraction = 0.1
    assert sources.get_split(c, "train").documents() == [text[:900]]
    assert sources.get_split(c, "validation").documents() == [text[900:]]


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    c = data_cfg(tmp_path, f"text:{tmp_path}/a.txt")
    c.val_fraction = 0.0
    before = sources.get_split(c, "train").fingerprint
    assert sources.get_split(c, "train").fingerprint == before
    (tmp_path / "a.txt").write_text("two")
    assert sources.get_split(c, "train").fingerprint != before


def test_empty_glob_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.txt.*matched no files"):
        sources.get_split(data_cfg(tmp_path, f"text:{tmp_path}/nothing-*.txt"), "train")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        sources.get_split(data_cfg(tmp_path, f"text:{tmp_path}/missing.txt"), "train")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        sources.get_split(data_cfg(tmp_path, f"prepared:{tmp_path}"), "train")


def test_unknown_source_kind_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown data.source 'hf:foo'"):
        sources.get_split(data_cfg(tmp_path, "hf:foo"), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        sources.get_split(data_cfg(tmp_path, "pystdlib"), "test")


def test_unknown_tfds_name_is_a_named_error_without_network(tmp_path, monkeypatch):
    c = data_cfg(tmp_path, "tfds:no_such_dataset_xyz")
    c.tfds_data_dir = str(tmp_path / "tfds")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network for an unknown dataset name")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
        sources.get_split(c, "train")


def test_tfds_source_reads_a_locally_built_array_record_dataset(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    texts = [f"example {i}: " + "word " * i for i in range(20)]

    class LmjaxTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(texts[:15]),
                "validation": self._generate_examples(texts[15:]),
            }

        def _generate_examples(self, rows):
            for i, t in enumerate(rows):
                yield i, {"text": t}

    data_dir = str(tmp_path / "tfds")
    LmjaxTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    c = data_cfg(tmp_path, "tfds:lmjax_tiny_text")
    c.tfds_data_dir = data_dir
    c.tfds_download = False
    assert sources.get_split(c, "train").documents() == texts[:15]
    assert sources.get_split(c, "validation").documents() == texts[15:]
    monkeypatch.setattr(sources, "TFDS_BATCH", 4)  # streamed 4 records per read, never the whole split
    assert list(sources.get_split(c, "train").stream()) == texts[:15]
    c.train_split = "train[:5]"
    assert sources.get_split(c, "train").documents() == texts[:5]
    assert sources.get_split(c, "train").fingerprint != sources.get_split(c, "validation").fingerprint


def test_text_glob_streams_one_file_at_a_time(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"para {i}a\n\npara {i}b\n")
    c = data_cfg(tmp_path, f"text:{tmp_path}/*.txt")
    c.val_fraction, c.doc_split = 0.0, "blank_line"
    read = []
    file_documents = sources._file_documents
    monkeypatch.setattr(sources, "_file_documents", lambda path, cfg: read.append(path) or file_documents(path, cfg))
    stream = sources.get_split(c, "train").stream()
    assert [next(stream), next(stream)] == ["para 0a", "para 0b"] and len(read) == 1
    assert list(stream) == [f"para {i}{x}" for i in range(1, 5) for x in "ab"]
    assert sources.get_split(c, "train").documents() == [f"para {i}{x}" for i in range(5) for x in "ab"]
