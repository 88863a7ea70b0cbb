"""Memory and time of `prunecli compress` at scale: layer-sequential, streamed 7B, data-parallel.

Usage (each section alone, or several with a comma list; results are merged into the JSON)::

    python benchmarks/scale.py --sections sequential --out docs/benchmarks/scale.json
    python benchmarks/scale.py --sections llama7b --llama-dir /work/scratch/llama7b-random
    python benchmarks/scale.py --sections nproc

Sections:

- ``sequential``: SmolLM2-135M, FLAP, CFSP and wanda-sp at sparsity 0.5, whole-model
  calibration vs ``--sequential``. The two plans must be identical (full removal lists from
  the saved ``prunecli.json``; FLAP's bias-compensation vectors are compared too, as a max
  difference). A first row times one dense forward pass (logits included) over the same
  calibration tokens in the runner's batches; "prune / dense fwd" divides each run's prune
  time (graph tracing, calibration, selection, removal) by it.
- ``llama7b``: a random-weight Llama with Llama-7B's shapes (13.5 GB of bfloat16, built by
  ``make_random_llama.py`` when the folder is missing), FLAP at 0.5 with 16 x 128 calibration
  tokens, ``--sequential --dtype auto`` (and ``--max-memory SIZE`` with ``--max-memory``).
  Reports peak RSS, output size, and whether the output's ``config.json`` describes exactly
  the tensors in its safetensors headers (a meta-device model, no tensor read).
- ``nproc``: SmolLM2-135M, FLAP, CFSP and wanda-sp with ``--nproc 2`` (gloo) vs one process:
  same plan, wall time.

Every configuration is one ``python -m prunecli compress ... --json`` subprocess. Its peak RSS
is ``ru_maxrss`` from ``os.wait4`` on that process (the largest single process among it and
the children it waited for; the figure ``/usr/bin/time -v`` reports); "tree MiB" is the
largest sum of RSS over the process and all its descendants, sampled every 0.2 s with psutil
(the number that matters with ``--nproc``). The baseline is a process that only imports torch
and transformers; "over baseline" subtracts it. The SmolLM2 sections save with ``--no-verify``
so that the reload check does not add a second model copy to the peak (the 7B section keeps
verification, which is a shapes-only check above 4 GiB of weights).

A section whose options the CLI does not have yet stops with one line saying which; the
others still run. Exit status 1 when any section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = common.REPO
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # this checkout's prunecli, as in the subprocesses
SECTIONS = ("sequential", "llama7b", "nproc")
# (label, extra flags) of the configurations each section compares; the first is the reference
SEQUENTIAL_MODES = [("whole-model", []), ("sequential", ["--sequential"])]
NPROC_MODES = [(1, []), (2, ["--nproc", "2"])]
LLAMA7B_FLAGS = ["--sequential", "--dtype", "auto"]


class SectionError(Exception):
    """A section cannot run or a run failed; the message is one line."""


# ----------------------------------------------------------------------------------- running


def measure(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``cmd``; return its exit code, wall time, peak RSS (``wait4``), peak tree RSS, output."""
    try:
        import psutil
    except ImportError:  # tree sampling is optional
        psutil = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        # a session of its own, so that a timeout or ^C ends the run and every worker it started
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, text=True, cwd=REPO, env=env, start_new_session=True
        )
        tree_peak = 0
        killed = False
        handle = None
        if psutil is not None:
            try:
                handle = psutil.Process(proc.pid)
            except psutil.Error:
                handle = None
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if timeout is not None and time.perf_counter() - t > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                if handle is not None:
                    tree_peak = max(tree_peak, _tree_rss(handle))
                time.sleep(0.2)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "tree_peak_rss_mb": tree_peak / 2**20 if handle is not None else None,
        "timed_out": killed,
        "stdout": stdout,
        "stderr": stderr,
    }


