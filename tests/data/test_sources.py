"""Sources: every (rank, worker) slot reads a disjoint part, together all of it; bad input fails naming key and file."""

from collections import Counter

import pytest

from mambatrain.config.schema import RecipeError, TextSourceConfig
from mambatrain.data.sources import DataError, DocumentStream, SourceReader, looks_local
from mambatrain.data.streaming import TextStreams

from corpus_helpers import doc_text, documents_of, read_slots, write_corpus, write_jsonl

RANKS, WORKERS = 2, 2


def text_streams(path, seq_len=48, **source):
    return TextStreams([TextSourceConfig(path=str(path), **source)], "data.text.sources", "byte", "<|endoftext|>",
                       seed=0, shuffle_files=True, seq_len=seq_len, reset=True, cycle=False)


@pytest.mark.parametrize("n_files", [4, 1, 3], ids=["files-split", "one-file", "3-files-for-4-slots"])
def test_two_ranks_two_workers_cover_every_document_once(tmp_path, n_files):
    expected = write_corpus(tmp_path / "corpus", n_files, docs_per_file=120 // n_files)
    counts, per_slot = Counter(), []
    for rank in range(RANKS):
        for stream, rows in sorted(read_slots(text_streams(tmp_path / "corpus"), rank, RANKS, WORKERS).items()):
            docs = documents_of(rows)
            per_slot.append(len(docs))
            counts.update(docs)
    assert len(per_slot) == RANKS * WORKERS and min(per_slot) > 0
    assert set(counts) == set(expected)  # complete
    assert max(counts.values()) == 1  # disjoint


def test_mixture_draws_by_weight_and_restarts_exactly(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", range(0, 200))
    b = write_jsonl(tmp_path / "b.jsonl", range(1000, 1200))
    sources = [TextSourceConfig(path=str(a), weight=3.0), TextSourceConfig(path=str(b), weight=1.0)]
    stream = DocumentStream(sources, "data.text.sources", slot=0, n_slots=1, seed=5)
    first = [next(stream) for _ in range(100)]
    from_a = sum(int(d.split(":")[0][3:]) < 1000 for d in first)
    assert 60 <= from_a <= 90  # 3:1 weights
    position = stream.position()
    following = [next(stream) for _ in range(300)]  # runs past the end of both files: each source cycles
    resumed = DocumentStream(sources, "data.text.sources", slot=0, n_slots=1, seed=5, position=position)
    assert [next(resumed) for _ in range(300)] == following


def test_a_source_cycles_through_epochs_without_gaps(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", range(7))
    reader = SourceReader(TextSourceConfig(path=str(path)), "data.text.sources[0]", 0, 1, seed=0)
    docs = [next(reader) for _ in range(21)]
    for epoch in range(3):
        assert sorted(docs[7 * epoch: 7 * epoch + 7]) == sorted(doc_text(i) for i in range(7))
    # Positioned after the last document of epoch 2: a reader opened there starts epoch 3.
    again = SourceReader(TextSourceConfig(path=str(path)), "data.text.sources[0]", 0, 1, seed=0,
                         position=reader.position)
    assert next(again) == next(reader)
    assert again.position["epoch"] == 3


def test_hub_names_and_local_paths_are_told_apart():
    assert not looks_local("allenai/c4") and not looks_local("wikitext")
    assert looks_local("data/train.jsonl") and looks_local("./corpus") and looks_local("shards/*.parquet")


def read_one(path, **source):
    return next(SourceReader(TextSourceConfig(path=str(path), **source), "data.text.sources[0]", 0, 1, seed=0))


def test_missing_file_names_the_key_and_path(tmp_path):
    with pytest.raises(RecipeError, match=r"data.text.sources\[0\].path: .*nope.jsonl matches no file"):
        read_one(tmp_path / "nope.jsonl")


def test_empty_file_is_an_error_not_a_silent_run(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data.text.sources\[0\].path: no documents in .*empty.jsonl"):
        read_one(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(DataError, match="no documents with text"):
        read_one(tmp_path / "blank.jsonl")


def test_missing_text_field_lists_the_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", range(3), field="body")
    with pytest.raises(DataError, match=r"data.text.sources\[0\].text_field: no column 'text' .* columns are body, id"):
        read_one(tmp_path / "a.jsonl")
    assert read_one(tmp_path / "a.jsonl", text_field="body") == doc_text(0)


@pytest.mark.parametrize("name,content", [("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
                                          ("bad.txt", b"fine line\nnot \xff utf-8\n")])
def test_invalid_utf8_names_the_file_and_byte(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name} at byte \d+ is not valid UTF-8"):
        read_one(tmp_path / name)


def test_more_slots_than_documents_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", range(1))
    reader = SourceReader(TextSourceConfig(path=str(tmp_path / "a.jsonl")), "data.text.sources[0]", 3, 4, seed=0)
    with pytest.raises(DataError, match="slot 3 of 4"):
        next(reader)


def test_parquet_arrow_and_txt_files_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["alpha", "beta", "gamma"]})
    pq.write_table(table, tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "a.txt").write_text("alpha\nbeta\ngamma\n")
    for name in ("a.parquet", "a.arrow", "a.txt"):
        reader = SourceReader(TextSourceConfig(path=str(tmp_path / name)), "data.text.sources[0]", 0, 1, seed=0,
                              cycle=False)
        assert [next(reader) for _ in range(3)] == ["alpha", "beta", "gamma"], name


def test_an_unreachable_hub_name_is_a_recipe_error(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 after datasets may have read it: set the flags it reads, so the hub code
    # path is taken and fails at once instead of after a network timeout.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeError, match=r"data.text.sources\[0\].path: 'someorg/no-such-dataset' is not a local "
                                          r"file, folder or glob, and loading it as a hub dataset failed"):
        read_one("someorg/no-such-dataset")
