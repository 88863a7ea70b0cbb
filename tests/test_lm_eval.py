"""Task accuracy through lm-evaluation-harness on a local task built from the shipped held-out text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import prunecli
from prunecli.cli import app

lm_eval = pytest.importorskip("lm_eval")
runner = CliRunner()
HELDOUT = Path(prunecli.__file__).parent / "data" / "heldout.txt"


def continuation_task(folder: Path, n: int = 12) -> Path:
    """A two-choice task: eight words of a Persuasion sentence, then its next four words or another's."""
    sentences = [
        " ".join(s.split())
        for s in re.split(r"(?<=[.!?])\s+", HELDOUT.read_text(encoding="utf-8"))
        if len(s.split()) >= 12
    ][: 3 * n]
    docs = []
    for i, sentence in enumerate(sentences[:n]):
        words, other = sentence.split(), sentences[(i + n) % len(sentences)].split()
        docs.append(
            {
                "context": " ".join(words[:8]),
                "choices": [" ".join(words[8:12]), " ".join(other[8:12])],
                "label": 0,
            }
        )
    folder.mkdir(parents=True)
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (folder / "continuation.yaml").write_text(
        "task: prunecli_continuation\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    return folder


def test_eval_tasks_on_a_per_layer_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tasks = continuation_task(tmp_path / "tasks")
    out = tmp_path / "pruned"
    recipe = {
        "model": str(tiny_llama_dir),
        "method": "magnitude",
        "sparsity": 0.3,
        "ignore": ["model.layers.0.*"],
    }
    report = prunecli.compress(recipe, output=str(out), on_warning=lambda message: None)
    assert "trust_remote_code=True" in report.load_hint  # widths differ by layer

    args = [
        "eval",
        str(out),
        "--tasks",
        "prunecli_continuation",
        "--task-dir",
        str(tasks),
        "--limit",
        "10",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)["tasks"]["prunecli_continuation"]
    assert 0.0 <= got["acc"] <= 1.0 and got["acc"] * 10 == pytest.approx(round(got["acc"] * 10))

    # the model object prunecli evaluates scores exactly like lm-eval's own loading of the folder
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    own = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", batch_size=1)
    res = lm_eval.simple_evaluate(
        model=own, tasks=["prunecli_continuation"], limit=10, task_manager=TaskManager(include_path=str(tasks)),
        log_samples=False, bootstrap_iters=0,
    )  # fmt: skip
    assert res["results"]["prunecli_continuation"]["acc,none"] == pytest.approx(got["acc"])

    bad = runner.invoke(app, ["eval", str(out), "--tasks", "no_such_task", "--task-dir", str(tasks)])
    assert bad.exit_code == 2 and "unknown lm-eval task 'no_such_task'" in bad.stderr and bad.stdout == ""
    none = runner.invoke(app, ["eval", str(out)])
    assert none.exit_code == 2 and "nothing to evaluate" in none.stderr
