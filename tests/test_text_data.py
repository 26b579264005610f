"""Tests for the text data: embedded corpus, tokenizer, packed cab_text windows and the grain text pipelines."""

from __future__ import annotations

import json
import pickle
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import assert_batches_equal, take

from cab_jax.data import text, text_builder, text_corpus

SEQ_LEN = 32
VOCAB = 512
CORPUS_BYTES = 200_000


def make_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            name="cab_text",
            data_dir=str(data_dir),
            seq_len=SEQ_LEN,
            vocab_size=VOCAB,
            max_corpus_bytes=CORPUS_BYTES,
            tokenizer="",
            text_key="text",
            train_split="train",
            eval_split="test",
            synthetic=False,
            synthetic_size=40,
            num_workers=0,
        )
    )
    cfg.update(overrides)
    return cfg


def packed_reference(token_lists, seq_len, eos_id):
    """Windows of seq_len + 1 of doc_0 + [eos] + doc_1 + [eos] + ..., cut the obvious way."""
    stream = [t for tokens in token_lists for t in [*tokens, eos_id]]
    count = (len(stream) - 1) // seq_len
    return np.asarray([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]).reshape(
        count, seq_len + 1
    )


def read_windows(builder_or_dir, split):
    builder = text_builder.CabText(
        seq_len=SEQ_LEN, vocab_size=VOCAB, max_corpus_bytes=CORPUS_BYTES, data_dir=str(builder_or_dir)
    )
    source = builder.as_data_source(split=split)
    return np.stack([source[i]["tokens"] for i in range(len(source))])


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    text.prepare(make_cfg(data_dir))
    return data_dir


# --------------------------------------------------------------------------------------------------
# Corpus and tokenizer.


def test_corpus_is_deterministic_capped_and_split_by_name():
    docs = text_corpus.stdlib_documents(CORPUS_BYTES)
    again = text_corpus.stdlib_documents(CORPUS_BYTES)
    assert docs == again
    assert sum(len(d.text.encode()) for d in docs) <= CORPUS_BYTES
    names = [d.name for d in docs]
    assert len(set(names)) == len(names) and all(n.startswith(("stdlib:", "pydoc:")) for n in names)
    assert not [n for n in names if "/test/" in n or "site-packages" in n or "idlelib" in n]
    bigger = text_corpus.stdlib_documents(4 * CORPUS_BYTES)
    assert len(bigger) > len(docs) and sum(len(d.text.encode()) for d in bigger) <= 4 * CORPUS_BYTES
    assert {d.name for d in bigger if d.name.startswith("pydoc:")}  # docs topics are in the mix

    train, held_out = text_corpus.split_documents(bigger)
    assert held_out and train
    assert {d.name for d in train}.isdisjoint(d.name for d in held_out)
    assert sorted(d.name for d in train + held_out) == sorted(d.name for d in bigger)
    # By name, never by position: any order of the documents holds out the same ones.
    rng = np.random.default_rng(0)
    shuffled = [bigger[i] for i in rng.permutation(len(bigger))]
    assert {d.name for d in text_corpus.split_documents(shuffled)[1]} == {d.name for d in held_out}


def test_tokenizer_round_trips_and_has_the_configured_vocab(text_dir):
    cfg = make_cfg(text_dir)
    tokenizer = text.load_tokenizer(cfg)
    assert tokenizer.get_vocab_size() == VOCAB
    assert text.load_eos_id(cfg) == tokenizer.token_to_id(text_corpus.EOS_TOKEN)
    docs = text_corpus.stdlib_documents(CORPUS_BYTES)
    for sample in [d.text[:3000] for d in docs[:5]] + ["naïve café — 数学 ∑ 🐍\r\n\tend  "]:
        ids = tokenizer.encode(sample, add_special_tokens=False).ids
        assert max(ids) < VOCAB
        assert tokenizer.decode(ids) == sample
    # Trained on the train documents only (training is deterministic).
    train, _ = text_corpus.split_documents(docs)
    assert text_corpus.train_tokenizer((d.text for d in train), VOCAB).to_str() == tokenizer.to_str()
    with pytest.raises(ValueError, match="cab_text trains"):
        text.load_tokenizer(make_cfg(text_dir, tokenizer="/some/tokenizer.json"))


def test_cab_text_build_is_deterministic(text_dir, tmp_path):
    text.prepare(make_cfg(tmp_path))
    for split in ("train", "test"):
        np.testing.assert_array_equal(read_windows(tmp_path, split), read_windows(text_dir, split))
    (first,) = text_dir.glob("cab_text/*/1.0.0/tokenizer.json")
    (second,) = tmp_path.glob("cab_text/*/1.0.0/tokenizer.json")
    assert first.read_text() == second.read_text()
    assert first.parent.parent.name == f"seq{SEQ_LEN}_vocab{VOCAB}_bytes{CORPUS_BYTES}"


