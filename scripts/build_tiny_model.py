"""Build a tiny, deterministic Llama model and tokenizer for local vLLM tests.

No model hub is reachable from test machines, and a real model would be far too
slow on CPU. This script creates a randomly initialised two-layer
``LlamaForCausalLM`` and a small byte-level BPE tokenizer trained on fixed
built-in text, with bos/eos tokens and a chat template, and saves both with
``save_pretrained`` into one folder that vLLM can serve. Everything is seeded,
so every run produces the same weights and vocabulary.

The output is gibberish; it exists to exercise the serving API, token
accounting and streaming, not to produce meaningful text.

Usage: python build_tiny_model.py OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import random
import string
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

SEED = 1234
VOCAB_SIZE = 512
# vLLM's CPU attention kernel only supports certain head sizes (32, 64, 80, ...).
HEAD_DIM = 64
NUM_HEADS = 2
HIDDEN_SIZE = HEAD_DIM * NUM_HEADS
# Small enough that a request with a huge max_tokens is rejected with HTTP 400.
MAX_POSITIONS = 512

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
PAD = "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Printable ASCII, space, tab and newline (no \r, \v, \f).
TEXT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \t\n"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """
The inference gateway sits in front of a language model server and speaks the
OpenAI compatible API. Every request is authenticated with an API key, routed to
an upstream model, and the prompt tokens and completion tokens are metered into
a database so that usage can be billed per tenant and per model.
Hello! How are you today? I am fine, thank you. What can I help you with?
Please summarise the following text in one sentence. Translate this to French.
Write a short poem about the sea, the wind and the stars at night.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 3.14 2025.
Streaming responses are sent as server sent events, one chunk per line, and the
stream ends with a final data line that says done. Usage statistics may be
included in the last chunk when the client asks for them.
system user assistant tool function content role message messages model
"""


def seed_everything(seed: int) -> None:
    """Seed every random number generator that model/tokenizer building touches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on the built-in corpus.

    The base alphabet is limited to printable ASCII plus tab and newline
    instead of all 256 bytes, so the random model can never emit half of a
    multi-byte UTF-8 sequence and generated text is always valid, readable
    UTF-8. Input characters outside the alphabet become ``<unk>``.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    ascii_alphabet = sorted(
        {
            char
            for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(TEXT_ALPHABET)
            for char in piece
        }
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ascii_alphabet,
        show_progress=False,
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create a randomly initialised two-layer Llama sized to the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=HIDDEN_SIZE * 2,
        num_hidden_layers=2,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder to write the model into")
    args = parser.parse_args()

    hf_logging.disable_progress_bar()
    seed_everything(SEED)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"saved {params:,} parameters, vocab {len(tokenizer)}, "
        f"max positions {MAX_POSITIONS} to {args.output_dir}"
    )


if __name__ == "__main__":
    main()
