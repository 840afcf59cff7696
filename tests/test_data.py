"""Prompt data: parquet + JSONL layouts, chat template, truncation, bad rows, resumable order."""

import json
import logging

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from htpo_jax.run.config import load_config
from htpo_jax.run.data import (
    DataError,
    DataState,
    PromptDataset,
    PromptStream,
    read_rows,
    train_stream,
    val_dataset,
)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def dapo_row(q, a, source="math"):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": q}],
        "ability": "MATH",
        "reward_model": {"ground_truth": a, "style": "rule"},
        "extra_info": {"index": "x"},
    }


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parquet_dapo_layout(tmp_path, tok):
    rows = [dapo_row(f"Compute {i}+1.", str(i + 1)) for i in range(5)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = PromptDataset([path], tok, max_prompt_length=128, pad_to_multiple=16)
    assert len(ds) == 5 and ds.n_skipped == 0
    b = ds.collate([0, 3])
    assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int32
    assert b.ground_truth == ("1", "4") and b.data_source == ("math", "math")
    assert b.row_ids == (0, 3)
    text = tok.decode(b.input_ids[1][b.attention_mask[1] == 1])
    assert text == "<|im_start|>user\nCompute 3+1.<|im_end|>\n<|im_start|>assistant\n"


def test_jsonl_layouts(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            dapo_row("Compute 2+2.", "4", "arith"),
            {"prompt": "Compute 5*5.", "answer": "25"},  # flat
            {"prompt": "Compute 1+1.", "answer": 2},  # numeric answer
        ],
    )
    ds = PromptDataset(path, tok)
    b = ds.collate(range(3))
    assert b.ground_truth == ("4", "25", "2")
    assert b.data_source == ("arith", "mixed", "mixed")  # default source: the file stem
    assert ds.prompt_text(1).startswith("<|im_start|>user\nCompute 5*5.")


def test_no_chat_template_fallback(tmp_path, tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
                "answer": "x",
            }
        ],
    )
    ds = PromptDataset(path, plain)
    assert ds.prompt_text(0) == "Be brief.\nHi"
    b = ds.collate([0])
    assert tok.decode(b.input_ids[0][b.attention_mask[0] == 1]) == "Be brief.\nHi"
    # and the switch in the config turns the template off for a tokenizer that has one
    assert PromptDataset(path, tok, apply_chat_template=False).prompt_text(0) == "Be brief.\nHi"


def test_left_truncation_and_padding(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [dapo_row("x" * 100, "1"), dapo_row("y", "2")])
    ds = PromptDataset(path, tok, max_prompt_length=12, pad_to_multiple=8)
    b = ds.collate([0, 1])
    assert b.input_ids.shape == (2, 16)  # 12 rounded up to the multiple
    kept = b.input_ids[0][b.attention_mask[0] == 1]
    assert len(kept) == 12
    full = tok(ds.prompt_text(0), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(kept, full[-12:])  # the last tokens are kept
    # left padding: pad id then the prompt, mask 0 then 1
    n1 = int(b.attention_mask[1].sum())
    assert (b.attention_mask[1][: 16 - n1] == 0).all() and (
        b.attention_mask[1][16 - n1 :] == 1
    ).all()
    assert (b.input_ids[1][: 16 - n1] == tok.pad_token_id).all()

    wide = PromptDataset(path, tok, max_prompt_length=2048, pad_to_multiple=64)
    assert wide.collate([1]).input_ids.shape == (1, 64)
    assert len(full) == 119  # 6 + 100 + 13 template tokens
    assert wide.collate([0, 1]).input_ids.shape == (2, 128)


def test_bad_rows_skipped_and_counted(tmp_path, tok, caplog):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            dapo_row("ok", "1"),
            dapo_row("", "1"),  # empty prompt content
            {"prompt": [{"role": "user", "content": "q"}]},  # no ground truth
            "{not json",
            dapo_row("ok too", "  "),  # blank ground truth
            {"prompt": [], "answer": "1"},  # no messages
            dapo_row("fine", "2"),
            {"prompt": [{"role": "user"}], "answer": "3"},  # message without content
        ],
    )
    with caplog.at_level(logging.WARNING, logger="htpo_jax.run.data"):
        ds = PromptDataset(path, tok)
    assert len(ds) == 2 and ds.n_skipped == 6 and ds.skipped == {str(path): 6}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "6" in warnings[0] and "row 1" in warnings[0]