# --------------------------------------------------------------------------------------------------
# Packing.


@pytest.mark.parametrize("seq_len", [1, 3, 7, 64])
def test_pack_windows_reproduce_the_token_stream(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(1, 100, size=int(rng.integers(0, 40))).tolist() for _ in range(30)] + [[]]
    blocks = list(text_builder.pack_windows(iter(docs), seq_len=seq_len, eos_id=0))
    assert all(b.shape[0] >= 1 and b.shape[1] == seq_len + 1 and b.dtype == np.int32 for b in blocks)
    windows = np.concatenate(blocks)
    np.testing.assert_array_equal(windows, packed_reference(docs, seq_len, 0))
    stream = [t for tokens in docs for t in [*tokens, 0]]
    joined = np.concatenate([windows[0, :1], *(w[1:] for w in windows)])  # minus the one-token overlap
    np.testing.assert_array_equal(joined, stream[: len(joined)])
    assert len(stream) - len(joined) < seq_len  # only a partial window is dropped


def test_cab_text_windows_are_the_packed_documents(text_dir):
    cfg = make_cfg(text_dir)
    tokenizer, eos_id = text.load_tokenizer(cfg), text.load_eos_id(cfg)
    train, held_out = text_corpus.split_documents(text_corpus.stdlib_documents(CORPUS_BYTES))
    for split, docs in (("train", train), ("test", held_out)):
        token_lists = [tokenizer.encode(d.text, add_special_tokens=False).ids for d in docs]
        windows = read_windows(text_dir, split)
        assert windows.dtype == np.int32
        np.testing.assert_array_equal(windows, packed_reference(token_lists, SEQ_LEN, eos_id))
    assert text.train_size(cfg) == len(read_windows(text_dir, "train"))


# --------------------------------------------------------------------------------------------------
# Train iterator and eval batches.


def test_train_batches_shapes_and_process_shards_reassemble(text_dir):
    cfg = make_cfg(text_dir)
    size = text.train_size(cfg)
    steps = size // 8
    full = text.train_dataset(cfg, global_batch_size=8, seed=1, return_index=True)
    windows = read_windows(text_dir, "train")
    check_steps = [0, 1, steps - 1, steps, steps + 1]  # across the epoch boundary
    for step in check_steps:
        batch = full[step]
        assert batch["tokens"].shape == (8, SEQ_LEN + 1) and batch["tokens"].dtype == np.int32
        assert batch["loss_mask"].shape == (8, SEQ_LEN) and batch["loss_mask"].dtype == np.float32
        np.testing.assert_array_equal(batch["loss_mask"], 1.0)
        np.testing.assert_array_equal(batch["tokens"], windows[batch["index"]])
    for process_count in (2, 4):
        shards = [
            text.train_dataset(
                cfg, global_batch_size=8, seed=1, process_index=p, process_count=process_count, return_index=True
            )
            for p in range(process_count)
        ]
        for step in check_steps:
            local = [shard[step] for shard in shards]
            assert local[0]["tokens"].shape == (8 // process_count, SEQ_LEN + 1)
            for key in ("tokens", "loss_mask", "index"):
                np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), full[step][key], err_msg=key)


def test_epochs_are_permutations_and_reshuffle(text_dir):
    cfg = make_cfg(text_dir)
    size = text.train_size(cfg)
    batch = 128
    steps = size // batch
    ds = text.train_dataset(cfg, global_batch_size=batch, seed=2, return_index=True)
    epochs = [np.concatenate([ds[e * steps + s]["index"] for s in range(steps)]) for e in range(2)]
    for index in epochs:
        assert len(set(index.tolist())) == steps * batch and index.min() >= 0 and index.max() < size
    assert not np.array_equal(epochs[0], epochs[1])
    other_seed = text.train_dataset(cfg, global_batch_size=batch, seed=3, return_index=True)
    assert not np.array_equal(other_seed[0]["index"], ds[0]["index"])


