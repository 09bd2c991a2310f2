"""Reading training/evaluation text and writing output folders atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil


def load_text(data: str) -> str:
    """Text from a plain-text file, a JSON-lines file (a `"text"` field per line) or, where the `datasets`
    library is installed, a dataset name (its `"text"` column, train split). Raises on missing or empty data."""
    if os.path.isdir(data):
        raise ValueError(f"--data must be a file or a dataset name, got the folder {data!r}.")
    if os.path.isfile(data):
        if data.endswith((".jsonl", ".json")):
            texts = []
            with open(data, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{data}:{lineno} is not valid JSON ({err.msg}).") from None
                    if not isinstance(record, dict) or "text" not in record:
                        raise ValueError(f"{data}:{lineno} has no \"text\" field.")
                    texts.append(str(record["text"]))
            text = "\n\n".join(texts)
        else:
            with open(data, encoding="utf-8") as f:
                text = f.read()
    else:
        try:
            import datasets
        except ImportError:
            raise FileNotFoundError(
                f"Data file not found: {data!r} (dataset names need the `datasets` library installed)."
            ) from None
        try:
            dataset = datasets.load_dataset(data, split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot use this name"
            raise FileNotFoundError(f"Data file not found, and no dataset named {data!r} could be loaded: {err}")
        if "text" not in dataset.column_names:
            raise ValueError(f"Dataset {data!r} has no 'text' column (columns: {dataset.column_names}).")
        text = "\n\n".join(dataset["text"])
    if not text.strip():
        raise ValueError(f"The data in {data!r} is empty.")
    return text


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, is_main_process: bool = True):
    """Yield a temporary folder that becomes `path` only if the block succeeds; nothing is left half-written.

    Refuses an existing non-empty `path` unless `overwrite`. Only the main process writes and renames."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"Output folder {path!r} exists and is not empty; pass --overwrite to replace it.")
    partial = path.rstrip("/") + ".partial"
    if is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        if is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if is_main_process:
        if os.path.exists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(partial, path)
