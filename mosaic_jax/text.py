"""Captions -> token ids for FLUX's two text encoders, through transformers' tokenizers on local folders.

A FLUX checkpoint holds the CLIP tokenizer in `tokenizer/` (vocab.json + merges.txt, or tokenizer.json)
and the T5 tokenizer in `tokenizer_2/` (tokenizer.json; spiece.model alone also works when the
sentencepiece package is installed). Nothing is downloaded: the folders are read with
local_files_only, and a missing file is reported by name before transformers is asked.

Token ids are padded to a fixed length and truncated the way diffusers' FluxPipeline does it: CLIP to
77 tokens, T5 to 512 (FLUX.1-dev's max_sequence_length), both padding="max_length", truncation on, no
attention mask used downstream. Ids come back as int32 numpy arrays [B, max_length], ready for jit.

Without a checkpoint (the demo, flux_random) the tiny random text encoders read `ByteTokenizers`: the
caption's UTF-8 bytes as ids, a fixed function of the caption, which is all a conditioning signal
needs in a from-scratch model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import NamedTuple, Sequence

import numpy as np

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


class TokenizerFilesError(FileNotFoundError):
  """A tokenizer folder lacks a file it needs; the message names the folder and the file."""


def _require(folder: str, alternatives: Sequence[Sequence[str]], what: str) -> None:
  """Passes when every file of at least one alternative set is present; otherwise names what is missing."""
  if not os.path.isdir(folder):
    raise TokenizerFilesError(f"{folder}: no such folder (expected the {what} tokenizer files there).")
  for files in alternatives:
    if all(os.path.isfile(os.path.join(folder, f)) for f in files):
      return
  wanted = " or ".join(" + ".join(files) for files in alternatives)
  missing = sorted({f for files in alternatives for f in files if not os.path.isfile(os.path.join(folder, f))})
  raise TokenizerFilesError(f"{folder}: the {what} tokenizer needs {wanted}; missing: {', '.join(missing)}.")


def load_clip_tokenizer(folder: str):
  """transformers' CLIPTokenizer from a local `tokenizer/` folder."""
  from transformers import CLIPTokenizer
  folder = os.fspath(folder)
  _require(folder, [("tokenizer.json",), ("vocab.json", "merges.txt")], "CLIP")
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_t5_tokenizer(folder: str):
  """transformers' T5Tokenizer from a local `tokenizer_2/` folder."""
  from transformers import T5Tokenizer
  folder = os.fspath(folder)
  alternatives = [("tokenizer.json",)]
  # Converting spiece.model into a fast tokenizer needs sentencepiece (and protobuf).
  if importlib.util.find_spec("sentencepiece") is not None:
    alternatives.append(("spiece.model",))
  _require(folder, alternatives, "T5")
  return T5Tokenizer.from_pretrained(folder, local_files_only=True)


def token_ids(tokenizer, captions: str | Sequence[str], max_length: int) -> np.ndarray:
  """int32 [B, max_length] ids: special tokens added, truncated, padded to max_length."""
  if isinstance(captions, str):
    captions = [captions]
  encoded = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=False)
  return np.asarray(encoded["input_ids"], np.int32)


class FluxTokenizers(NamedTuple):
  """Both tokenizers of a FLUX checkpoint; `clip_ids` and `t5_ids` give what the encoders take."""
  clip: object
  t5: object
  t5_max_length: int = T5_MAX_LENGTH

  def clip_ids(self, captions) -> np.ndarray:
    return token_ids(self.clip, captions, CLIP_MAX_LENGTH)

  def t5_ids(self, captions) -> np.ndarray:
    return token_ids(self.t5, captions, self.t5_max_length)


def load_flux_tokenizers(root: str, t5_max_length: int = T5_MAX_LENGTH) -> FluxTokenizers:
  """Both tokenizers from a FLUX checkpoint root (`tokenizer/` and `tokenizer_2/`)."""
  root = os.fspath(root)
  return FluxTokenizers(load_clip_tokenizer(os.path.join(root, "tokenizer")),
                        load_t5_tokenizer(os.path.join(root, "tokenizer_2")), t5_max_length)


@dataclasses.dataclass(frozen=True)
class ByteTokenizers:
  """UTF-8 bytes -> ids in [1, vocab - 2], then the end token (vocab - 1), padded with 0."""
  vocab_size: int
  t5_max_length: int
  clip_max_length: int

  def _ids(self, captions, length: int) -> np.ndarray:
    out = np.zeros((len(captions), length), np.int32)
    for row, caption in enumerate(captions):
      ids = [1 + b % (self.vocab_size - 2) for b in str(caption).encode("utf-8")][:length - 1]
      out[row, :len(ids)] = ids
      out[row, len(ids)] = self.vocab_size - 1
    return out

  def t5_ids(self, captions) -> np.ndarray:
    return self._ids(captions, self.t5_max_length)

  def clip_ids(self, captions) -> np.ndarray:
    return self._ids(captions, self.clip_max_length)