def test_train_iterator_resumes_exactly(text_dir):
    cfg = make_cfg(text_dir)
    iterator = text.train_iterator(cfg, global_batch_size=6, seed=0, process_index=1, process_count=3)
    take(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["step"] == 4 and state["seq_len"] == SEQ_LEN
    expected = take(iterator, 3)
    fresh = text.train_iterator(cfg, global_batch_size=6, seed=0, process_index=1, process_count=3)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    # The state restores into another process layout as well: its rows of the same global batches.
    whole = text.train_iterator(cfg, global_batch_size=6, seed=0, process_index=0, process_count=1)
    whole.set_state(state)
    np.testing.assert_array_equal(next(whole)["tokens"][2:4], expected[0]["tokens"])
    with pytest.raises(ValueError, match="seed"):
        text.train_iterator(cfg, global_batch_size=6, seed=9, process_count=1).set_state(state)
    with pytest.raises(ValueError, match="multiple"):
        text.train_iterator(cfg, global_batch_size=5, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="larger than the training set"):
        text.train_iterator(cfg, global_batch_size=10**6, seed=0, process_count=1)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_sequence_once_with_masked_padding(text_dir, process_count):
    cfg = make_cfg(text_dir)
    windows = read_windows(text_dir, "test")
    global_batch = 6 if len(windows) % 6 else 4 * 7  # the last batch must be padded
    assert len(windows) % global_batch
    per_process = [
        text.eval_batches(
            cfg, global_batch_size=global_batch, process_index=p, process_count=process_count, return_index=True
        )
        for p in range(process_count)
    ]
    assert per_process[0].num_examples == len(windows)
    batches = [list(e) for e in per_process]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(per_process[0])
    merged = {
        key: np.concatenate([np.concatenate([b[k][key] for b in batches]) for k in range(len(batches[0]))])
        for key in ("tokens", "loss_mask", "index")
    }
    n, padding = len(windows), len(merged["index"]) - len(windows)
    assert 0 < padding < global_batch
    np.testing.assert_array_equal(merged["index"], [*range(n), *[-1] * padding])
    np.testing.assert_array_equal(merged["tokens"][:n], windows)
    np.testing.assert_array_equal(merged["tokens"][n:], 0)
    assert merged["loss_mask"].shape == (n + padding, SEQ_LEN)
    np.testing.assert_array_equal(merged["loss_mask"][:n], 1.0)
    np.testing.assert_array_equal(merged["loss_mask"][n:], 0.0)
    assert_batches_equal(list(per_process[0]), batches[0])  # re-iterable


def test_worker_processes_give_the_same_batches(text_dir):
    cfg = make_cfg(text_dir)
    expected = take(text.train_iterator(cfg, global_batch_size=4, seed=5, process_count=1), 3)
    iterator = text.train_iterator(make_cfg(text_dir, num_workers=1), global_batch_size=4, seed=5)
    try:
        assert_batches_equal(take(iterator, 3), expected)
    finally:
        iterator.close()


# --------------------------------------------------------------------------------------------------
# Synthetic data and missing datasets.


def test_synthetic_mode_touches_no_files(tmp_path):
    data_dir = tmp_path / "absent"
    cfg = make_cfg(data_dir, synthetic=True, synthetic_size=40, vocab_size=37, seq_len=5)
    assert text.train_size(cfg) == 40
    iterator = text.train_iterator(cfg, global_batch_size=8, seed=3, process_count=1, return_index=True)
    batches = take(iterator, 10)  # two epochs
    tokens = np.concatenate([b["tokens"] for b in batches])
    assert tokens.shape == (80, 6) and tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 37
    assert len(np.unique(tokens)) > 30
    for epoch in (batches[:5], batches[5:]):
        assert sorted(np.concatenate([b["index"] for b in epoch]).tolist()) == list(range(40))
    state = iterator.get_state()
    expected = take(iterator, 2)
    iterator.set_state(state)
    assert_batches_equal(take(iterator, 2), expected)
    eval_batches = list(text.eval_batches(cfg, global_batch_size=16, process_count=1, return_index=True))
    assert len(eval_batches) == 3 and sum(float(b["loss_mask"].sum()) for b in eval_batches) == 40 * 5
    epoch = np.concatenate([b["index"] for b in batches[:5]])
    train_rows = np.concatenate([b["tokens"] for b in batches[:5]])[np.argsort(epoch)]
    eval_rows = np.concatenate([b["tokens"] for b in eval_batches])[:40]
    assert not (train_rows == eval_rows).all(axis=1).any()  # another seed: no row repeats
    assert not data_dir.exists() and not list(tmp_path.iterdir())


class CabTestTexts(tfds.core.GeneratorBasedBuilder):
    """Documents of random words (some non-ASCII, some empty) with an id feature."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see cab_jax/data/digits.py

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40, 0), "validation": self._generate_examples(9, 1)}

    def _generate_examples(self, num, seed):
        rng = np.random.default_rng(seed)
        words = ["def", "return", "the", "naïve", "données", "λ", "import", "x", "\n", "数据"]
        for i in range(num):
            size = 0 if i % 5 == 3 else int(rng.integers(1, 60))
            yield i, {"text": " ".join(rng.choice(words, size=size)), "id": i}


def test_missing_dataset_raises_one_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, name="cab_test_texts", eval_split="validation", tokenizer=str(tmp_path / "tok.json"))
    pattern = rf"cab_test_texts.*{tmp_path}.*tfds build cab_test_texts --data_dir={tmp_path}"
    with pytest.raises(FileNotFoundError, match=pattern):
        text.train_size(cfg)
    with pytest.raises(FileNotFoundError, match=pattern):  # before the (also bad) batch size is checked
        text.train_iterator(cfg, global_batch_size=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError, match=pattern):
        text.eval_batches(cfg, global_batch_size=4, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="no_such_text_xyz"):
        text.train_size(make_cfg(tmp_path, name="no_such_text_xyz"))
    assert not list(tmp_path.iterdir())  # nothing was downloaded or created


@pytest.mark.parametrize("layout", ["file", "hf_dir"])
def test_external_text_dataset_is_packed_with_a_saved_tokenizer(text_dir, tmp_path, layout):
    (cab_tokenizer,) = text_dir.glob("cab_text/*/1.0.0/tokenizer.json")
    if layout == "file":
        tokenizer_path = tmp_path / "my_tokenizer.json"
        shutil.copy(cab_tokenizer, tokenizer_path)
    else:  # a Hugging Face directory whose config names the end-of-text token
        tokenizer_path = tmp_path / "hf"
        tokenizer_path.mkdir()
        shutil.copy(cab_tokenizer, tokenizer_path / "tokenizer.json")
        config = {"eos_token": {"content": text_corpus.EOS_TOKEN, "special": True}}
        (tokenizer_path / "tokenizer_config.json").write_text(json.dumps(config))
    data_dir = tmp_path / "tfds"
    cfg = make_cfg(data_dir, name="cab_test_texts", eval_split="validation", tokenizer=str(tokenizer_path), seq_len=7)
    tfds.builder("cab_test_texts", data_dir=str(data_dir)).download_and_prepare(file_format="array_record")

    tokenizer = text.load_tokenizer(cfg)
    assert tokenizer.to_str() == text.load_tokenizer(make_cfg(text_dir)).to_str()
    eos_id = text.load_eos_id(cfg)
    source = tfds.data_source("cab_test_texts", split="validation", data_dir=str(data_dir), download=False)
    docs = [source[i]["text"] for i in range(len(source))]
    docs = [d.decode() if isinstance(d, bytes) else d for d in docs]
    assert "" in docs and any("数据" in d for d in docs)
    expected = packed_reference([tokenizer.encode(d, add_special_tokens=False).ids for d in docs], 7, eos_id)

    eval_batches = list(text.eval_batches(cfg, global_batch_size=8, process_count=1, return_index=True))
    tokens = np.concatenate([b["tokens"] for b in eval_batches])
    mask = np.concatenate([b["loss_mask"] for b in eval_batches])
    np.testing.assert_array_equal(tokens[: len(expected)], expected)
    np.testing.assert_array_equal(mask[:, 0], np.arange(len(tokens)) < len(expected))

    (cache,) = data_dir.glob("cab_test_texts/1.0.0/cab_jax_packed/validation.seq7.*.bin")
    written = cache.stat().st_mtime_ns
    meta = json.loads(cache.with_suffix(".json").read_text())
    assert meta["num_windows"] == len(expected) and meta["dtype"] == "uint16" and meta["eos_id"] == eos_id
    size = text.train_size(cfg)
    iterator = text.train_iterator(cfg, global_batch_size=4, seed=0, process_count=1, return_index=True)
    batches = take(iterator, size // 4 + 1)
    assert batches[0]["tokens"].shape == (4, 8) and batches[0]["tokens"].max() < VOCAB
    state = iterator.get_state()
    expected_next = take(iterator, 2)
    iterator.set_state(state)
    assert_batches_equal(take(iterator, 2), expected_next)
    assert len(list(data_dir.glob("cab_test_texts/1.0.0/cab_jax_packed/*.bin"))) == 2
    text.eval_batches(cfg, global_batch_size=8, process_count=1)
    assert cache.stat().st_mtime_ns == written  # read from the cache, not packed again

    restored = pickle.loads(pickle.dumps(text._eval_source(cfg)))  # what grain workers receive
    np.testing.assert_array_equal(restored[1]["tokens"], expected[1])

    with pytest.raises(ValueError, match="text feature 'body'"):
        text.train_size(make_cfg(data_dir, name="cab_test_texts", tokenizer=str(tokenizer_path), text_key="body"))
    with pytest.raises(ValueError, match=r"data\.vocab_size=100"):
        text.train_size(make_cfg(data_dir, name="cab_test_texts", tokenizer=str(tokenizer_path), vocab_size=100))
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        text.train_size(make_cfg(data_dir, name="cab_test_texts", tokenizer=str(tmp_path / "none")))
