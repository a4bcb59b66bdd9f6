"""Supervised fine-tuning records: read from JSONL files and checked, or generated (the demo set).

A record is one JSON object per line (`llm.data.sft` describes the two formats and the template). Everything about
a record that can be wrong is refused here, as a `ConfigError` naming the file and its line and, where one is at
fault, the field: bad JSON or JSON nested too deeply to read, a key given twice in one object, both formats in one
record, a missing field or one of the wrong type, an unknown role, and a lone surrogate escape ("\\ud800", valid
JSON but no character). What only the tokenizer can refuse (a content that holds a special token) is refused when
the record is rendered, with the `SFTRecord`'s file, line and field.

Files are read line by line and split at "\\n" only (a JSON string may hold U+2028 and other characters that
`str.splitlines` takes for line breaks); a BOM at the start of a file is skipped. A line may hold at most
`max_record_bytes(data.seq_len)` bytes, 64 per token of a window and at least 1 MiB: no tokenizer makes a token of
64 bytes of JSON, so a longer record would lose most of itself to the cut at `data.seq_len + 1` tokens. It is
refused before the rest of it is read, so one record costs bounded memory (a 50 MB line: a peak of about the cap).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from llm.data.sources import SourceFile, open_regular, resolve_files
from llm.errors import ConfigError, shorten, show

ROLES = ("system", "user", "assistant")
Message = tuple[str, str]  # (role, content)

# A record (one JSONL line) may hold this many bytes per token of a window, and at least MIN_RECORD_BYTES
# (`max_record_bytes`): what bounds the memory one record can take.
BYTES_PER_TOKEN = 64
MIN_RECORD_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------------------------------- records
class SFTRecord(NamedTuple):
    """A record's messages, where it was read ("file:line") and the field each message's content came from
    ("prompt", "messages[2].content", ...), for the one-line errors of what only the tokenizer can refuse."""

    messages: list[Message]
    where: str
    fields: tuple[str, ...]


def max_record_bytes(seq_len: int) -> int:
    """The longest JSONL line (one record) read for windows of `seq_len` inputs: `BYTES_PER_TOKEN` bytes per token
    of a window, at least `MIN_RECORD_BYTES`. No tokenizer makes a token of 64 bytes of JSON, so a longer record
    would lose most of itself to the cut at `seq_len + 1` tokens; it is refused instead of being read whole."""
    return max(MIN_RECORD_BYTES, BYTES_PER_TOKEN * (seq_len + 1))


def _describe(value: Any) -> str:
    """A value for a message: scalars quoted (shortened), containers by type (a repr could nest without end)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return show(value)
    return f"a JSON {'array' if isinstance(value, list) else 'object' if isinstance(value, dict) else 'value'}"


