"""Training data: tokenizers, packed fixed-length windows, and a resumable loader."""

from data.loader import build_dataloader
from data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "build_dataloader", "build_tokenizer"]
