"""The data package: tokenizers, packing, seeded order, dp invariance, resume, and its errors."""

import copy
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data import (
    ByteTokenizer,
    HFTokenizer,
    build_dataloader,
    build_tokenizer,
    document_boundaries,
    documents,
    parquet_documents,
)
from data import fingerprint as data_fingerprint
from data.document_boundaries import missing_eos_warning
from data.fingerprint import DIGEST
from data.token_stream import document_batches, load_token_stream, tokenize_batches
from tests.word_tokenizer import write_word_tokenizer

EOS = ByteTokenizer.eos_id
ROOT = Path(__file__).resolve().parents[1]

# torchdata 0.11 calls a torch API that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def make_loader(path, **overrides):
    args = dict(
        dataset="text",
        dataset_path=str(path),
        tokenizer=ByteTokenizer(),
        seq_len=4,
        global_batch_size=4,
        dp_rank=0,
        dp_degree=1,
        seed=0,
        vocab_size=300,
    )
    args.update(overrides)
    return build_dataloader(**args)


def take(loader, n):
    it = iter(loader)
    return [next(it)["input_ids"] for _ in range(n)]


def write_token_file(path, ids):
    np.asarray(ids, dtype="<u4").tofile(path)
    return path


@pytest.fixture
def numbered_tokens(tmp_path):
    """A tokens file of 0..46: eleven 4-token windows (window i starts at 4i), 3 tokens left over."""
    return write_token_file(tmp_path / "numbers.bin", range(47))


# --- tokenizers ---------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Persuasion, 1818 — naïve café ☕"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_id]) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_build_tokenizer_picks_bytes_and_rejects_anything_else(tmp_path):
    assert isinstance(build_tokenizer("bytes"), ByteTokenizer)
    for spec in (str(tmp_path / "nothing-here"), str(tmp_path), "gpt2"):
        with pytest.raises(ValueError, match='expected "bytes", a path to a Hugging Face tokenizer.json'):
            build_tokenizer(spec)


def test_hf_tokenizer_without_the_library_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_hf_tokenizer_from_file_or_folder_finds_eos(tmp_path):
    path = write_word_tokenizer(tmp_path)
    for spec in (str(path), str(tmp_path)):
        tok = build_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert (tok.vocab_size, tok.eos_id) == (4, 0)
        assert tok.encode("hello world hello") == [2, 3, 2]
        assert tok.decode([2, 3]) == "hello world"


def test_hf_tokenizer_eos_by_name_or_a_clear_error(tmp_path):
    path = write_word_tokenizer(tmp_path, eos_token="<END>")
    with pytest.raises(ValueError, match="tokenizer.json: no end-of-sequence token found.*set model.eos_token"):
        build_tokenizer(str(path))
    with pytest.raises(ValueError, match=r"looked for <\|im_end\|>\).*set model.eos_token"):
        build_tokenizer(str(path), eos_token="<|im_end|>")
    for spec in (str(path), str(tmp_path)):
        assert build_tokenizer(spec, eos_token="<END>").eos_id == 0


def test_bytes_tokenizer_refuses_an_eos_token():
    with pytest.raises(ValueError, match="bytes tokenizer's EOS is always id 256, so leave model.eos_token empty"):
        build_tokenizer("bytes", eos_token="</s>")


@pytest.mark.parametrize("content", ["{not json", '{"hello": "world"}'])
def test_corrupt_tokenizer_json_names_the_file(tmp_path, content):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    message = f"^{re.escape(str(path))}: not a readable Hugging Face tokenizer.json .*; use the tokenizer.json"
    with pytest.raises(ValueError, match=message):
        build_tokenizer(str(path))


def test_hf_tokenized_text_ends_documents_with_its_eos(tmp_path):
    tok = HFTokenizer(write_word_tokenizer(tmp_path))
    (tmp_path / "a.txt").write_text("hello world\n\nworld")
    loader = make_loader(tmp_path / "a.txt", tokenizer=tok, seq_len=5, global_batch_size=1)
    assert take(loader, 1)[0].tolist() == [[2, 3, 0, 3, 0]]


# --- packing ------------------------------------------------------------------------------


