"""A byte-level tokenizer: the project's default when no teacher tokenizer is given.

Ids 0..255 are the UTF-8 bytes of the text; three special tokens follow:
``<pad>`` = 256, ``<bos>`` = 257, ``<eos>`` = 258 (vocabulary size 259). It is a real Hugging Face
``PreTrainedTokenizer`` (``PythonBackend`` in transformers 5), so ``save_pretrained`` /
``from_pretrained`` / ``apply_chat_template`` / ``decode`` work with no network and no vocab file.

Byte tokens are written as one character ``chr(byte)`` (the ByT5 convention): the token string of
byte 0x41 is ``"A"`` and of 0xC3 is ``"\\xc3"``; :meth:`convert_tokens_to_string` turns them back into
bytes and decodes UTF-8 (invalid sequences are replaced, so decoding never raises).

Special-token strings that occur in the text (e.g. ``"<eos>"`` written by the chat template) are
recognised as the special tokens, as with every HF tokenizer; all other text is plain bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizer

from wuneng.auto_map import AutoMapMixin

__all__ = ["ByteLevelTokenizer", "BYTE_VOCAB_SIZE", "DEFAULT_CHAT_TEMPLATE", "load_tokenizer"]

NUM_BYTES = 256
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259

# One message per line: "role: content<eos>\n"; the generation prompt is "assistant: ".
# Rendering messages[:i] with add_generation_prompt=True is a prefix of rendering messages[:i+1]
# when message i is the assistant's: the SFT stage relies on this to find the response tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}"
)


class ByteLevelTokenizer(AutoMapMixin, PreTrainedTokenizer):
    """UTF-8 bytes plus ``<pad>``/``<bos>``/``<eos>``; vocabulary size 259.

    Args:
        prepend_bos: prepend ``<bos>`` when ``add_special_tokens=True`` (default False).
        append_eos: append ``<eos>`` when ``add_special_tokens=True`` (default False).
        chat_template: a Jinja chat template; :data:`DEFAULT_CHAT_TEMPLATE` when not given.
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(
        self,
        pad_token: str = "<pad>",
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        prepend_bos: bool = False,
        append_eos: bool = False,
        chat_template: str | None = None,
        **kwargs,
    ) -> None:
        # Fix the special ids before the base class adds "missing" specials at the end of the vocab.
        specials = {PAD_ID: pad_token, BOS_ID: bos_token, EOS_ID: eos_token}
        self._added_tokens_decoder = {
            i: (
                t
                if isinstance(t, AddedToken)
                else AddedToken(t, lstrip=False, rstrip=False, special=True, normalized=False)
            )
            for i, t in specials.items()
        }
        self.prepend_bos = prepend_bos
        self.append_eos = append_eos
        kwargs.pop("added_tokens_decoder", None)  # the three specials are fixed; saved copies are ignored
        kwargs.pop("clean_up_tokenization_spaces", None)  # bytes round-trip exactly: never clean up
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            chat_template=chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
            prepend_bos=prepend_bos,
            append_eos=append_eos,
            clean_up_tokenization_spaces=False,
            **kwargs,
        )

    # ----------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of byte tokens (256); ``len(tokenizer)`` counts the specials too (259)."""
        return NUM_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(NUM_BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int | None:
        if len(token) == 1 and ord(token) < NUM_BYTES:
            return ord(token)
        return None

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < NUM_BYTES:
            raise ValueError(f"token id {index} is not a byte id (0..255) nor a special id of ByteLevelTokenizer")
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                out += token.encode("utf-8")
            else:
                out.append(ord(token))
        return out.decode("utf-8", errors="replace")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (exactly ``self(text, add_special_tokens=False)["input_ids"]``) and each id's
        character span ``[start, end)`` in ``text``: the bytes of one character share its span; a special
        token spans its string. (Python tokenizers have no ``return_offsets_mapping``; SFT masking needs it.)
        """
        tokens = self.tokenize(text)
        ids = self.convert_tokens_to_ids(tokens)
        offsets: list[tuple[int, int]] = []
        pos = 0  # character index in text
        char_bytes = b""  # UTF-8 bytes of text[pos] not yet matched by byte tokens
        for token in tokens:
            if token in self._added_tokens_encoder:
                if char_bytes or not text.startswith(token, pos):
                    raise ValueError(
                        f"ByteLevelTokenizer: special token {token!r} not found at character {pos} of the text"
                    )
                offsets.append((pos, pos + len(token)))
                pos += len(token)
                continue
            if not char_bytes:
                if pos >= len(text):
                    raise ValueError("ByteLevelTokenizer: more byte tokens than the text has bytes")
                char_bytes = text[pos].encode("utf-8")
            if ord(token) != char_bytes[0]:
                raise ValueError(
                    f"ByteLevelTokenizer: byte token {ord(token)} does not match character {pos} of the text"
                )
            offsets.append((pos, pos + 1))
            char_bytes = char_bytes[1:]
            if not char_bytes:
                pos += 1
        if char_bytes or pos != len(text):
            raise ValueError("ByteLevelTokenizer: the tokens do not cover the whole text")
        return ids, offsets

    # ------------------------------------------------------------------------ special tokens
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [BOS_ID] if self.prepend_bos else []
        eos = [EOS_ID] if self.append_eos else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.prepend_bos) + int(self.append_eos)) * (2 if pair else 1)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            ids = list(token_ids_0) + list(token_ids_1 or [])
            return [int(i in (PAD_ID, BOS_ID, EOS_ID)) for i in ids]
        bos = [1] if self.prepend_bos else []
        eos = [1] if self.append_eos else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is implicit (bytes); tokenizer_config.json holds everything


def load_tokenizer(name_or_path: str | os.PathLike | None):
    """The project's tokenizer loader.

    ``None`` or ``"byte"`` gives a fresh :class:`ByteLevelTokenizer`; a directory saved from a
    :class:`ByteLevelTokenizer` loads as one; any other local directory goes through
    ``AutoTokenizer.from_pretrained(..., local_files_only=True)`` (nothing is downloaded).
    A tokenizer with no chat template gets :data:`DEFAULT_CHAT_TEMPLATE`.
    """
    if name_or_path is None or str(name_or_path) == "byte":
        return ByteLevelTokenizer()
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer: {path} is not a directory (give a local tokenizer/model folder or 'byte')")
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        with open(config_file, encoding="utf-8") as f:
            cls_name = json.load(f).get("tokenizer_class")
        if cls_name == ByteLevelTokenizer.__name__:
            return ByteLevelTokenizer.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer
