"""Reading raw text from a data source: a file, a folder, a ``datasets`` split or the shipped sample.

``load_texts(source)`` returns a list of documents (strings); tokenisation happens in
:mod:`prunecli.data.windows`. See ``prunecli/data/README.md`` for the accepted sources.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from prunecli.errors import DataError, DependencyMissingError

__all__ = ["HfSpec", "load_texts", "parse_hf_spec", "sample_text"]

SOURCES_HINT = (
    "give a .txt or .jsonl file, a folder of .txt files, hf:NAME[:CONFIG]:SPLIT[:FIELD], "
    "or no source for the built-in sample"
)
# Split names that datasets on the hub commonly use; decides how `hf:NAME:X:Y` is read.
_STANDARD_SPLITS = frozenset({"train", "validation", "valid", "val", "test", "dev", "eval", "all"})
# Suffixes that are structured or binary data, not plain text: refuse instead of reading garbage.
_NOT_TEXT = frozenset({".json", ".parquet", ".arrow", ".csv", ".tsv", ".gz", ".zip", ".bz2", ".xz"})
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class HfSpec:
    """A parsed ``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` source.

    ``name`` is a hub dataset id or a folder written by ``save_to_disk`` (``local`` is True when
    it names an existing folder or looks like a Windows path); ``split`` may carry a slice
    (``train[:1000]``).
    """

    name: str
    config: str | None
    split: str
    field: str
    local: bool


def sample_text(name: str = "sample") -> str:
    """A shipped text: ``sample`` (the opening of Austen's *Emma*, ~190 KB, the default
    calibration text) or ``heldout`` (chapters 1-6 of *Persuasion*, ~100 KB, for evaluation)."""
    return resources.files("prunecli.data").joinpath(BUILTIN[name]).read_text(encoding="utf-8")


# `builtin:NAME` data sources: texts shipped inside the package, so examples need no download.
BUILTIN = {"sample": "sample.txt", "heldout": "heldout.txt"}


def load_texts(source: str | Path | None, *, text_field: str = "text") -> list[str]:
    """Read the documents of a data source.

    An existing path is always read as a path (even one that starts with ``hf:`` or contains
    ``:``); otherwise ``hf:`` selects the ``datasets`` library.

    Args:
        source: ``None`` for the shipped sample; ``builtin:sample`` / ``builtin:heldout`` for
            the shipped texts (:data:`BUILTIN`); a ``.jsonl`` file (one JSON object per line);
            a folder (its ``*.txt`` files, sorted by name, one document each); any other file
            (read whole as UTF-8 text); or ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``.
        text_field: field of each JSON line holding the text (``.jsonl`` only; ``hf:`` specs
            name their field in the spec, default ``text``).

    Returns:
        The documents, in source order. They are joined with ``"\\n\\n"`` before tokenising.

    Raises:
        DataError: missing, unreadable or empty source, a bad JSON line (its number is given),
            a dataset that cannot be loaded.

    Example:
        >>> docs = load_texts("reviews.jsonl", text_field="review")  # doctest: +SKIP
    """
    if source is None:
        return [sample_text()]
    spec = str(source)
    if not spec.strip():
        raise DataError("empty data source name", hint=SOURCES_HINT)
    path = Path(spec).expanduser()
    if _exists(path):
        if path.is_dir():
            texts = _read_folder(path)
        elif path.suffix.lower() == ".jsonl":
            texts = _read_jsonl(path, text_field)
        elif path.suffix.lower() in _NOT_TEXT:
            raise DataError(
                f"{path} is not plain text or JSON lines ({path.suffix} files are not read directly)",
                hint="convert it to .jsonl (one JSON object per line) or load it with `datasets` and "
                "save_to_disk, then pass hf:<folder>:SPLIT:FIELD",
            )
        else:
            texts = [_read_text(path)]
    elif spec.startswith("hf:"):
        texts = _load_hf(parse_hf_spec(spec))
    elif spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DataError(f"no shipped text {spec!r}", hint=f"use builtin:{' or builtin:'.join(BUILTIN)}")
        texts = [sample_text(name)]
    else:
        raise DataError(f"data source not found: {spec}", hint=SOURCES_HINT)
    if not any(t.strip() for t in texts):
        raise DataError(f"data source {spec} contains no text", hint=SOURCES_HINT)
    return texts


def parse_hf_spec(spec: str) -> HfSpec:
    """Parse ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``.

    ``:`` inside brackets (split slices such as ``train[:10%]``) does not separate fields. NAME
    is the longest ``:``-joined prefix that is an existing folder, so local paths may contain
    ``:`` (``hf:C:\\data\\wiki:train``). A hub id never contains ``:`` and never starts with
    ``/``, ``.``, ``~`` or ``\\``, so such a NAME is a (possibly missing) local folder. With two
    fields after NAME, they are SPLIT:FIELD when the dataset is local or the first is a standard
    split name (``train``, ``validation``, ``test``, ...), else CONFIG:SPLIT.
    ``hf:NAME::SPLIT:FIELD`` is always unambiguous.

    Args:
        spec: the source string, starting with ``hf:``.

    Raises:
        DataError: a spec without a split or with too many fields.
    """
    if not spec.startswith("hf:"):
        raise DataError(f"not an hf: data spec: {spec}", hint="write hf:NAME[:CONFIG]:SPLIT[:FIELD]")
    body = spec[3:]
    parts = _split_outside_brackets(body)
    name: str | None = None
    local = False
    for k in range(len(parts) - 1, 0, -1):  # leave at least one field for the split
        candidate = ":".join(parts[:k])
        if candidate and _exists(Path(candidate).expanduser()) and Path(candidate).expanduser().is_dir():
            name, rest, local = candidate, parts[k:], True
            break
    if name is None:
        n_name = 2 if _WINDOWS_DRIVE.match(body) else 1
        name, rest = ":".join(parts[:n_name]), parts[n_name:]
        # Hub ids look like `owner/name`; these prefixes only ever start a (missing) local path.
        local = n_name == 2 or name.startswith(("/", ".", "~", "\\"))
    bad = DataError(
        f"cannot read data spec {spec!r}: expected hf:NAME[:CONFIG]:SPLIT[:FIELD]",
        hint="for example hf:wikitext:wikitext-2-raw-v1:test or hf:./my_dataset:train:text",
    )
    if not name or not rest or len(rest) > 3:
        raise bad
    config: str | None = None
    field = ""
    if len(rest) == 1:
        split = rest[0]
    elif len(rest) == 2:
        if local or _split_base(rest[0]) in _STANDARD_SPLITS:
            split, field = rest
        else:
            config, split = rest
    else:
        config, split, field = rest
    if not split:
        raise bad
    if local and config:
        raise DataError(
            f"data spec {spec!r} gives a config ({config!r}) for a local dataset folder",
            hint="a folder written by save_to_disk has no configs: write hf:FOLDER:SPLIT[:FIELD]",
        )
    return HfSpec(name=name, config=config or None, split=split, field=field or "text", local=local)


# -- readers ---------------------------------------------------------------------------------


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long for the file system: not a path
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start})", hint="re-encode the file as UTF-8"
        ) from exc
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc.strerror or exc}", hint="check the path and permissions"
        ) from exc


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts: list[str] = []
    # split on \n only: str.splitlines would also cut at U+2028/U+0085, legal inside JSON strings
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {lineno}: not valid JSON ({exc.msg})",
                hint="each line of a .jsonl file must be one JSON object",
            ) from exc
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(
                f"{path}, line {lineno}: no field {text_field!r}",
                hint="choose the field that holds the text (--text-field)",
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}, line {lineno}: field {text_field!r} is {type(value).__name__}, not a string",
                hint="choose the field that holds the text (--text-field)",
            )
        texts.append(value)
    return texts


def _read_folder(path: Path) -> list[str]:
    try:
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file()), key=lambda p: p.name
        )
    except OSError as exc:
        raise DataError(
            f"cannot list {path}: {exc.strerror or exc}", hint="check the path and permissions"
        ) from exc
    if not files:
        if any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            hint = f"this looks like a `datasets` folder: pass hf:{path}:SPLIT[:FIELD]"
        else:
            hint = SOURCES_HINT
        raise DataError(f"folder {path} has no .txt files", hint=hint)
    return [_read_text(p) for p in files]


def _load_hf(spec: HfSpec) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise DependencyMissingError(
            "hf: data sources need the `datasets` package", hint="pip install datasets"
        ) from exc
    if spec.local:
        dataset = _local_split(datasets, spec)
    else:
        from prunecli.models.loading import _hub_offline, _hub_reachable

        # Offline (HF_HUB_OFFLINE, or the hub does not answer within 3 s): look in the cache only,
        # so a missing dataset fails at once instead of after a minute of retries on stderr.
        offline = _hub_offline() or not _hub_reachable()
        saved = datasets.config.HF_HUB_OFFLINE
        verbosity = datasets.logging.get_verbosity()
        try:
            datasets.config.HF_HUB_OFFLINE = saved or offline
            datasets.logging.set_verbosity_error()
            dataset = datasets.load_dataset(spec.name, spec.config, split=spec.split)
        except Exception as exc:  # datasets raises many types (ConnectionError, ValueError, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if offline:
                raise DataError(
                    f"cannot load dataset {spec.name!r}: it is not in the local cache and the hub is unreachable or offline",
                    hint="download it where the hub is reachable (datasets.load_dataset(...).save_to_disk(DIR)) "
                    "and pass hf:DIR:SPLIT[:FIELD], or pass a .txt/.jsonl file",
                ) from exc
            raise DataError(
                f"cannot load dataset {spec.name!r} (config {spec.config!r}, split {spec.split!r}): {first}",
                hint="check the name, config and split and the network (HF_HUB_OFFLINE); offline, save it "
                "with save_to_disk and pass hf:<folder>:SPLIT[:FIELD]",
            ) from exc
        finally:
            datasets.config.HF_HUB_OFFLINE = saved
            datasets.logging.set_verbosity(verbosity)
    if spec.field not in dataset.column_names:
        raise DataError(
            f"dataset {spec.name!r} split {spec.split!r} has no column {spec.field!r} "
            f"(columns: {', '.join(dataset.column_names)})",
            hint="name the text column as the last field: hf:NAME[:CONFIG]:SPLIT:FIELD",
        )
    texts = list(dataset[spec.field])
    for i, value in enumerate(texts):
        if not isinstance(value, str):
            raise DataError(
                f"dataset {spec.name!r} row {i}: {spec.field!r} holds {type(value).__name__}, not text",
                hint="name the text column as the last field: hf:NAME[:CONFIG]:SPLIT:FIELD",
            )
    return texts


def _local_split(datasets, spec: HfSpec):  # -> datasets.Dataset
    folder = Path(spec.name).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"dataset folder not found: {spec.name}", hint="pass a folder written by save_to_disk"
        )
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(
            f"{spec.name} is not a dataset folder written by save_to_disk ({type(exc).__name__})",
            hint="a folder of .txt files is passed without hf:; a saved dataset as hf:FOLDER:SPLIT[:FIELD]",
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = {name: len(ds) for name, ds in loaded.items()}
        try:
            instructions = datasets.ReadInstruction.from_spec(spec.split).to_absolute(splits)
        except (ValueError, AssertionError) as exc:
            raise DataError(
                f"split {spec.split!r} not usable in {spec.name} (splits: {', '.join(splits)})",
                hint="name one of the splits, optionally sliced: train, train[:1000], test[:10%]",
            ) from exc
        pieces = [loaded[i.splitname].select(range(i.from_, i.to)) for i in instructions]
        return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    own = str(loaded.split) if loaded.split is not None else None
    if own is not None and _split_base(spec.split) != own:
        raise DataError(
            f"{spec.name} holds only split {own!r}, not {spec.split!r}", hint=f"pass hf:{spec.name}:{own}"
        )
    try:
        (instruction,) = datasets.ReadInstruction.from_spec(spec.split).to_absolute(
            {_split_base(spec.split): len(loaded)}
        )
    except (ValueError, AssertionError) as exc:
        raise DataError(
            f"cannot read split {spec.split!r} of {spec.name}", hint="e.g. train or train[:1000]"
        ) from exc
    return loaded.select(range(instruction.from_, instruction.to))


def _split_base(split: str) -> str:
    return split.split("[", 1)[0].strip()


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == ":" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts
