"""Tokenizers of a FLUX checkpoint layout, built here from tiny locally trained vocabularies and saved in
the real file formats (CLIP: vocab.json + merges.txt; T5: tokenizer.json), read back through our loaders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mosaic_jax import text

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CORPUS = ["a photo of a cat wearing a red hat", "the dog plays the guitar on the beach",
          "a cat and a dog sit together on a red sofa"] * 4
CAPTIONS = ["a photo of a cat", "the dog plays the guitar on a red sofa"]


def write_clip_tokenizer(folder):
  """Byte-level BPE with CLIP's `</w>` end-of-word suffix, written as vocab.json + merges.txt."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  clip_like = transformers.CLIPTokenizer()  # only for its normalizer and pre-tokenizer (no files)
  bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
  bpe.normalizer = clip_like.backend_tokenizer.normalizer
  bpe.pre_tokenizer = clip_like.backend_tokenizer.pre_tokenizer
  bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
      show_progress=False))
  merges = json.loads(bpe.to_str())["model"]["merges"]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  # CLIP's layout: bytes, bytes + "</w>", merged pieces in merge order, then the two specials last.
  vocab = {}
  for piece in (alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges]
                + ["<|startoftext|>", "<|endoftext|>"]):
    vocab.setdefault(piece, len(vocab))
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>"}
  (folder / "special_tokens_map.json").write_text(json.dumps(specials))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}))
  return vocab


def write_t5_tokenizer(folder):
  """A Unigram tokenizer with T5's pipeline (Metaspace, `</s>` appended), written as tokenizer.json."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  unigram = Tokenizer(models.Unigram())
  unigram.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
  unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  unigram.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  unigram.train_from_iterator(CORPUS, trainers.UnigramTrainer(
      vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
  unigram.post_processor = processors.TemplateProcessing(
      single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
  folder.mkdir(parents=True)
  unigram.save(str(folder / "tokenizer.json"))
  specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
  (folder / "special_tokens_map.json").write_text(json.dumps(specials))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, **specials}))


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("flux_ckpt")
  write_clip_tokenizer(root / "tokenizer")
  write_t5_tokenizer(root / "tokenizer_2")
  return root


@pytest.fixture(scope="module")
def flux_tokenizers(flux_root):
  return text.load_flux_tokenizers(str(flux_root))


def test_clip_round_trip(flux_tokenizers):
  ids = flux_tokenizers.clip_ids(CAPTIONS + ["A Photo of a CAT", ""])
  assert ids.shape == (4, text.CLIP_MAX_LENGTH) and ids.dtype == np.int32
  tok = flux_tokenizers.clip
  bos, eos = tok.bos_token_id, tok.eos_token_id
  assert (ids[:, 0] == bos).all()
  for row, caption in zip(ids, CAPTIONS + ["a photo of a cat", ""]):
    assert tok.decode(row, skip_special_tokens=True) == caption
  np.testing.assert_array_equal(ids[0], ids[2])  # CLIP lower-cases
  assert (ids[3, 1:] == eos).all()  # the empty caption of dropout: bos, eos, eos padding
  # FLUX's pooled output reads the first eos: it must directly follow the caption's tokens.
  assert ids[0, len(tok.tokenize(CAPTIONS[0])) + 1] == eos


def test_t5_round_trip(flux_tokenizers):
  ids = flux_tokenizers.t5_ids(CAPTIONS + [""])
  assert ids.shape == (3, text.T5_MAX_LENGTH) and ids.dtype == np.int32
  tok = flux_tokenizers.t5
  for row, caption in zip(ids, CAPTIONS + [""]):
    assert tok.decode(row, skip_special_tokens=True) == caption
    length = int((row != tok.pad_token_id).sum())
    assert row[length - 1] == tok.eos_token_id and (row[length:] == tok.pad_token_id).all()
  np.testing.assert_array_equal(ids[2, :2], [tok.eos_token_id, tok.pad_token_id])


def test_truncation_keeps_the_end_token(flux_tokenizers):
  long_caption = " ".join(CORPUS)
  clip_ids = text.token_ids(flux_tokenizers.clip, long_caption, 16)
  t5_ids = text.token_ids(flux_tokenizers.t5, long_caption, 16)
  assert clip_ids.shape == t5_ids.shape == (1, 16)
  assert clip_ids[0, -1] == flux_tokenizers.clip.eos_token_id
  assert t5_ids[0, -1] == flux_tokenizers.t5.eos_token_id


def test_missing_files_are_named(flux_root, tmp_path):
  clip_dir = tmp_path / "tokenizer"
  shutil.copytree(flux_root / "tokenizer", clip_dir)
  (clip_dir / "merges.txt").unlink()
  with pytest.raises(text.TokenizerFilesError, match="missing: merges.txt"):
    text.load_clip_tokenizer(str(clip_dir))
  t5_dir = tmp_path / "tokenizer_2"
  shutil.copytree(flux_root / "tokenizer_2", t5_dir)
  (t5_dir / "tokenizer.json").unlink()
  with pytest.raises(text.TokenizerFilesError, match="tokenizer.json"):
    text.load_t5_tokenizer(str(t5_dir))
  with pytest.raises(text.TokenizerFilesError, match="no such folder"):
    text.load_flux_tokenizers(str(tmp_path / "nowhere"))
