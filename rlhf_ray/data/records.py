"""Records from local JSONL or Parquet files: reading, field checks and chat rendering.

Two readers over the same files:

- :func:`read_records`: a Hugging Face ``datasets.Dataset`` (``Dataset.from_json`` /
  ``from_parquet``), the table the SFT and reward-model data are built from;
- :func:`iter_rows`: the records one by one with where each came from (``file:line`` for JSONL),
  for prompt files (:func:`read_prompts`, and PPO's ``rlhf_ray.data.prompts.load_prompt_texts``),
  whose errors name the line.

Chat rendering turns message lists into text with the tokenizer's chat template. Every problem
(missing, empty or unreadable file, an absent field, a malformed message list) raises
:class:`DataError` naming the file, the record and the flag to change.

Imports only the standard library at module level (``datasets`` and ``pyarrow`` when reading).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator


class DataError(ValueError):
    """A data file or record that cannot be used; the message says which and how to fix it."""


# --------------------------------------------------------------------------- reading files


def file_format(path: str, fmt: str = "auto", default: str | None = None) -> str:
    """"jsonl" or "parquet", from ``fmt`` or (auto) the file extension; an unknown extension is
    ``default``, or an error when that is None."""
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext in (".parquet", ".pq"):
        return "parquet"
    if default is not None:
        return default
    raise DataError(f"cannot tell the format of {path!r} from its extension; use .jsonl or .parquet, "
                    "or set --data.format jsonl|parquet.")


def _check_exists(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist; set {flag} to a .jsonl or .parquet file "
                        "(python -m rlhf_ray.data.demo_data --out DIR writes a demo set).")


def _is_empty(path: str, fmt: str) -> bool:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path!r} is not a readable Parquet file: {exc}") from None
    with open(path, "rb") as fh:
        return not any(line.strip() for line in fh)


def read_records(path: str, fmt: str = "auto", flag: str = "--data.train_path"):
    """A ``datasets.Dataset`` of the records in a JSONL or Parquet file (at least one)."""
    import datasets

    _check_exists(path, flag)
    fmt = file_format(path, fmt)
    if _is_empty(path, fmt):
        raise DataError(f"data file {path!r} holds no records; point {flag} at a non-empty file.")
    datasets.disable_progress_bars()
    try:
        if fmt == "parquet":
            return datasets.Dataset.from_parquet(path, keep_in_memory=True)
        return datasets.Dataset.from_json(path, keep_in_memory=True)
    except Exception as exc:  # datasets wraps parse errors in its own types; name the file instead
        cause = exc.__cause__ or exc
        raise DataError(f"cannot read {path!r} as {fmt}: {type(cause).__name__}: {cause}") from None


def iter_rows(path: str, fmt: str, blank_lines: list[int] | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of every record of an existing JSONL or Parquet file, in file order.

    ``where`` names the record in messages: ``path:line`` for JSONL (1-based line; read lazily,
    so an error names the first bad line) and ``path record i`` for Parquet (0-based row). A
    record is whatever the line holds, not necessarily an object. Blank (or all-whitespace)
    JSONL lines hold no record and are skipped; their line numbers are appended to
    ``blank_lines`` when given, so the caller can say how many there were."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path!r} is not a readable Parquet file: {exc}") from None
        for i, row in enumerate(rows):
            yield f"{path} record {i}", row
        return
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                if blank_lines is not None:
                    blank_lines.append(line_no)
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # without its newline the column is on this line
            except json.JSONDecodeError as exc:
                # One position: the file's line and the decoder's column on it (its own "line 1" is
                # this line, since each line is decoded alone).
                raise DataError(f"{path}:{line_no}:{exc.colno} is not valid JSON ({exc.msg}); each line must be "
                                "one JSON object, e.g. {\"prompt\": \"...\"}.") from None
            yield f"{path}:{line_no}", record


def require_fields(ds, fields: dict[str, str], path: str) -> None:
    """Every field (flag -> column) is a column and no record leaves it empty."""
    for flag, name in fields.items():
        if name not in ds.column_names:
            raise DataError(f"{path!r} has no field {name!r} (columns: {ds.column_names}); set {flag} to the "
                            "field that holds it.")
        for i, value in enumerate(ds[name]):
            if value is None:
                raise DataError(f"{path!r} record {i} has no value for field {name!r} ({flag}).")


# --------------------------------------------------------------------------- prompts


def prompt_texts(rows: Iterable[tuple[str, Any]], prompt_field: str = "prompt", template: str = "plain",
                 tokenizer=None) -> list[str]:
    """The prompt of each ``(where, record)`` (from :func:`iter_rows`): the record's
    ``prompt_field`` as text (numbers become text; null, true/false, lists and objects are
    errors) or, for ``template="chat"``, a user message or message list rendered as a chat prompt
    that ends with the assistant's turn opening."""
    if template == "chat":
        check_template(tokenizer)
    texts = []
    for where, record in rows:
        if not isinstance(record, dict) or prompt_field not in record:
            raise DataError(f"{where} has no field {prompt_field!r}; set --data.prompt_field "
                            "to the field that holds the prompt.")
        value = record[prompt_field]
        if value is None or (template != "chat" and isinstance(value, (bool, list, dict))):
            raise DataError(f"{where}: field {prompt_field!r} is {json.dumps(value, default=str)}, not text; "
                            "fix or remove the record.")
        if template == "chat":
            texts.append(tokenizer.apply_chat_template(as_messages(value, where, prompt_field), tokenize=False,
                                                       add_generation_prompt=True))
        else:
            texts.append(str(value))
    return texts


def read_prompts(path: str, prompt_field: str = "prompt", fmt: str = "auto", template: str = "plain",
                 tokenizer=None, flag: str = "--data.prompts") -> list[str]:
    """Prompt texts from a JSONL or Parquet file (at least one), per :func:`prompt_texts`."""
    _check_exists(path, flag)
    texts = prompt_texts(iter_rows(path, file_format(path, fmt)), prompt_field, template, tokenizer)
    if not texts:
        raise DataError(f"data file {path!r} holds no records; point {flag} at a non-empty file.")
    return texts


# --------------------------------------------------------------------------- chat rendering


def as_messages(value: Any, where: str, name: str) -> list[dict]:
    """A message list from a field: a list of {role, content}, or a string (one user turn).
    ``where`` names the record in the error (e.g. ``'data.jsonl' record 3``)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise DataError(f"{where}: field {name!r} must be a list of {{role, content}} messages "
                        f"for --data.template chat, got {str(value)[:80]!r}.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_template(tokenizer) -> None:
    """The tokenizer can render chats (``--data.template chat``)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("--data.template chat needs a tokenizer with a chat template, and this model's has "
                        "none; use --data.template plain or add chat_template to tokenizer_config.json.")


def render_chat(tokenizer, messages: list[dict], path: str, index: int) -> tuple[str, str]:
    """(prompt text, response text) of a conversation whose last turn is the assistant's.

    The prompt is the template applied to every turn but the last with the generation prompt
    (what a policy sees at generation time); the response is the rest of the full rendering,
    including whatever closes the assistant turn."""
    check_template(tokenizer)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{path!r} record {index}: the conversation must end with an assistant message "
                        "(the response to learn or score).")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{path!r} record {index}: the chat template does not render the prompt as a prefix "
                        "of the conversation, so the response tokens cannot be located.")
    return prompt, full[len(prompt):]