def test_text_documents_are_packed_with_eos_and_the_remainder_dropped(tmp_path):
    (tmp_path / "b.txt").write_text("ef\n")
    (tmp_path / "a.txt").write_text("ab\n\ncd\n \n\n\n")  # blank lines may hold spaces
    (tmp_path / "ignored.md").write_text("not a .txt file")
    a, b, c, d, e, f = b"abcdef"
    stream = load_token_stream("text", tmp_path, ByteTokenizer(), 300)
    assert stream.tolist() == [a, b, EOS, c, d, EOS, e, f, EOS]

    first_epoch = take(make_loader(tmp_path, seq_len=4, global_batch_size=2), 1)[0]
    assert sorted(first_epoch.tolist()) == [[a, b, EOS, c], [d, EOS, e, f]]  # final EOS dropped


# Blank lines made of \t, U+2028, U+00A0 and \r; a form feed ending a document; CRLF inside one.
TRICKY_TEXT = "  first\r\n line \n\t\n\u2028\n second\x0c\n\n\n\u00a0\nthird\u2028still third\n \n"


def test_streamed_text_splits_documents_like_the_blank_line_rule(tmp_path, monkeypatch):
    """Read a line at a time, in batches of any size, the documents are re.split's on blank lines."""
    (tmp_path / "a.txt").write_text(TRICKY_TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text("last", encoding="utf-8")
    reference = [d.strip() for d in re.split(r"\n\s*\n", TRICKY_TEXT) if d.strip()] + ["last"]
    assert len(reference) == 4
    expected = [i for doc in reference for i in (*doc.encode("utf-8"), EOS)]
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    monkeypatch.setattr(documents, "BATCH_BYTES", 1)  # every document its own batch
    batches = list(document_batches("text", files, "text"))
    assert [b.documents for b in batches] == [[doc] for doc in reference]
    assert batches[-1].bytes_read == sum(f.stat().st_size for f in files)
    assert tokenize_batches(iter(batches), ByteTokenizer()).tolist() == expected
    monkeypatch.undo()  # the default: one batch
    assert load_token_stream("text", tmp_path, ByteTokenizer(), 300).tolist() == expected


def test_jsonl_documents_are_the_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    line_separator = "\u2028"  # legal inside a JSON string; must not split the line
    records = [{"text": "hi", "id": 1}, {"text": "yo" + line_separator}]
    path.write_text(
        json.dumps(records[0]) + "\n\n" + json.dumps(records[1], ensure_ascii=False) + "\n", encoding="utf-8"
    )
    expected = [*b"hi", EOS, *b"yo", *line_separator.encode("utf-8"), EOS]
    assert load_token_stream("jsonl", path, ByteTokenizer(), 300).tolist() == expected


def test_jsonl_text_field_is_configurable(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "ab", "text": "no"}\n{"body": "c"}\n')
    loader = make_loader(path, dataset="jsonl", text_column="body", seq_len=5, global_batch_size=1)
    assert take(loader, 1)[0].tolist() == [[*b"ab", EOS, *b"c", EOS]]
    with pytest.raises(ValueError, match='docs.jsonl: line 2 has no string "text" field.*dataset_text_column'):
        make_loader(path, dataset="jsonl")


def write_parquet(path, columns, row_group_size=None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_folder_is_its_text_column_in_file_order(tmp_path, monkeypatch):
    """Two files (one of three row groups), read two rows at a time; ids are the tokenizer's own."""
    tok = HFTokenizer(write_word_tokenizer(tmp_path))
    first = ["hello world", "", "  world\n\nhello  "]  # kept as they are: a row is a document
    second = ["world", "hello hello", "world hello", "hello", "world world"]
    write_parquet(tmp_path / "b.parquet", {"id": range(5), "body": second}, row_group_size=2)
    write_parquet(tmp_path / "a.parquet", {"body": first})
    (tmp_path / "c.txt").write_text("not parquet")
    monkeypatch.setattr(parquet_documents, "PARQUET_BATCH_ROWS", 2)
    monkeypatch.setattr(documents, "BATCH_BYTES", 1)
    expected = [i for doc in first + second for i in (*tok.encode(doc), tok.eos_id)]
    batches = list(document_batches("parquet", sorted(tmp_path.glob("*.parquet")), "body"))
    assert len(batches) == 8 and batches[-1].bytes_read == sum(f.stat().st_size for f in tmp_path.glob("*.parquet"))
    stream = load_token_stream("parquet", tmp_path, tok, 300, text_column="body")
    assert stream.dtype == np.uint32 and stream.tolist() == expected
    loader = make_loader(
        tmp_path, dataset="parquet", text_column="body", tokenizer=tok, seq_len=len(expected), global_batch_size=1
    )
    assert take(loader, 1)[0].tolist() == [expected]


@pytest.mark.parametrize(
    "problem, columns, message",
    [
        ("no column", {"id": [1], "body": ["x"]}, r"bad.parquet: no column 'text' \(it has id, body\); "),
        (
            "not strings",
            {"text": [1, 2]},
            r"bad.parquet: column 'text' holds int64, not strings; set dataset_text_column",
        ),
        ("no rows", {"text": pa.array([], pa.string())}, r"bad.parquet: empty file \(no rows\); remove it or fill it"),
        ("a null", {"text": ["x", None]}, r"bad.parquet: row 1 of column 'text' is null; drop or fill"),
    ],
)
def test_parquet_column_problems_name_the_file(tmp_path, problem, columns, message):
    write_parquet(tmp_path / "a.parquet", {"text": ["fine"]})
    write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(ValueError, match=message):
        make_loader(tmp_path, dataset="parquet")


def test_every_parquet_footer_is_checked_before_any_document_is_read(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": ["fine"]})
    write_parquet(tmp_path / "b.parquet", {"content": ["fine"]})
    with pytest.raises(ValueError, match="b.parquet: no column 'text'"):
        document_batches("parquet", sorted(tmp_path.iterdir()), "text")  # raises before iteration


@pytest.mark.parametrize("damage", ["not parquet", "truncated", "empty"])
def test_corrupt_parquet_file(tmp_path, damage):
    path = write_parquet(tmp_path / "bad.parquet", {"text": ["some text"] * 100})
    whole = path.read_bytes()
    damaged = {"not parquet": b"id,text\n1,hello\n", "truncated": whole[: len(whole) // 2], "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file \(.+\); replace it or remove it"):
        make_loader(path, dataset="parquet")


def test_corrupt_parquet_page_behind_a_good_footer(tmp_path):
    """Footer and page headers intact, the second row group's compressed dictionary overwritten."""
    path = write_parquet(tmp_path / "bad.parquet", {"text": [f"doc {i} " * 5 for i in range(100)]}, row_group_size=50)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start, end = chunk.dictionary_page_offset + 30, chunk.data_page_offset
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad.parquet: corrupt Parquet data after row \d+ \(.+\); replace the file"):
        make_loader(path, dataset="parquet")


def test_folder_without_parquet_files(tmp_path):
    (tmp_path / "a.csv").write_text("text")  # (*.txt files: test_a_file_named_for_another_format_is_refused_naming_it)
    with pytest.raises(ValueError, match=r"folder holds no \*.parquet files"):
        make_loader(tmp_path, dataset="parquet")


def test_tokens_file_is_memory_mapped_and_windowed(numbered_tokens):
    stream = load_token_stream("tokens", numbered_tokens, ByteTokenizer(), 300)
    assert isinstance(stream, np.memmap)
    loader = make_loader(numbered_tokens, dataset="tokens", global_batch_size=11)
    (batch,) = take(loader, 1)
    assert batch.dtype == torch.int64 and batch.shape == (11, 4)
    assert sorted(batch.tolist()) == [[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3] for i in range(11)]


def test_every_epoch_reads_every_window_once_in_a_new_order(numbered_tokens):
    loader = make_loader(numbered_tokens, dataset="tokens", global_batch_size=1)
    firsts = [int(b[0, 0]) // 4 for b in take(loader, 33)]
    epochs = [firsts[0:11], firsts[11:22], firsts[22:33]]
    assert all(sorted(epoch) == list(range(11)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


# --- order ---------------------------------------------------------------------------------


def test_order_is_a_function_of_the_seed(numbered_tokens):
    def first_items(seed):
        return torch.cat(take(make_loader(numbered_tokens, dataset="tokens", seed=seed), 5))

    assert torch.equal(first_items(7), first_items(7))
    assert not torch.equal(first_items(7), first_items(8))


@pytest.mark.parametrize("dp_degree", [2, 4])
def test_the_global_batch_is_the_same_whatever_dp_degree(numbered_tokens, dp_degree):
    """Eight steps of 8 sequences over 11 windows: batches straddle epoch boundaries."""

    def global_batches(dp):
        per_rank = [
            take(make_loader(numbered_tokens, dataset="tokens", global_batch_size=8, dp_rank=r, dp_degree=dp), 8)
            for r in range(dp)
        ]
        for batches in per_rank:
            assert all(b.shape == (8 // dp, 4) for b in batches)
        return [torch.cat(step) for step in zip(*per_rank)]

    one_rank = global_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(one_rank, global_batches(dp_degree), strict=True))


def test_unshuffled_windows_are_in_file_order_and_sliced_like_training(numbered_tokens):
    """shuffle=False (validation): global sequence k is window k (of 11), epoch after epoch, whatever the seed;
    rank r of 2 takes the second half of each global batch of 4."""

    def items(dp_rank=0, dp_degree=1, seed=0):
        loader = make_loader(
            numbered_tokens, dataset="tokens", dp_rank=dp_rank, dp_degree=dp_degree, seed=seed, shuffle=False
        )
        return torch.cat(take(loader, 3))

    window_starts = items()[:, 0].tolist()
    assert window_starts == [4 * (k % 11) for k in range(12)]
    assert torch.equal(items(seed=5), items())
    assert items(dp_rank=1, dp_degree=2)[:, 0].tolist() == [8, 12, 24, 28, 40, 0]


# --- resume --------------------------------------------------------------------------------


def test_resume_after_three_items_continues_exactly():
    corpus = dict(path="data/corpus", seq_len=64, global_batch_size=4, vocab_size=512)
    uninterrupted = take(make_loader(**corpus), 8)

    interrupted = make_loader(**corpus)
    assert all(torch.equal(x, y) for x, y in zip(take(interrupted, 3), uninterrupted[:3]))
    state = copy.deepcopy(interrupted.state_dict())

    resumed = make_loader(**corpus)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 5), uninterrupted[3:8], strict=True))


def test_state_saved_on_two_ranks_resumes_one_rank_at_the_same_step(numbered_tokens):
    def loader(dp_rank=0, dp_degree=1):
        return make_loader(numbered_tokens, dataset="tokens", dp_rank=dp_rank, dp_degree=dp_degree)

    two_rank_loader = loader(dp_rank=1, dp_degree=2)
    take(two_rank_loader, 3)
    one_rank_resumed = loader()
    one_rank_resumed.load_state_dict(two_rank_loader.state_dict())
    assert torch.equal(take(one_rank_resumed, 1)[0], take(loader(), 4)[3])


def test_state_from_another_data_config_is_refused(numbered_tokens):
    saved = make_loader(numbered_tokens, dataset="tokens", seed=1)
    take(saved, 2)
    other = make_loader(numbered_tokens, dataset="tokens", seed=2)
    other.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match=r"saved for other data \(seed: saved 1, now 2\)"):
        take(other, 1)


def test_a_position_resumes_on_the_same_tokens_however_they_are_read(tmp_path, monkeypatch):
    """Saved on the corpus as text, a position continues exactly on its pre-tokenized copy, moved, and under
    another spelling of its path; the same number of other tokens is refused."""
    corpus = dict(seq_len=64, global_batch_size=4, vocab_size=512)
    saved = make_loader("data/corpus", **corpus)
    take(saved, 3)
    state = copy.deepcopy(saved.state_dict())
    uninterrupted = take(make_loader("data/corpus", **corpus), 5)
    tokens = load_token_stream("text", Path("data/corpus"), ByteTokenizer(), 512)
    write_token_file(tmp_path / "corpus.tokens", tokens)
    monkeypatch.chdir(tmp_path)
    for path, dataset in (("corpus.tokens", "tokens"), (str(ROOT / "data" / "corpus"), "text")):
        resumed = make_loader(path, dataset=dataset, **corpus)
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(take(resumed, 2), uninterrupted[3:], strict=True)), path
    write_token_file(tmp_path / "other.tokens", np.roll(tokens, 1))
    other = make_loader("other.tokens", dataset="tokens", **corpus)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"tokens: saved 465,725 tokens of 'data/corpus' .*\(as many, other tokens\)"):
        take(other, 1)


def test_a_position_saved_with_the_data_path_is_matched_on_the_token_count(numbered_tokens):
    """Checkpoints saved before the digest named the data by path: the count, seq_len, global batch size and
    seed still decide."""
    saved = make_loader(numbered_tokens, dataset="tokens")
    take(saved, 2)
    state = copy.deepcopy(saved.state_dict())
    fingerprint = state["dataset_state"]["fingerprint"]
    del fingerprint[DIGEST]
    fingerprint.update(dataset="text", dataset_path="elsewhere/numbers.txt")
    resumed = make_loader(numbered_tokens, dataset="tokens")
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, 1)[0], take(make_loader(numbered_tokens, dataset="tokens"), 3)[2])
    fingerprint["num_tokens"] = 48
    shorter = make_loader(numbered_tokens, dataset="tokens")
    shorter.load_state_dict(state)
    with pytest.raises(ValueError, match=r"tokens: saved 48 tokens of 'elsewhere/numbers.txt' \(text, "):
        take(shorter, 1)


def test_the_digest_reads_a_bounded_part_of_a_long_stream(monkeypatch):
    """Both ends and evenly spread samples: a change there is seen, the work does not grow with the stream."""
    monkeypatch.setattr(data_fingerprint, "EDGE_TOKENS", 100)
    monkeypatch.setattr(data_fingerprint, "SAMPLES", 4)
    monkeypatch.setattr(data_fingerprint, "SAMPLE_TOKENS", 10)
    stream = np.arange(10_000, dtype=np.uint32)
    read = []
    monkeypatch.setattr(np, "ascontiguousarray", lambda a, dtype: read.append(len(a)) or a.astype(dtype))
    digest = data_fingerprint.token_digest(stream)
    assert read == [100, 10, 10, 10, 10, 100]
    for position in (0, 9_999, 100):  # the ends and the first sample
        changed = stream.copy()
        changed[position] += 1
        assert data_fingerprint.token_digest(changed) != digest


# --- errors --------------------------------------------------------------------------------


def test_global_batch_must_split_evenly_over_ranks(numbered_tokens):
    with pytest.raises(ValueError, match="global_batch_size 6 is not divisible by dp_degree 4"):
        make_loader(numbered_tokens, dataset="tokens", global_batch_size=6, dp_degree=4)


def test_unknown_format_names_the_choices(numbered_tokens):
    with pytest.raises(ValueError, match="expected one of 'text', 'jsonl', 'parquet', 'tokens'"):
        make_loader(numbered_tokens, dataset="csv")


@pytest.mark.parametrize("dataset", ["text", "jsonl", "parquet", "tokens"])
def test_missing_path(tmp_path, dataset):
    with pytest.raises(ValueError, match="missing.*no such file"):
        make_loader(tmp_path / "missing", dataset=dataset)


def test_folder_without_text_files(tmp_path):
    with pytest.raises(ValueError, match=r"folder holds no \*.txt files"):
        make_loader(tmp_path)


FORMAT_MIXUPS = {  # file (a folder where it ends in "/"), its contents, the format it is read as, the one it says
    "jsonl_file_as_text": ("corpus.jsonl", '{"text": "hello world"}\n', "text", "jsonl"),
    "jsonl_folder_as_text": ("corpus/part0.jsonl", '{"text": "hello world"}\n', "text", "jsonl"),
    "text_file_as_jsonl": ("corpus.txt", "hello world\n", "jsonl", "text"),
    "tokens_file_as_text": ("corpus.tokens", "hell", "text", "tokens"),  # 1 uint32 token, valid UTF-8 as text
    "text_file_as_tokens": ("corpus.txt", "hello world!", "tokens", "text"),
}


@pytest.mark.parametrize("mixup", list(FORMAT_MIXUPS))
def test_a_file_named_for_another_format_is_refused_naming_it(tmp_path, mixup):
    name, contents, dataset, says = FORMAT_MIXUPS[mixup]
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(contents)
    path = tmp_path / name.split("/")[0]
    what = f"a {path.suffix} file" if path.is_file() else f"a folder of *{Path(name).suffix} files"
    message = f'{path}: {what}, read as dataset = "{dataset}"; set the format to "{says}" (--training.dataset {says}'
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        make_loader(path, dataset=dataset)


def test_a_folder_of_both_formats_reads_the_recipes(tmp_path):
    (tmp_path / "a.txt").write_text("abc def\n")
    (tmp_path / "b.jsonl").write_text('{"text": "ghi"}\n')
    assert take(make_loader(tmp_path, shuffle=False, global_batch_size=2), 1)[0].tolist() == [
        list(b"abc "),
        list(b"def") + [EOS],
    ]


def test_block_causal_needs_the_tokenizers_eos_in_the_data(monkeypatch):
    """An error when no window holds it; a warning when the first windows looked at hold none."""
    windows = (np.arange(40, dtype=np.uint32) % 7).reshape(10, 4)  # ids 0..6
    assert missing_eos_warning(windows, 6, "corpus.tokens") is None
    message = (
        r"^corpus.tokens holds no EOS \(id 9, the end of sequence of the run\'s tokenizer\) in any of its 10 windows, "
        r'.*re-tokenize it .* set model.eos_token .*; else set model.attn_mask_type = "causal"$'
    )
    with pytest.raises(ValueError, match=message):
        missing_eos_warning(windows, 9, "corpus.tokens")
    monkeypatch.setattr(document_boundaries, "EOS_SCAN_TOKENS", 8)  # the first 2 windows
    windows[5, 2] = 9
    assert missing_eos_warning(windows, 9, "corpus.tokens").startswith(
        "block_causal: no EOS (id 9, the run's tokenizer's) in the first 8 tokens of corpus.tokens, "
    )
    windows[1, 3] = 9
    assert missing_eos_warning(windows, 9, "corpus.tokens") is None


@pytest.mark.parametrize("dataset", ["text", "jsonl", "tokens"])
def test_empty_file(tmp_path, dataset):
    path = tmp_path / "empty"
    path.write_text("\n \n" if dataset != "tokens" else "")
    with pytest.raises(ValueError, match="empty.*empty file"):
        make_loader(path, dataset=dataset)


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 3 \(byte 0xe9\)"):
        make_loader(path)


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON"):
        make_loader(path, dataset="jsonl")


@pytest.mark.parametrize("record", ['{"body": "x"}', '{"text": 3}', '["text"]'])
def test_jsonl_line_without_a_string_text_field(tmp_path, record):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + record + "\n")
    with pytest.raises(ValueError, match='bad.jsonl: line 3 has no string "text" field'):
        make_loader(path, dataset="jsonl")


