"""Where a document may be cut so that its tokens do not depend on where it was cut.

Readers hand a long document over in pieces (`--chunk-bytes`), and slices (`--num-shards`) cut a large text file
in the middle; the tokenizer encodes each piece on its own. A BPE tokenizer's ids then depend on the cuts: a cut
after a space turns " word" into " " + "word", a cut between two newlines turns "\\n\\n" into two tokens. So before
encoding, `recut` joins a document's pieces again and cuts it only at *safe points*, where encoding the two sides
apart gives exactly the ids of encoding them together, or at *forced cuts* that depend on the text alone:

- A safe point is just after a single newline between two printable ASCII characters (`x\\ny` -> `x\\n|y`). For the
  pre-tokenizer regexes of GPT-2 (our trained BPE), Llama 3 / GPT-4 (cl100k) and Qwen2, a pre-token ends there in
  the whole text, the text before it pre-tokenizes the same alone (no rule looks past the newline), and the text
  after it starts a pre-token; BPE merges only inside pre-tokens. `cut_rule` accepts a tokenizer only when its
  configuration is one of these (normalizers that act per character allowed, no added token holding a newline);
  any other tokenizer (SentencePiece's Metaspace prepends "▁" to every piece, for one) has no safe points.
- A stretch longer than `FORCED_CUT_BYTES` without a safe point (minified code, a CRLF file, paragraphs only
  separated by blank lines, or every document of a tokenizer without safe points) is cut `FORCED_CUT_BYTES` after
  the previous safe point or forced cut, at the last newline, else space, else character boundary before it
  (`readers.cut_point`). Where that falls is a function of the text, so it is the same for every chunk size and
  every slicing; the ids there may differ from encoding the stretch whole, which memory does not allow.

Slices cut a text file at a safe point too (`align_cut`), or, for a tokenizer without safe points, only between
files. The byte tokenizer's ids are the bytes, so it is never re-cut.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from enum import Enum

from llm.data.readers import Piece, cut_point
from llm.data.sources import SourceFile, open_regular
from llm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

FORCED_CUT_BYTES = 8 << 20  # a stretch without a safe point is cut after this many bytes (memory bound of recut)
_SAFE = re.compile(rb"[\x21-\x7e]\n(?=[\x21-\x7e])")  # a safe point is the end of a match
_SCAN = 1 << 20

# Pre-tokenizer regexes for which `x\ny` -> `x\n|y` is a safe point (see the module docstring).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = CL100K_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
_SAFE_PATTERNS = {GPT2_PATTERN, CL100K_PATTERN, QWEN2_PATTERN}
_PER_CHARACTER_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


class CutRule(Enum):
    ANYWHERE = "anywhere"  # the byte tokenizer: a piece's ids are its bytes
    SAFE_POINTS = "safe points"  # at safe points, and forced cuts
    FORCED_ONLY = "forced only"  # a tokenizer with no safe point: only forced cuts (and documents' ends)


def _normalizer_ok(spec: dict | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_normalizer_ok(n) for n in spec.get("normalizers", []))
    return spec.get("type") in _PER_CHARACTER_NORMALIZERS


def _pre_tokenizer_ok(spec: dict | None) -> bool:
    if not isinstance(spec, dict):
        return False
    kind = spec.get("type")
    if kind == "ByteLevel":
        return spec.get("add_prefix_space") is False and spec.get("use_regex") is True
    if kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer"):
        return True  # they split at every whitespace: the newline is never inside a pre-token
    if kind != "Sequence":
        return False
    steps = spec.get("pretokenizers", [])
    split = [s for s in steps if s.get("type") == "Split"]
    rest = [s for s in steps if s.get("type") != "Split"]
    if len(split) != 1 or steps[0] is not split[0]:
        return _all_split_at_whitespace(steps)
    s = split[0]
    regex = s.get("pattern", {}).get("Regex")
    return (regex in _SAFE_PATTERNS and s.get("behavior") == "Isolated" and s.get("invert") is False
            and all(r.get("type") == "ByteLevel" and r.get("add_prefix_space") is False
                    and r.get("use_regex") is False for r in rest))


def _all_split_at_whitespace(steps: list[dict]) -> bool:
    return bool(steps) and all(_pre_tokenizer_ok(s) and s.get("type") != "Sequence" for s in steps)


def cut_rule(tokenizer: Tokenizer) -> CutRule:
    """How documents may be cut for `tokenizer` without changing its ids (see the module docstring)."""
    if isinstance(tokenizer, ByteTokenizer):
        return CutRule.ANYWHERE
    assert isinstance(tokenizer, HFTokenizer)
    spec = json.loads(tokenizer.tok.to_str())
    added = spec.get("added_tokens") or []
    if (_normalizer_ok(spec.get("normalizer")) and _pre_tokenizer_ok(spec.get("pre_tokenizer"))
            and not any("\n" in str(t.get("content", "")) for t in added)):
        return CutRule.SAFE_POINTS
    return CutRule.FORCED_ONLY


def recut(pieces: Iterable[Piece], rule: CutRule, limit: int | None = None) -> Iterator[Piece]:
    """`pieces` with each document's text cut again, only at safe points (when `rule` has them) and at forced
    cuts, so that how the input was cut does not show in the ids (see the module docstring). Holds at most about
    `limit` bytes plus one input piece."""
    if rule is CutRule.ANYWHERE:
        yield from pieces
        return
    limit = FORCED_CUT_BYTES if limit is None else limit
    try:
        yield from _recut(iter(pieces), rule, limit)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:  # a reader's generator: closes its file now, not when it is collected
            close()


def _recut(pieces: Iterator[Piece], rule: CutRule, limit: int) -> Iterator[Piece]:
    buf = bytearray()  # the open document's text from the last emitted cut on
    anchor = 0  # the last safe point or forced cut in `buf`
    forced: list[int] = []  # forced cuts in `buf`, which every output must cut at

    def advance() -> None:
        """Move `anchor` over `buf`: to the last safe point within `limit` bytes, repeatedly; where there is none
        and `limit` bytes are there, a forced cut. Each round moves `limit` bytes on in two steps at most."""
        nonlocal anchor
        while True:
            at = _last_safe(buf, anchor, anchor + limit) if rule is CutRule.SAFE_POINTS else -1
            if at > 0:
                anchor = at
            elif len(buf) - anchor > limit:
                anchor += cut_point(bytes(buf[anchor: anchor + limit]))
                forced.append(anchor)
            else:
                return

    def emit(upto: int, end: bool) -> list[Piece]:
        nonlocal anchor
        out, start = [], 0
        with memoryview(buf) as view:  # one copy per piece; released before `buf` shrinks
            for at in [f for f in forced if f < upto] + [upto]:
                if at > start or (end and at == upto):
                    out.append(Piece(bytes(view[start:at]), end and at == upto))
                start = at
        del buf[:upto]
        forced[:] = [f - upto for f in forced if f > upto]
        anchor -= upto
        return out

    for piece in pieces:
        buf += piece.data
        advance()
        if piece.end:
            yield from emit(len(buf), True)
            anchor = 0
        elif anchor:
            yield from emit(anchor, False)
    if buf:  # a slice that stops inside its last document: another slice continues it
        yield from emit(len(buf), False)


def _last_safe(buf: bytearray, after: int, upto: int) -> int:
    """The last safe point `s` of `buf` with `after < s <= upto` (-1: none), searched from the end: the common
    case costs one `rfind`, not a regex match per line."""
    hi = min(upto, len(buf) - 1)  # the newline's index is s - 1; the character after it must be there
    while True:
        n = buf.rfind(b"\n", max(after, 1), hi)
        if n < 0:
            return -1
        if 0x21 <= buf[n - 1] <= 0x7E and 0x21 <= buf[n + 1] <= 0x7E:
            return n + 1
        hi = n


def align_cut(file: SourceFile, offset: int, rule: CutRule) -> int:
    """Where a slice boundary proposed at `offset` inside text `file` goes: unchanged for bytes (the reader rounds
    it to a line start), the first safe point at or after it, or the end of the file when there is none or the
    tokenizer has none (the file then belongs to one slice)."""
    if rule is CutRule.ANYWHERE or offset <= 0 or offset >= file.size:
        return offset
    if rule is CutRule.FORCED_ONLY:
        return file.size
    with open_regular(file.path, "SOURCE") as f:
        start = max(0, offset - 2)
        f.seek(start)
        tail = b""
        while block := f.read(_SCAN):
            data = tail + block
            for match in _SAFE.finditer(data):
                at = start - len(tail) + match.end()
                if at >= offset:
                    return at
            tail = data[-2:]
            start += len(block)
    return file.size
