"""Tokenizers behind one small interface, and the recipe string that picks one."""

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    ``name`` identifies the vocabulary, so caches and resume checks can tell two
    tokenizers apart without comparing objects.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus EOS = 256: needs no file, covers any text."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Drops EOS; a byte sequence cut mid-character decodes to U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


COMMON_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json``, read with the ``tokenizers`` library."""

    def __init__(self, path: str | Path, eos_token: str = ""):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as e:
            raise ImportError(
                f"loading {path} needs the 'tokenizers' library: pip install tokenizers "
                '(or use tokenizer = "bytes", which needs nothing)'
            ) from e
        self.path = Path(path)
        try:
            self._tok = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises a bare Exception for bad JSON and for a non-tokenizer alike
            raise ValueError(
                f"{self.path}: not a readable Hugging Face tokenizer.json ({err}); use the tokenizer.json "
                "that came with the model (as saved by tokenizers or transformers)"
            ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos_id(eos_token)
        self.name = f"hf:{self.path.resolve()}:eos={self.eos_id}"

    def _find_eos_id(self, eos_token: str) -> int:
        candidates = (eos_token,) if eos_token else COMMON_EOS_TOKENS
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"{self.path}: no end-of-sequence token found (looked for {', '.join(candidates)}); "
            "set model.eos_token (--eos_token for scripts.pretokenize) to the tokenizer's end-of-sequence token"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def build_tokenizer(spec: str, eos_token: str = "") -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json`` file, or a folder holding one.

    ``eos_token`` names a tokenizer.json's end-of-sequence token; empty looks for the common ones.
    """
    if spec == "bytes":
        if eos_token:
            raise ValueError(
                f"eos_token {eos_token!r} is for a tokenizer.json; the bytes tokenizer's EOS is always id 256, "
                "so leave model.eos_token empty"
            )
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json", eos_token)
    if path.is_file() and path.name.endswith(".json"):
        return HFTokenizer(path, eos_token)
    raise ValueError(
        f'tokenizer {spec!r}: expected "bytes", a path to a Hugging Face tokenizer.json, '
        "or a folder containing tokenizer.json"
    )