def _check_text(text: str, where: str, field: str) -> str:
    """`text` if it is Unicode text; a lone surrogate escape ("\\ud800", valid JSON but no character) is refused."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ConfigError(f"data.path: {where}: {field} holds a lone surrogate {ascii(bad.group())} at character "
                          f"{bad.start()}, which is not a character; fix the escape (a pair encodes one character)")
    return text


def parse_located_record(obj: Any, where: str) -> SFTRecord:
    """A record (one parsed JSON line) checked, with ``where`` ("file:line") and its fields; see the module
    docstring for what is refused."""
    if not isinstance(obj, dict):
        raise ConfigError(f"data.path: {where}: expected a JSON object, got {_describe(obj)}")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise ConfigError(f"data.path: {where}: the record has both 'messages' and 'prompt'/'response'; "
                              "keep one format per record")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"data.path: {where}: 'messages' must be a non-empty list, got {_describe(messages)}")
        out, fields = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ConfigError(f"data.path: {where}: messages[{i}] must be an object with 'role' and 'content', "
                                  f"got {_describe(message)}")
            role = message.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise ConfigError(f"data.path: {where}: messages[{i}] needs a role in {ROLES}, got {_describe(role)}")
            field = f"messages[{i}].content"
            content = message.get("content")
            if not isinstance(content, str):
                raise ConfigError(f"data.path: {where}: messages[{i}] needs a string 'content', got "
                                  f"{_describe(content)}")
            out.append((role, _check_text(content, where, field)))
            fields.append(field)
        if not any(role == "assistant" for role, _ in out):
            raise ConfigError(f"data.path: {where}: the messages have no assistant turn to learn")
        return SFTRecord(out, where, tuple(fields))
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise ConfigError(f"data.path: {where}: {key!r} must be a string, got {_describe(obj.get(key))}")
            _check_text(obj[key], where, key)
        return SFTRecord([("user", obj["prompt"]), ("assistant", obj["response"])], where, ("prompt", "response"))
    keys = shorten(", ".join(sorted(map(str, obj))))
    raise ConfigError(f"data.path: {where}: expected 'prompt' and 'response', or 'messages'; found keys: {keys}")


def parse_record(obj: Any, where: str) -> list[Message]:
    """A record's messages; ``where`` ("file:line") prefixes the one-line error of a malformed record."""
    return parse_located_record(obj, where).messages


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object (its argument)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members; a key given twice is refused (json.loads would keep the last one silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _load_line(line: bytes, where: str) -> Any:
    """One JSONL line as a Python value; every way it can fail is one line naming ``where``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.path: {where}: not UTF-8 text (bad byte at column {exc.start + 1})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ConfigError(f"data.path: {where}: key {show(exc.args[0])} appears twice in one object") from None
    except RecursionError:  # the C scanner recurses once per nesting level
        raise ConfigError(f"data.path: {where}: the JSON is nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError, and integers of more digits than Python converts
        raise ConfigError(f"data.path: {where}: not valid JSON ({exc.args[0] if exc.args else exc})") from None


def _lines(source: SourceFile, max_file_bytes: int, max_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line of a JSONL file, read one line at a time; a line longer than
    ``max_line`` bytes is refused before the rest of it is read."""
    with open_regular(source.path, "data.path", max_file_bytes) as f:
        number, read = 0, 0
        while True:
            try:
                line = f.readline(max_line + 1)
            except OSError as exc:
                raise ConfigError(f"data.path: cannot read {source.path!r}: {exc.strerror or exc}") from None
            if not line:
                return
            number += 1
            read += len(line)
            if max_file_bytes and read > max_file_bytes:
                raise ConfigError(f"data.path: {source.path!r} grew past data.max_file_bytes={max_file_bytes} "
                                  "while it was read; split it, or raise data.max_file_bytes (0 = no cap)")
            if len(line) > max_line:
                raise ConfigError(
                    f"data.path: {source.path}:{number}: the record is longer than {max_line} bytes, the cap for "
                    f"data.seq_len windows ({BYTES_PER_TOKEN} bytes per token, at least {MIN_RECORD_BYTES}); "
                    "most of it would be cut away: split or shorten it, or raise data.seq_len"
                )
            if number == 1 and line.startswith(_BOM):  # files saved by some Windows editors begin with one
                line = line[len(_BOM):]
            if line.strip():
                yield number, line


def read_located_records(path: str, max_file_bytes: int = 0,
                         max_line: int = MIN_RECORD_BYTES) -> list[SFTRecord]:
    """Every record of the JSONL file(s) ``path`` names (file, directory or glob), in file and line order, with
    where each was read. Lines are split at "\\n" only (a JSON string may hold U+2028 and other line breaks)."""
    records = []
    for source in resolve_files(path, max_file_bytes=max_file_bytes):
        for number, line in _lines(source, max_file_bytes, max_line):
            where = f"{source.path}:{number}"
            records.append(parse_located_record(_load_line(line, where), where))
    if not records:
        raise ConfigError(f"data.path: {path!r} holds no records")
    return records


def read_records(path: str, max_file_bytes: int = 0, max_line: int = MIN_RECORD_BYTES) -> list[list[Message]]:
    """The messages of every record of ``path`` (see `read_located_records`)."""
    return [record.messages for record in read_located_records(path, max_file_bytes, max_line)]


# ------------------------------------------------------------------------------------------------- demo set
_WORDS = (
    "apple", "river", "stone", "cloud", "garden", "planet", "silver", "window", "forest", "candle", "bridge",
    "rocket", "pencil", "orange", "winter", "summer", "dragon", "castle", "butter", "mirror", "thunder", "island",
    "market", "coffee", "basket", "meadow", "violin", "harbor", "tiger", "lemon", "spring", "shadow", "feather",
    "copper", "anchor", "valley", "puzzle", "marble", "breeze", "lantern", "cactus", "rabbit", "honey", "falcon",
    "ocean", "cherry", "jungle", "velvet", "quiet", "bright",
)
_SYSTEM = "You answer with the exact result and nothing else."


def _demo_task(rng: random.Random) -> tuple[str, str]:
    """One instruction and its exact answer."""
    kind = rng.randrange(6)
    a, b = rng.randrange(100), rng.randrange(100)
    word = rng.choice(_WORDS)
    if kind == 0:
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        return f"What is {max(a, b)} - {min(a, b)}?", str(max(a, b) - min(a, b))
    if kind == 2:
        return f"What is {a % 10} * {b}?", str((a % 10) * b)
    if kind == 3:
        return f"Reverse the word '{word}'.", word[::-1]
    if kind == 4:
        words = f"{word} {rng.choice(_WORDS)}"
        return f"Write '{words}' in capital letters.", words.upper()
    return f"Sort the letters of '{word}'.", "".join(sorted(word))


def demo_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded instruction records in both formats (prompt/response, and chats, some with a system turn)."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for _ in range(n):
        prompt, answer = _demo_task(rng)
        style = rng.randrange(3)
        if style == 0:
            records.append({"prompt": prompt, "response": answer})
        else:
            messages = [{"role": "system", "content": _SYSTEM}] if style == 2 else []
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            records.append({"messages": messages})
    return records
