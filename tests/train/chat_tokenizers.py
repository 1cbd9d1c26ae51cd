"""Tiny byte-level BPE tokenizers with Qwen2-style (ChatML) and Llama-3-style chat templates, built locally.

Nothing is downloaded: a byte-level BPE is trained with the ``tokenizers`` library on a few seeded generated
sentences (ASCII, accented letters, CJK, an emoji, blank lines, runs of spaces), the chat special tokens are
added, and the result is wrapped in transformers' ``PreTrainedTokenizerFast`` with a Jinja chat template.

The pre-tokenizer regexes are the published ones of Qwen2 and Llama 3 (digits one at a time vs. up to three;
``\\s*[\\r\\n]+`` keeps runs of blank lines together, so a reply that starts with a newline merges with the
newline that ends ChatML's ``<|im_start|>assistant\\n`` header: the boundary case of SFT masking).

``marked=True`` templates wrap each assistant turn's content and end-of-turn text in
``{% generation %}...{% endgeneration %}`` (as TRL's training templates do); ``marked=False`` renders the
same text without the markers.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _generation(body: str, marked: bool) -> str:
    """``{% generation %}body{% endgeneration %}`` when marked, else the body alone."""
    return "{%- generation -%}" + body + "{%- endgeneration -%}" if marked else body


def qwen2_template(marked: bool = True) -> str:
    """ChatML as Qwen2 renders it: a default system turn when the chat has none; the assistant's content and
    ``<|im_end|>\\n`` inside the generation block, the ``<|im_start|>assistant\\n`` header outside."""
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}"
        + _generation("{{ message['content'] + '<|im_end|>\\n' }}", marked)
        + "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def llama3_template(marked: bool = True) -> str:
    """Llama 3: ``<|begin_of_text|>``, headers ``<|start_header_id|>role<|end_header_id|>\\n\\n``, every content
    trimmed of surrounding whitespace and closed by ``<|eot_id|>`` (inside the generation block)."""
    return (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        + _generation("{{ message['content'] | trim + '<|eot_id|>' }}", marked)
        + "{%- else -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    )


WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "add", "two", "numbers", "answer", "is", "café",
         "naïve", "über", "世界", "你好", "😀", "ok", "yes", "no", "why", "because", "sum", "of"]  # fmt: skip


def corpus(seed: int = 0, n: int = 300) -> list[str]:
    """Seeded sentences with unicode, digits, runs of spaces and blank lines (so BPE learns ``\\n\\n``)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        text = " ".join(words) + rng.choice([".", "!", "?", ""]) + f" {rng.randint(0, 999)}"
        text = rng.choice(["", "\n", "\n\n", " ", "  "]) + text + rng.choice(["", "\n", "\n\n", "  "])
        lines.append(text)
    return lines


def _train_bpe(pattern: str, specials: list[str], vocab_size: int, seed: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return tok


def qwen2_style_tokenizer(marked: bool = True, vocab_size: int = 420, seed: int = 0) -> PreTrainedTokenizerFast:
    """A Qwen2-style BPE: ChatML specials, eos = pad = ``<|im_end|>``-free ``<|endoftext|>`` as in Qwen2 base."""
    tok = _train_bpe(QWEN2_PATTERN, QWEN2_SPECIALS, vocab_size, seed)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2_SPECIALS[1:],
        chat_template=qwen2_template(marked),
        clean_up_tokenization_spaces=False,
    )


def llama3_style_tokenizer(marked: bool = True, vocab_size: int = 420, seed: int = 0) -> PreTrainedTokenizerFast:
    """A Llama-3-style BPE: ``<|begin_of_text|>`` bos, ``<|eot_id|>`` eos, header specials."""
    tok = _train_bpe(LLAMA3_PATTERN, LLAMA3_SPECIALS, vocab_size, seed)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=LLAMA3_SPECIALS[2:4],
        chat_template=llama3_template(marked),
        clean_up_tokenization_spaces=False,
    )


BUILDERS = {"qwen2": qwen2_style_tokenizer, "llama3": llama3_style_tokenizer}
END_OF_TURN = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>"}
