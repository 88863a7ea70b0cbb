"""Recovery fine-tuning: LoRA lowers the loss, merges back, and the result reloads unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_TEXT, build_tiny_llama, build_tiny_tokenizer

from prunecli.errors import DataError, InputError
from prunecli.recover import batch_order, lora_targets, recover


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny matrices: one thread (see conftest.one_thread_module)."""
    yield


@pytest.fixture(scope="module")
def tok_graph():
    from prunecli.graph import build_graph

    tok = build_tiny_tokenizer()
    return tok, build_graph(build_tiny_llama(vocab_size=max(128, len(tok))))


@pytest.fixture()
def pruned(tok_graph):
    """A tiny Llama with a quarter of its attention and MLP parameters removed (uniformly)."""
    from prunecli.engine.apply import apply_plan
    from prunecli.engine.select import select_uniform, selectable_groups

    tok, graph = tok_graph
    model = build_tiny_llama(vocab_size=max(128, len(tok)), seed=5)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.num_units, generator=gen) for g in selectable_groups(graph)}
    apply_plan(model, graph, select_uniform(graph, scores, 0.25))
    ids = tok(SAMPLE_TEXT * 4)["input_ids"]
    windows = torch.tensor(ids[: 8 * 24]).reshape(8, 24)
    return model, tok, windows


def _mean_loss(model, windows) -> float:
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def test_recover_lowers_loss_and_keeps_shapes(pruned) -> None:
    model, tok, windows = pruned
    shapes = {n: p.shape for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _mean_loss(model, windows)
    stats = recover(model, tok, windows, steps=40, lr=5e-3, lora_rank=4, batch_size=4)
    after = _mean_loss(model, windows)
    assert after < before - 0.3, (before, after)
    assert len(stats["losses"]) == stats["steps"] == 40
    assert stats["trainable_params"] > 0
    # merged back: same parameter names and shapes, no adapter modules, flags restored
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert not any("peft" in type(m).__module__ for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_recovered_model_reloads_with_equal_logits(pruned, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint

    model, tok, windows = pruned
    recover(model, tok, windows, steps=5, lr=1e-3, lora_rank=4, batch_size=2)
    out = save_checkpoint(
        model, tok, tmp_path / "recovered", provenance={"method": "test", "recovery_steps": 5}
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a = model(input_ids=windows).logits
        b = reloaded(input_ids=windows).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_recover_rejects_bad_input(pruned) -> None:
    model, tok, windows = pruned
    with pytest.raises(DataError):
        recover(model, tok, windows[:, :1], steps=1)
    with pytest.raises(DataError):
        recover(model, None, windows + 10_000, steps=1)
    with pytest.raises(InputError):
        recover(model, tok, windows, steps=0)


def test_helpers() -> None:
    model = build_tiny_llama()
    targets = lora_targets(model)
    assert "lm_head" not in targets and len(targets) == 2 * 7
    order = batch_order(5, 4, 2, seed=0)
    assert [len(o) for o in order] == [2, 2, 2, 2]
    assert len(set(torch.cat(order[:2]).tolist())) == 4  # no repeat within an epoch


def test_activation_checkpointing_only_while_training() -> None:
    """Adapters train with layer activations recomputed (memory near inference), then it is undone."""
    from prunecli.recover import attach_lora, detach_lora

    model = build_tiny_llama()
    peft_model, flags = attach_lora(model, lora_targets(model), rank=4)
    base = peft_model.get_base_model()
    assert base.is_activation_checkpointing
    plain = detach_lora(peft_model, flags)
    assert not plain.is_activation_checkpointing
    assert all(p.requires_grad == flags[n] for n, p in plain.named_parameters())