def test_tokens_file_size_not_a_multiple_of_four(tmp_path):
    path = tmp_path / "ragged.bin"
    path.write_bytes(b"\x01\x00\x00\x00\x02\x00")
    with pytest.raises(ValueError, match="ragged.bin: size 6 bytes is not a multiple of 4"):
        make_loader(path, dataset="tokens")


def test_tokens_file_with_an_id_beyond_the_vocab(tmp_path):
    path = write_token_file(tmp_path / "big.bin", [1, 2, 3, 299, 300, 5, 7000])
    with pytest.raises(
        ValueError, match="big.bin: token id 300 at offset 4 \\(in tokens\\) is >= the model's vocab_size 300"
    ):
        make_loader(path, dataset="tokens")


def test_tokenizer_larger_than_the_model_vocab(numbered_tokens):
    with pytest.raises(ValueError, match="vocab_size 257 and EOS id 256.*model's vocab_size 200.*at least 257"):
        make_loader(numbered_tokens, dataset="tokens", vocab_size=200)


def test_fewer_tokens_than_one_window(tmp_path):
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="only 4 tokens, but seq_len = 16 needs at least 16"):
        make_loader(tmp_path / "short.txt", seq_len=16)


# --- the shipped corpus --------------------------------------------------------------------


def test_shipped_corpus_loads_fast_as_plain_english():
    start = time.perf_counter()
    stream = load_token_stream("text", Path("data/corpus"), ByteTokenizer(), 257)
    assert time.perf_counter() - start < 2.0
    assert 300_000 < len(stream) < 600_000
    assert ByteTokenizer().decode(stream[:40].tolist()).startswith("Persuasion")