def _tree_rss(handle: Any) -> int:
    total = 0
    try:
        procs = [handle, *handle.children(recursive=True)]
    except Exception:  # the process ended between two samples
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except Exception:
            pass
    return total


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a process that only imports torch and transformers."""
    r = measure([sys.executable, "-c", "import torch, transformers"], env=child_env(args.threads))
    if r["returncode"]:
        raise SectionError(f"the baseline process failed: {_last_line(r['stderr'])}")
    return {"peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"]}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def compress_options() -> set[str]:
    """The option names ``prunecli compress`` accepts in this checkout."""
    try:
        import typer

        from prunecli.cli import app

        command = typer.main.get_command(app).commands["compress"]
        return {name for p in command.params for name in getattr(p, "opts", [])}
    except Exception:  # fall back to the help text
        env = {**child_env(None), "COLUMNS": "300"}
        r = subprocess.run(
            [sys.executable, "-m", "prunecli", "compress", "--help"], capture_output=True, text=True, env=env
        )
        return {tok.strip("│,") for tok in r.stdout.split() if tok.startswith("--")}


def require(options: set[str], section: str, flags: list[str]) -> None:
    missing = [f for f in flags if f not in options]
    if missing:
        raise SectionError(
            f"section {section}: `prunecli compress` has no {', '.join(missing)} option in this checkout "
            "(the calibration runner has not landed yet)"
        )


def compress(
    model: str,
    method: str,
    out_dir: Path,
    flags: list[str],
    args: argparse.Namespace,
    *,
    verify: bool = False,
) -> dict[str, Any]:
    """One ``prunecli compress`` run: measurements, the JSON report and the saved plan."""
    cmd = [
        sys.executable,
        "-m",
        "prunecli",
        "compress",
        model,
        "--method",
        method,
        "--sparsity",
        str(args.sparsity),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        *(["--calib", args.calib] if args.calib else []),
        "-o",
        str(out_dir),
        "--overwrite",
        "--json",
        *([] if verify else ["--no-verify"]),
        *flags,
    ]
    print(f"  $ {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    r = measure(cmd, env=child_env(args.threads), timeout=args.timeout)
    row: dict[str, Any] = {
        "command": "prunecli " + " ".join(cmd[3:]),
        "wall_s": r["wall_s"],
        "peak_rss_mb": r["peak_rss_mb"],
        "tree_peak_rss_mb": r["tree_peak_rss_mb"],
    }
    if r["timed_out"]:
        row["error"] = f"timed out after {args.timeout:.0f}s"
        return row
    if r["returncode"]:
        row["error"] = _last_line(r["stderr"])
        return row
    try:
        report = json.loads(r["stdout"])
    except json.JSONDecodeError:
        row["error"] = "the --json report is not valid JSON: " + _last_line(r["stdout"])
        return row
    row["seconds"] = report.get("seconds")
    memory = report.get("memory") or {}
    row["chosen"] = f"{memory.get('mode', '?')}{' offloaded' if memory.get('offload') else ''}"
    row["memory_reason"] = memory.get("reason")
    row["calib_hash"] = (report.get("calibration") or {}).get("hash")
    row["units_removed"] = (report.get("plan") or {}).get("units_removed")
    row["sparsity_blocks"] = (report.get("sparsity") or {}).get("blocks")
    row["params_after"] = (report.get("params") or {}).get("after")
    row["plan"] = saved_plan(out_dir)
    if row["plan"] is not None:
        text = json.dumps(row["plan"]["removals"], sort_keys=True)
        row["removals_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return row


def saved_plan(out_dir: Path) -> dict[str, Any] | None:
    """The full plan (``removals``, ``bias_updates``) stored with a checkpoint.

    ``prunecli.json["plan"]`` today; any other JSON file in the folder with a ``plan`` that has
    ``removals`` is accepted too.
    """
    candidates = [out_dir / "prunecli.json", *sorted(out_dir.glob("*.json"))]
    for path in candidates:
        try:
            plan = json.loads(path.read_text(encoding="utf-8")).get("plan")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(plan, dict) and isinstance(plan.get("removals"), dict):
            return {"removals": plan["removals"], "bias_updates": plan.get("bias_updates") or {}}
    return None


def compare_plans(ref: dict[str, Any] | None, other: dict[str, Any] | None) -> dict[str, Any]:
    """Whether two plans remove exactly the same units; how far their bias updates differ."""
    if ref is None or other is None:
        return {"same_plan": None}
    a, b = ref["removals"], other["removals"]
    groups = sorted(set(a) | set(b))
    differ = [g for g in groups if sorted(a.get(g, [])) != sorted(b.get(g, []))]
    units = sum(len(set(a.get(g, [])) ^ set(b.get(g, []))) for g in differ)
    bias_diff = 0.0
    for name in set(ref["bias_updates"]) | set(other["bias_updates"]):
        x, y = ref["bias_updates"].get(name), other["bias_updates"].get(name)
        if x is None or y is None or len(x) != len(y):
            bias_diff = float("inf")
            break
        bias_diff = max(bias_diff, max((abs(p - q) for p, q in zip(x, y)), default=0.0))
    out: dict[str, Any] = {"same_plan": not differ, "groups_differ": len(differ), "units_differ": units}
    if ref["bias_updates"] or other["bias_updates"]:
        out["bias_max_diff"] = bias_diff
    return out


def _finish(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    row["over_baseline_mb"] = row["peak_rss_mb"] - base["peak_rss_mb"]
    row.pop("plan", None)
    return row


# ---------------------------------------------------------------------------------- sections


_FORWARD = """
import json, sys, time, torch
from prunecli import calibration_windows, load_model
from prunecli.calibrate import BATCH_TOKENS
model, calib, n, seqlen = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
lm = load_model(model)
ids = calibration_windows(lm.tokenizer, calib, nsamples=n, seqlen=seqlen, seed=0)
bw = max(1, BATCH_TOKENS // seqlen)
t = time.perf_counter()
with torch.no_grad():
    for i in range(0, ids.shape[0], bw):
        lm.model(input_ids=ids[i : i + bw], use_cache=False)
print(json.dumps({"forward_s": time.perf_counter() - t, "tokens": int(ids.numel())}))
"""


def dense_forward(args: argparse.Namespace) -> dict[str, Any]:
    """One dense forward pass (logits included) over the calibration windows, batched as the runner does."""
    cmd = [sys.executable, "-c", _FORWARD, args.model, args.calib or "", str(args.nsamples), str(args.seqlen)]
    r = measure(cmd, env=child_env(args.threads), timeout=args.timeout)
    if r["returncode"]:
        raise SectionError(f"dense forward pass failed: {_last_line(r['stderr'])}")
    return json.loads(r["stdout"].strip().splitlines()[-1])


def section_sequential(args: argparse.Namespace, base: dict[str, Any], options: set[str]) -> list[dict]:
    require(options, "sequential", [f for _, flags in SEQUENTIAL_MODES for f in flags if f.startswith("--")])
    rows = []
    forward = dense_forward(args)
    print(f"  dense forward over the calibration tokens: {forward['forward_s']:.1f} s", flush=True)
    rows.append({"method": "(dense forward)", "mode": "whole-model", "prune_s": forward["forward_s"]})
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        for method in ("flap", "cfsp", "wanda-sp"):
            ref = None
            for mode, flags in SEQUENTIAL_MODES:
                row = compress(args.model, method, Path(tmp) / f"{method}-{mode}", flags, args)
                row.update(model=args.model, method=method, mode=mode)
                if "error" not in row:
                    row["prune_s"] = (row.get("seconds") or {}).get("prune")
                    if row["prune_s"] is not None:
                        row["prune_over_forward"] = row["prune_s"] / forward["forward_s"]
                    if ref is None:
                        ref = row
                    else:
                        row.update(compare_plans(ref["plan"], row["plan"]))
                        row["same_calib"] = row["calib_hash"] == ref["calib_hash"]
                        row["wall_over_whole"] = row["wall_s"] / ref["wall_s"]
                rows.append(row)
            for row in rows[-2:]:
                _finish(row, base)
    return rows


def section_nproc(args: argparse.Namespace, base: dict[str, Any], options: set[str]) -> list[dict]:
    require(options, "nproc", [f for _, flags in NPROC_MODES for f in flags if f.startswith("--")])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        for method in ("flap", "cfsp", "wanda-sp"):
            ref = None
            for n, flags in NPROC_MODES:
                row = compress(args.model, method, Path(tmp) / f"{method}-{n}", flags, args)
                row.update(model=args.model, method=method, nproc=n)
                if "error" not in row:
                    if ref is None:
                        ref = row
                    else:
                        row.update(compare_plans(ref["plan"], row["plan"]))
                        row["same_calib"] = row["calib_hash"] == ref["calib_hash"]
                        row["speedup"] = ref["wall_s"] / row["wall_s"]
                rows.append(row)
            for row in rows[-2:]:
                _finish(row, base)
    return rows


def ensure_random_llama(folder: Path) -> dict[str, Any]:
    """Build the 7B-shaped random Llama at ``folder`` unless something is there already.

    An existing folder is used as it is (another random Llama, or a real model); its spec is
    recorded when make_random_llama.py wrote it.
    """
    from prunecli.models.random_llama import read_spec

    if folder.exists():
        if not (folder / "config.json").is_file():
            raise SectionError(f"section llama7b: {folder} exists but holds no config.json")
        spec = read_spec(folder)
        return {"built": False, "spec": spec.to_dict() if spec else None}
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path.cwd()).free
    if free < 30e9:
        raise SectionError(f"section llama7b: {free / 1e9:.0f} GB free; the model and one output need ~21 GB")
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "make_random_llama.py"), str(folder)]
    print(f"  building the 7B-shaped random Llama: $ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    r = measure(cmd, env=child_env(None))
    if r["returncode"]:
        raise SectionError(
            f"section llama7b: building {folder} failed: {_last_line(r['stderr'] + r['stdout'])}"
        )
    spec = read_spec(folder)
    return {
        "built": True,
        "spec": spec.to_dict() if spec else None,
        "build_s": r["wall_s"],
        "build_peak_rss_mb": r["peak_rss_mb"],
    }


def section_llama7b(args: argparse.Namespace, base: dict[str, Any], options: set[str]) -> list[dict]:
    modes = [("sequential", LLAMA7B_FLAGS)]
    if args.max_memory:
        # no --sequential: prunecli chooses the mode from the bound (the report says which)
        modes.append((f"--max-memory {args.max_memory}", ["--dtype", "auto", "--max-memory", args.max_memory]))
    require(options, "llama7b", sorted({f for _, flags in modes for f in flags if f.startswith("--")}))
    folder = Path(args.llama_dir).expanduser().resolve()
    build = ensure_random_llama(folder)
    from prunecli.models.random_llama import config_tensor_mismatches

    rows = []
    llama_args = argparse.Namespace(
        **{**vars(args), "nsamples": args.llama_nsamples, "seqlen": args.llama_seqlen, "calib": None}
    )
    for i, (mode, flags) in enumerate(modes):
        out_dir = Path(args.scratch) / f"llama7b-flap-{i}"
        free = shutil.disk_usage(args.scratch).free
        if free < 10e9:
            raise SectionError(
                f"section llama7b: {free / 1e9:.0f} GB free in {args.scratch}; the output needs ~7 GB"
            )
        row = compress(str(folder), "flap", out_dir, flags, llama_args, verify=True)
        row.update(model=str(folder), method="flap", mode=mode, **build)
        if "error" not in row:
            row["output_gb"] = common_bytes(out_dir) / 1e9
            try:
                problems = config_tensor_mismatches(out_dir)
            except Exception as exc:  # a config that does not even build counts as a mismatch
                problems = [f"{type(exc).__name__}: {_last_line(str(exc))}"]
            row["config_matches_tensors"] = not problems
            row["config_problems"] = problems[:5]
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        rows.append(_finish(row, base))
    return rows


def common_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


RUNNERS = {"sequential": section_sequential, "llama7b": section_llama7b, "nproc": section_nproc}
COLUMNS = {
    "sequential": [
        ("method", "method", ""),
        ("mode", "mode", ""),
        ("wall_s", "wall s", ".1f"),
        ("wall_over_whole", "wall / whole", ".2f"),
        ("prune_s", "prune s", ".1f"),
        ("prune_over_forward", "prune / dense fwd", ".2f"),
        ("peak_rss_mb", "peak MiB", ".0f"),
        ("over_baseline_mb", "over baseline MiB", ".0f"),
        ("units_removed", "units removed", ","),
        ("same_plan", "same plan", ""),
        ("bias_max_diff", "bias max diff", ".2g"),
    ],
    "llama7b": [
        ("mode", "mode", ""),
        ("chosen", "calibration", ""),
        ("wall_s", "wall s", ".0f"),
        ("peak_rss_mb", "peak MiB", ".0f"),
        ("over_baseline_mb", "over baseline MiB", ".0f"),
        ("tree_peak_rss_mb", "tree MiB", ".0f"),
        ("output_gb", "output GB", ".2f"),
        ("sparsity_blocks", "block sparsity", ".3f"),
        ("config_matches_tensors", "config = tensors", ""),
    ],
    "nproc": [
        ("method", "method", ""),
        ("nproc", "nproc", ""),
        ("wall_s", "wall s", ".1f"),
        ("speedup", "speed-up", ".2f"),
        ("peak_rss_mb", "peak MiB", ".0f"),
        ("tree_peak_rss_mb", "tree MiB", ".0f"),
        ("same_plan", "same plan", ""),
    ],
}


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    lines = [head, "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if "error" in r and key == columns[2][0]:
                cells.append("error")
            elif v is None:
                cells.append("–")
            elif isinstance(v, bool):
                cells.append("yes" if v else "NO")
            else:
                cells.append(format(v, fmt) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [
        f"{r.get('method', '')} {r.get('mode', r.get('nproc', ''))}: {r['error']}"
        for r in rows
        if "error" in r
    ]
    return "\n".join(lines + [f"error: {e}" for e in errors])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from: {','.join(SECTIONS)}"
    )
    ap.add_argument("--model", default="smollm2-135m", help="model of the sequential and nproc sections")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (SmolLM2 sections)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument(
        "--calib",
        default=str(common.CALIB) if common.CALIB.is_file() else None,
        help="calibration text of the SmolLM2 sections (default: ../shared/data/austen_emma.txt, "
        "else prunecli's shipped sample)",
    )
    ap.add_argument("--llama-dir", default=str(REPO.parent / "scratch" / "llama7b-random"))
    ap.add_argument("--llama-nsamples", type=int, default=16, help="calibration windows (7B section)")
    ap.add_argument("--llama-seqlen", type=int, default=128)
    ap.add_argument(
        "--max-memory", default="", help="also run the 7B model with --max-memory SIZE (e.g. 5GB)"
    )
    ap.add_argument("--scratch", default=tempfile.gettempdir(), help="where outputs are written (7B: ~7 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the 7B output folder")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--out", default="docs/benchmarks/scale.json")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)

    out_path = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    try:
        payload = json.loads(out_path.read_text())
    except (OSError, ValueError):
        payload = {}
    payload.setdefault("sections", {})
    options = compress_options()
    base = baseline(args)
    print(f"baseline (import torch, transformers): peak {base['peak_rss_mb']:.0f} MiB")
    failed = False
    for name in sections:
        print(f"\n## {name}", flush=True)
        t = time.perf_counter()
        try:
            rows = RUNNERS[name](args, base, options)
        except SectionError as exc:
            print(f"error: {exc}", flush=True)
            payload["sections"][name] = {"error": str(exc)}
            failed = True
            continue
        except Exception as exc:  # one line per section; the traceback only with --debug
            if args.debug:
                raise
            line = f"section {name}: {type(exc).__name__}: {_last_line(str(exc))} (--debug for the traceback)"
            print(f"error: {line}", flush=True)
            payload["sections"][name] = {"error": line}
            failed = True
            continue
        failed = failed or any("error" in r for r in rows) or any(r.get("same_plan") is False for r in rows)
        print(table(rows, COLUMNS[name]))
        payload["sections"][name] = {
            "rows": rows,
            "baseline": base,
            "seconds": time.perf_counter() - t,
            "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"),
        }
    common.write_json(out_path, payload)
    print(f"\nwrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
