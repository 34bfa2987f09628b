"""A tiny but real byte-level BPE tokenizer (trained with `tokenizers`) and a chat-ready tiny Mixtral folder.

Byte-level, so characters outside the training text are split into single-byte tokens: exactly the
case where naive streaming would print U+FFFD. The tokenizer_config.json carries bos/eos and a
ChatML-style chat template that uses raise_exception, so rendering can be compared with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Un café crème, s'il vous plaît. Où est la gare ?",
    "Grüße aus München! Schöne Grüße.",
    "hello world, hello experts, hello tokens",
    "def add(a, b):\n    return a + b\n",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def save_tokenizer(path: Path, vocab_size: int = 300, chat_template: str | None = CHAT_TEMPLATE) -> int:
    """Train and save tokenizer.json + tokenizer_config.json into `path`; return the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 128, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def mixtral_config(vocab: int, **kw):
    from transformers import MixtralConfig

    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return MixtralConfig(**base)


def save_chat_model(path: Path, tokenizer: bool = True, **kw):
    """A tiny Mixtral checkpoint with (optionally) the tiny tokenizer; returns the transformers reference model."""
    from tests.tiny import save_tiny

    path.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(path) if tokenizer else 300
    return save_tiny(mixtral_config(vocab, **kw), path)