def test_unusable_files_are_errors_naming_the_file(tmp_path, tok):
    with pytest.raises(DataError, match="not found: .*nope.parquet"):
        read_rows(tmp_path / "nope.parquet")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "answer": ""}])
    with pytest.raises(DataError, match="empty.jsonl: no valid rows"):
        PromptDataset([empty], tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="x.csv: unsupported"):
        PromptDataset([tmp_path / "x.csv"], tok)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        PromptDataset([tmp_path / "broken.parquet"], tok)


@pytest.fixture
def ten_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "ten.jsonl", [dapo_row(f"q{i}", str(i)) for i in range(10)])
    return PromptDataset(path, tok)


def test_order_is_deterministic_per_epoch(ten_rows):
    a = PromptStream(ten_rows, seed=3)
    seq = [a.next_indices(4) for _ in range(5)]  # 20 items = 2 epochs
    flat = sum(seq, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh permutation each epoch
    assert a.state == DataState(epoch=2, index=0)
    again, other = PromptStream(ten_rows, seed=3), PromptStream(ten_rows, seed=4)
    assert flat == sum((again.next_indices(4) for _ in range(5)), [])
    assert flat != sum((other.next_indices(4) for _ in range(5)), [])
    assert PromptStream(ten_rows, seed=3, shuffle=False).next_indices(12) == [*range(10), 0, 1]


def test_resume_exactly(ten_rows):
    a = PromptStream(ten_rows, seed=0)
    a.next_batch(3)
    a.next_batch(4)
    saved = json.loads(json.dumps(a.state.to_json()))
    rest = [a.next_batch(3) for _ in range(4)]
    b = PromptStream(ten_rows, seed=0, state=DataState.from_json(saved))
    for x in rest:
        y = b.next_batch(3)
        assert x.row_ids == y.row_ids and x.ground_truth == y.ground_truth
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
    with pytest.raises(DataError, match="outside"):
        PromptStream(ten_rows, seed=0, state=DataState(0, 11))


def test_batch_is_a_pytree_of_arrays_only(ten_rows):
    b = ten_rows.collate([0, 1])
    leaves = jax.tree_util.tree_leaves(b)
    assert len(leaves) == 2 and all(isinstance(x, np.ndarray) for x in leaves)
    assert len(b) == 2


def test_iter_batches_and_config_helpers(tmp_path, tok):
    train = write_jsonl(tmp_path / "tr.jsonl", [dapo_row(f"q{i}", str(i)) for i in range(7)])
    cfg = load_config(overrides=[f"data.train_files=[{train}]", "data.max_prompt_length=64"])
    assert val_dataset(cfg, tok) is None
    stream = train_stream(cfg, tok)
    assert len(stream.next_batch(5)) == 5
    cfg = load_config(overrides=[f"data.val_files={train}"])
    sizes = [len(b) for b in val_dataset(cfg, tok).iter_batches(3)]
    assert sizes == [3, 3, 1]
    with pytest.raises(DataError, match="train_files is empty"):
        train_stream(load_config(), tok)


def test_non_utf8_jsonl_line_is_skipped_and_counted(tmp_path, tok, caplog):
    """Before: a UnicodeDecodeError traceback out of the file iterator (issue 20 item 8)."""
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(dapo_row(f"q{i}", str(i))).encode() for i in range(3)]
    latin1 = json.dumps(dapo_row("caf\u00e9", "1"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([good[0], latin1, good[1], b"\xff\xfe{", good[2]]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="htpo_jax.run.data"):
        rows, skipped = read_rows(path)
    assert [r.ground_truth for r in rows] == ["0", "1", "2"] and skipped == 2
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "skipped 2" in warning and "row 1 (not UTF-8" in warning, warning
    path.write_bytes(latin1 + b"\n")  # nothing readable: the usual one-line DataError
    with pytest.raises(DataError, match="mixed.jsonl: no valid rows"):
        read_rows(path)
