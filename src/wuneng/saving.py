"""Writing model folders so that an interrupted run leaves nothing half-written.

A folder is assembled in a temporary directory beside its destination and moved into place with one
``os.replace``; the destination then holds either the old content or the complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Optional, Union

PathLike = Union[str, os.PathLike]

# Files that make up a Hugging Face tokenizer (copied along when a model is converted or grown).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def check_output_dir(out_dir: PathLike, overwrite: bool = False) -> str:
    """Absolute path of ``out_dir``; an error if it exists and is not an empty folder (unless ``overwrite``)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (os.listdir(out_dir) and not overwrite)):
        raise FileExistsError(f"{out_dir!r} exists and is not an empty directory; pass overwrite=True (CLI: --overwrite) to replace it")
    return out_dir


def copy_tokenizer_files(src_dir: PathLike, dst_dir: PathLike, names: Iterable[str] = TOKENIZER_FILES) -> list:
    """Copy the tokenizer files of ``src_dir`` that exist into ``dst_dir``; returns the names copied."""
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    names = set(names)
    copied = []
    for entry in sorted(os.listdir(src_dir)):
        if entry in names and os.path.isfile(os.path.join(src_dir, entry)):
            shutil.copy2(os.path.join(src_dir, entry), os.path.join(dst_dir, entry))
            copied.append(entry)
    return copied


def save_pretrained_atomic(model, out_dir: PathLike, *, overwrite: bool = False, tokenizer_from: Optional[PathLike] = None) -> str:
    """``model.save_pretrained`` into ``out_dir`` atomically, with the tokenizer files of ``tokenizer_from``.

    Returns the absolute output path. A non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = check_output_dir(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    try:
        model.save_pretrained(tmp)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
