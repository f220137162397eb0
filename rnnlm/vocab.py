"""Character vocabulary with the chapter's exact semantics.

Index 0 is ``<unk>``, then any reserved tokens, then tokens by descending frequency; ties keep
first-seen order (a stable sort); tokens rarer than ``min_freq`` are dropped and map to 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

UNK = "<unk>"


class Vocab:
    def __init__(self, idx_to_token: Sequence[str]) -> None:
        if not idx_to_token or idx_to_token[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r}")
        self.idx_to_token: list[str] = list(idx_to_token)
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.idx_to_token)}

    @classmethod
    def build(
        cls, tokens: Iterable[str], min_freq: int = 0, reserved_tokens: Sequence[str] = ()
    ) -> Vocab:
        counts = Counter(tokens)  # insertion-ordered: first-seen order breaks ties
        by_freq = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
        idx_to_token = [UNK, *reserved_tokens]
        seen = set(idx_to_token)
        for token, freq in by_freq:
            if freq < min_freq:
                break
            if token not in seen:
                idx_to_token.append(token)
                seen.add(token)
        return cls(idx_to_token)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.token_to_idx.get(t, 0) for t in tokens]

    def decode(self, indices: Iterable[int]) -> str:
        return "".join(self.idx_to_token[i] for i in indices)

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` the vocabulary lacks, each once, in order of appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.token_to_idx))

    def to_json(self) -> str:
        return json.dumps({"idx_to_token": self.idx_to_token}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        return cls(json.loads(text)["idx_to_token"])

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls.from_json(path.read_text(encoding="utf-8"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.idx_to_token == other.idx_to_token

    def __hash__(self) -> int:
        return hash(tuple(self.idx_to_token))
