"""Write a random-weight Llama checkpoint folder (Llama-7B shapes by default), block by block.

Usage::

    python benchmarks/make_random_llama.py /work/scratch/llama7b-random          # 13.5 GB
    python benchmarks/make_random_llama.py /tmp/tiny --hidden 256 --layers 4 --heads 4 \\
        --intermediate 688 --vocab 4096

The builder is :func:`prunecli.models.random_llama.write_random_llama` (weights, seeding and
the tokenizer are documented there); this script parses options, times the build, prints the
peak RSS of the process and checks the result: ``AutoConfig`` and ``AutoTokenizer`` load it and
a meta-device model built from ``config.json`` has exactly the tensors in the safetensors
headers. ``make_random_llama(...)`` is the same as a function and returns those numbers.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_folder(folder: Path) -> dict[str, Any]:
    """Config and tokenizer load; the meta-device model matches the safetensors headers."""
    from transformers import AutoConfig, AutoTokenizer

    from prunecli.models.random_llama import config_tensor_mismatches, header_tensors

    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("It is a truth universally acknowledged.")["input_ids"]
    problems = config_tensor_mismatches(folder)
    headers = header_tensors(folder)
    dtypes = sorted({dtype for dtype, _ in headers.values()})
    if max(ids) >= config.vocab_size:
        problems.append(f"tokenizer id {max(ids)} >= vocab_size {config.vocab_size}")
    return {
        "tensors": len(headers),
        "params": sum(_numel(shape) for _, shape in headers.values()),
        "dtypes": dtypes,
        "tokenizer_vocab": len(tokenizer),
        "problems": problems,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_random_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden: int = 4096,
    layers: int = 32,
    heads: int = 32,
    kv_heads: int | None = None,
    intermediate: int = 11008,
    vocab: int = 32000,
    overwrite: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Build the folder and return ``{"path", "seconds", "peak_rss_mb", "bytes", "check"}``.

    Args:
        out_dir: folder to create.
        seed: defines every weight.
        hidden, layers, heads, kv_heads, intermediate, vocab: shapes (Llama-7B's by default;
            ``kv_heads`` defaults to ``heads``).
        overwrite: replace a folder this builder wrote earlier.
        check: load config and tokenizer and compare a meta-device model with the headers.
    """
    from prunecli.models.random_llama import RandomLlamaSpec, write_random_llama

    spec = RandomLlamaSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        seed=seed,
    )
    t = time.perf_counter()
    path = write_random_llama(out_dir, spec, overwrite=overwrite)
    seconds = time.perf_counter() - t
    result: dict[str, Any] = {
        "path": str(path),
        "spec": spec.to_dict(),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "bytes": folder_bytes(path),
    }
    if check:
        result["check"] = check_folder(path)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to create")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--overwrite", action="store_true", help="replace a folder this script wrote earlier")
    ap.add_argument("--no-check", action="store_true", help="skip loading config/tokenizer and shape check")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)

    import torch

    from prunecli.errors import PruneCliError

    torch.set_num_threads(a.threads)
    try:
        r = make_random_llama(
            a.out,
            seed=a.seed,
            hidden=a.hidden,
            layers=a.layers,
            heads=a.heads,
            kv_heads=a.kv_heads,
            intermediate=a.intermediate,
            vocab=a.vocab,
            overwrite=a.overwrite,
            check=not a.no_check,
        )
    except PruneCliError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"wrote {r['path']}: {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.0f}s")
    print(f"peak RSS of this process during the build: {r['peak_rss_mb']:.0f} MiB")
    c = r.get("check")
    if c is not None:
        print(
            f"check: {c['tensors']} tensors, {c['params']:,} parameters, dtypes {c['dtypes']}, "
            f"tokenizer {c['tokenizer_vocab']} tokens, peak RSS after check {peak_rss_mb():.0f} MiB"
        )
        for line in c["problems"]:
            print(f"  MISMATCH {line}")
        if c["problems"]:
            return 1
        print("check: config, tokenizer and meta-device shapes match the safetensors headers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
