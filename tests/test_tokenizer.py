"""Tokenizers from local directories: sentencepiece (LLaMA-2 / Vicuna, Gemma) and
tokenizer.json (LLaMA-3 style), each family's BOS / EOS / pad rules. Everything is trained
here on a few lines of text; nothing is downloaded."""

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenpacker_jax.tokenizer import load_tokenizer

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a mat.",
    "Visual tokens are packed into fewer tokens by the projector.",
] * 10
TEXT = "the cat jumps over a curious fox"


def train_sentencepiece(vocab_size=300, **ids) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2, **ids)
    return model.getvalue()


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory):
    """A Vicuna-style directory: tokenizer.model + tokenizer_config.json, no tokenizer.json."""
    path = tmp_path_factory.mktemp("vicuna_tokenizer")
    (path / "tokenizer.model").write_bytes(train_sentencepiece(unk_id=0, bos_id=1, eos_id=2,
                                                               pad_id=-1))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "legacy": False}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2}))
    return path


def test_llama2_sentencepiece_pads_with_unk(vicuna_dir):
    tok = load_tokenizer(vicuna_dir)
    assert tok.family == "llama"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 0, (2,))
    assert tok.vocab_size == 300
    sp = spm.SentencePieceProcessor(model_file=str(vicuna_dir / "tokenizer.model"))
    assert tok.encode(TEXT) == [1] + sp.encode(TEXT)
    assert tok.encode(TEXT, add_bos=False) == sp.encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT

    ids, mask = tok.pad_batch([tok.encode("the cat"), tok.encode(TEXT)])
    short = len(tok.encode("the cat"))
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, len(tok.encode(TEXT)))
    assert (ids[0, :-short] == 0).all() and mask[0, :-short].sum() == 0  # left: unk id 0
    assert ids[0, -short] == 1 and mask[0, -short:].all() and mask[1].all()
    right, right_mask = tok.pad_batch([tok.encode("the cat")], length=short + 3,
                                      side="right")
    assert right_mask.tolist() == [[1] * short + [0] * 3]
    assert right[0, 0] == 1 and (right[0, short:] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        tok.pad_batch([tok.encode(TEXT)], length=3)


def test_gemma_sentencepiece_conventions(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece(
        vocab_size=320, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "bos_token": "<bos>",
        "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path)  # no config.json: the family comes from the vocabulary
    assert tok.family == "gemma"
    end_of_turn = tok.hf.convert_tokens_to_ids("<end_of_turn>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.stop_ids == (1, end_of_turn)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "<start_of_turn>user " + TEXT + "<end_of_turn>"
    assert tok.encode(text) == [2] + sp.encode(text)
    assert tok.encode(text)[1] == tok.hf.convert_tokens_to_ids("<start_of_turn>")
    ids, mask = tok.pad_batch([[2, 7], [2, 7, 8, 9]])
    assert ids.tolist() == [[0, 0, 2, 7], [2, 7, 8, 9]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_llama3_tokenizer_json_pads_with_eos(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0, "eos_token_id": [1, 2]}))
    tok = load_tokenizer(tmp_path, family="llama")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == 1  # neither pad nor unk: EOS
    assert tok.stop_ids == (1, 2)
    assert tok.encode(TEXT) == [0] + backend.encode(TEXT).ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(tok.encode(TEXT), skip_special_tokens=False).startswith(
        "<|begin_of_text|>")


def test_unknown_family_is_an_error(vicuna_dir):
    with pytest.raises(ValueError, match="tokenizer family"):
        load_tokenizer(vicuna_dir, family="mistral")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(vicuna_dir / "missing")
