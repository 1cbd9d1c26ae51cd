"""Writing and checking model folders so that nothing a user made is overwritten or half-written.

Writing: a folder is assembled in a temporary directory beside its destination (``.NAME.wuneng-new-XXXX``)
and moved into place with ``os.replace``. Replacing an existing folder (``overwrite``) renames the old one
aside (``.NAME.wuneng-old-XXXX``), renames the new one in, and only then deletes the old one; a failure
between the two renames puts the old folder back. An interruption therefore leaves the old folder or the
new one whole at ``NAME`` (a process killed between the two renames leaves the old one whole under its
``wuneng-old`` name). ``overwrite`` replaces only a model folder of this library (:func:`replaceable_model_folder`),
never an arbitrary directory, and an output that is, holds or lies inside an input is refused.
Folders and files are created with the user's umask (directories ``0o777 & ~umask``, files
``0o666 & ~umask``), also those that safetensors would write as ``0o600``.

Reading: :func:`check_model_folder` checks a ``save_pretrained`` folder before a model is built from it
(readable config.json with a known ``model_type``, readable safetensors headers, tensor shapes equal to
those config.json describes) and raises :class:`ModelFolderError` with one line naming the file or key;
:func:`load_causal_lm` runs those checks and loads the model: the one loader of causal-LM folders (a teacher to
convert, a teacher to align or distil from, a model to train).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from typing import Callable, Iterable, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)

__all__ = [
    "TOKENIZER_FILES",
    "OutputFolderError",
    "ModelFolderError",
    "library_model_types",
    "check_output_dir",
    "replaceable_model_folder",
    "copy_tokenizer_files",
    "make_temp_dir",
    "replace_folder",
    "apply_umask",
    "current_umask",
    "save_pretrained_atomic",
    "check_weight_files",
    "check_model_folder",
    "load_causal_lm",
    "read_folder_config",
    "checkpoint_tensor_shapes",
    "checkpoint_mismatches",
    "describe_loading_problems",
]

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

# Entries ``save_pretrained`` of a wuneng model (and its tokenizer) writes; a folder holding anything else is
# not replaced by ``overwrite``.
_MODEL_FOLDER_FILES = frozenset(
    (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "wuneng_auto.py",
        "__pycache__",
    )
    + TOKENIZER_FILES
)
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class OutputFolderError(FileExistsError):
    """An output folder is refused: it is occupied (and ``overwrite`` was not given), it is not a model folder
    of this library (so ``overwrite`` may not replace it), or it is, holds or lies inside an input."""


class ModelFolderError(ValueError):
    """A model folder cannot be used: config.json unreadable or of an unknown ``model_type``, weights unreadable
    (truncated or corrupt) or not the tensors config.json describes. The message is one line naming the file."""


def library_model_types() -> tuple:
    """The ``model_type`` names of this library's own models (sorted)."""
    from .models import MetaStateConfig, RWKV7Config, WuNengConfig

    return tuple(sorted(c.model_type for c in (MetaStateConfig, RWKV7Config, WuNengConfig)))


# ------------------------------------------------------------------------------------------ permissions
def current_umask() -> int:
    """The process umask (read from /proc where possible; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open``/``mkdir`` would
    have given under the current umask: folders ``0o777 & ~umask``, files ``0o666 & ~umask``. For what this
    process has just written (safetensors writes ``0o600`` whatever the umask)."""
    mask = current_umask()
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


# ------------------------------------------------------------------------------------------ output folders
def _within(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or lies inside it (both real, absolute paths)."""
    try:
        return os.path.commonpath([inner, outer]) == outer
    except ValueError:  # different drives
        return False


def replaceable_model_folder(path: PathLike) -> Optional[str]:
    """None if ``path`` is a model folder of this library that ``overwrite`` may replace: a folder whose
    config.json has one of :func:`library_model_types` and which holds only what ``save_pretrained`` writes
    (config, weights, tokenizer files, ``wuneng_auto.py``). Otherwise the reason it is not, as a phrase."""
    path = os.fspath(path)
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return "it has no config.json"
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return "its config.json is not readable JSON"
    if model_type not in library_model_types():
        return (
            f"its config.json has model_type {model_type!r}, not one of wuneng's ({', '.join(library_model_types())})"
        )
    others = sorted(e for e in os.listdir(path) if e not in _MODEL_FOLDER_FILES and not _SHARD.match(e))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"it also holds {shown}, which a model folder does not"
    return None


def check_output_dir(out_dir: PathLike, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> str:
    """Absolute path of ``out_dir`` if a model folder may be written there, else :class:`OutputFolderError`.

    Refused: ``out_dir`` is, holds or lies inside one of ``inputs``; it exists and is not a folder; it is a
    non-empty folder and ``overwrite`` is False; ``overwrite`` is True but the folder is not a model folder
    of this library (:func:`replaceable_model_folder`)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    real_out = os.path.realpath(out_dir)
    for given in inputs:
        real_in = os.path.realpath(os.fspath(given))
        if _within(real_out, real_in) or _within(real_in, real_out):
            relation = "is" if real_in == real_out else "lies inside" if _within(real_out, real_in) else "holds"
            raise OutputFolderError(
                f"output folder {out_dir} {relation} the input {os.fspath(given)}; writing there would replace what "
                "the command reads: choose an output folder outside the input"
            )
    if not os.path.lexists(out_dir):
        return out_dir
    if not os.path.isdir(out_dir):
        raise OutputFolderError(f"{out_dir} exists and is not a directory; choose another output folder")
    if not os.listdir(out_dir):
        return out_dir
    if not overwrite:
        raise OutputFolderError(
            f"{out_dir} exists and is not an empty directory; pass overwrite=True (CLI: --overwrite) to replace a "
            "model folder there, or choose another output folder"
        )
    reason = replaceable_model_folder(out_dir)
    if reason is not None:
        raise OutputFolderError(
            f"{out_dir} is not a wuneng model folder ({reason}); --overwrite replaces only a folder written by "
            "wuneng convert/grow/import-rwkv: move its content away or choose another output folder"
        )
    return out_dir


def make_temp_dir(parent: PathLike, name: str, tag: str = "new") -> str:
    """Create and return a new empty folder ``PARENT/.NAME.wuneng-TAG-XXXXXXXX`` with the user's umask
    (unlike ``tempfile.mkdtemp``, which makes it 0o700)."""
    parent = os.fspath(parent)
    while True:
        path = os.path.join(parent, f".{name}.wuneng-{tag}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:  # pragma: no cover - a 32-bit collision
            continue


def replace_folder(new: PathLike, dest: PathLike) -> None:
    """Move the complete folder ``new`` to ``dest`` (same file system). An existing ``dest`` is renamed aside
    first and deleted only once ``new`` is in place; if the rename-in fails the old folder is put back."""
    new, dest = os.fspath(new), os.fspath(dest)
    if not os.path.lexists(dest):
        os.replace(new, dest)
        return
    aside = make_temp_dir(os.path.dirname(dest), os.path.basename(dest), "old")
    os.rmdir(aside)  # only its unique name is needed
    os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    try:
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside)
        else:
            os.remove(aside)
    except OSError as err:  # the new folder is in place; the old one is left under its aside name
        logger.warning("replaced %s, but could not delete the old folder kept at %s: %s", dest, aside, err)


def copy_tokenizer_files(src_dir: PathLike, dst_dir: PathLike, names: Iterable[str] = TOKENIZER_FILES) -> list:
    """Copy the tokenizer files of ``src_dir`` that exist into ``dst_dir``; returns the names copied."""
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    names = set(names)
    copied = []
    for entry in sorted(os.listdir(src_dir)):
        if entry in names and os.path.isfile(os.path.join(src_dir, entry)):
            shutil.copyfile(os.path.join(src_dir, entry), os.path.join(dst_dir, entry))
            copied.append(entry)
    return copied


def save_pretrained_atomic(
    model,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    tokenizer_from: Optional[PathLike] = None,
    inputs: Sequence[PathLike] = (),
    write: Optional[Callable[[str], None]] = None,
    check: bool = True,
) -> str:
    """``model.save_pretrained`` into ``out_dir`` atomically, with the tokenizer files of ``tokenizer_from``.

    Returns the absolute output path. The output is checked with :func:`check_output_dir` (``overwrite``,
    ``inputs``) before anything is written and again before it is moved into place. ``write(folder)`` replaces
    ``model.save_pretrained(folder)`` (e.g. with a gathered state dict and a tokenizer). ``check=False`` skips
    the output checks: for a caller that owns ``out_dir`` (a training run's ``final`` folder)."""
    inputs = tuple(inputs) + ((tokenizer_from,) if tokenizer_from is not None else ())
    out_dir = check_output_dir(out_dir, overwrite, inputs) if check else os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, os.path.basename(out_dir))
    try:
        if write is not None:
            write(tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        apply_umask(tmp)
        if check:
            check_output_dir(out_dir, overwrite, inputs)  # something may have appeared there meanwhile
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------------ reading
def _weight_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelFolderError(f"{index}: not a readable safetensors index ({err}); save the model again") from None
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    return []


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_weight_files(path: PathLike) -> list:
    """The safetensors files of the model folder ``path`` (``model.safetensors`` or the shards its index
    lists; [] if it has none), each checked to have a readable header that covers the file:
    :class:`ModelFolderError` naming a truncated, corrupt or missing one."""
    from safetensors import safe_open

    path = os.fspath(path)
    files = _weight_files(path)
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except FileNotFoundError:
            raise ModelFolderError(
                f"{file}: missing (listed in model.safetensors.index.json); copy the complete folder"
            ) from None
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
            raise ModelFolderError(
                f"{file}: not a readable safetensors file ({_one_line(err)}); it is truncated or corrupt: save or copy it again"
            ) from None
    return files


def describe_loading_problems(info: dict, tied: bool = False) -> str:
    """'' or a description of a loading report's missing / unexpected / mismatched tensors (a tied LM head may be
    missing)."""
    parts = []
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "shape mismatch"),
    ):
        names = sorted(
            str(k) for k in (info.get(key) or ()) if not (tied and key == "missing_keys" and k == "lm_head.weight")
        )
        if names:
            parts.append(f"{label}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    return "; ".join(parts)


def checkpoint_tensor_shapes(path: PathLike) -> dict:
    """Names and shapes (tuples) of the tensors of a local safetensors checkpoint folder (single file or
    sharded), read from the file headers only; {} when it has no safetensors weights."""
    from safetensors import safe_open

    path = os.fspath(path)
    shapes = {}
    for name in _weight_files(path):
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def checkpoint_mismatches(path: PathLike, model, tied: bool = False, ignore_sizes: bool = False) -> str:
    """'' when the safetensors checkpoint folder ``path`` holds exactly the tensors of ``model`` (an
    ``nn.Module``, may live on the meta device) with its shapes; otherwise a description naming the missing,
    unexpected and differently shaped tensors. ``tied``: the LM head shares the embedding (its tensor may be
    absent); ``ignore_sizes``: differently shaped tensors are not listed."""
    found = checkpoint_tensor_shapes(path)
    if not found:
        return ""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)
    info = {
        "missing_keys": sorted(set(expected) - set(found)),
        "unexpected_keys": sorted(set(found) - set(expected)),
        "mismatched_keys": []
        if ignore_sizes
        else [
            f"{k} (checkpoint {found[k]} vs config {expected[k]})"
            for k in sorted(set(found) & set(expected))
            if found[k] != expected[k]
        ],
    }
    return describe_loading_problems(info)


def read_folder_config(
    path: PathLike,
    what: str = "model",
    folder_kind: str = "a save_pretrained folder",
    config_kind: str = "the config.json save_pretrained writes",
) -> dict:
    """The config.json of the model folder ``path`` as a dict. FileNotFoundError (``what path: not a model
    folder ... expected folder_kind``) without one; :class:`ModelFolderError` (one line naming the file,
    expecting ``config_kind``) when it is not readable JSON or not a JSON object."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{what} {path}: not a model folder (no config.json; expected {folder_kind}: config.json + model.safetensors)"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelFolderError(f"{config_path}: not readable JSON ({_one_line(err)}); expected {config_kind}") from None
    if not isinstance(raw, dict):
        raise ModelFolderError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def check_model_folder(path: PathLike, what: str = "model") -> dict:
    """Check a ``save_pretrained`` folder before a model is built from it; returns its config.json as a dict.

    FileNotFoundError if ``path`` is not a folder with a config.json. :class:`ModelFolderError` (one line,
    naming the file or key, what was expected and what to do) if config.json is not JSON, its ``model_type``
    is neither one of :func:`library_model_types` nor one transformers knows, transformers cannot read it or
    build a model from it, a safetensors file cannot be read (truncated, corrupt), or the tensors it holds are
    not those config.json describes (missing, unexpected or differently shaped). Only the safetensors headers
    are read; folders without safetensors weights (e.g. ``pytorch_model.bin``) are checked up to the config."""
    return _checked_folder(path, what)[0]


def _checked_folder(path: PathLike, what: str, check_skeleton: Optional[Callable] = None, always_build: bool = False):
    """The checks of :func:`check_model_folder`: (config.json as a dict, the transformers config, the causal LM
    built from it on the meta device); the last two are None when the folder has no safetensors weights, unless
    ``always_build``. ``check_skeleton(model)`` runs on the meta-device model before any weight file is opened."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    raw = read_folder_config(path, what)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    own = library_model_types()  # importing wuneng.models registers them with transformers
    model_type = raw.get("model_type")
    if model_type is None or model_type not in CONFIG_MAPPING:
        found = "no model_type" if model_type is None else f"unknown model_type {model_type!r}"
        raise ModelFolderError(
            f"{config_path}: {found}; expected one of wuneng's own ({', '.join(own)}) or a transformers model type "
            "(e.g. llama, qwen2): point to a folder saved by wuneng or transformers, or fix model_type"
        )
    if not (always_build or check_skeleton is not None or _weight_files(path)):
        return raw, None, None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises several types (OSError, strict-dataclass validation errors)
        raise ModelFolderError(
            f"{config_path}: cannot read the {what} config ({_one_line(err)}); fix config.json or save the model again"
        ) from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # transformers raises several types for a config it cannot use
        raise ModelFolderError(
            f"{config_path}: cannot build a model from it ({_one_line(err)}); fix config.json or save the model again"
        ) from None
    if check_skeleton is not None:
        try:
            check_skeleton(skeleton)
        except ValueError as err:
            raise ValueError(f"{err} ({what} {path})") from None  # the model is not what the caller needs
    files = check_weight_files(path)
    problems = checkpoint_mismatches(path, skeleton, bool(getattr(config, "tie_word_embeddings", False)))
    if problems:
        weights = os.path.join(path, files[0] if len(files) == 1 else "model.safetensors.index.json")
        raise ModelFolderError(
            f"{weights}: the weights do not match its config.json ({problems}); expected the tensors config.json "
            "describes: use the config.json saved with these weights"
        )
    return raw, config, skeleton


def load_causal_lm(path: PathLike, dtype=None, what: str = "model", check: Optional[Callable] = None):
    """Load the local causal-LM folder ``path`` (nothing is downloaded) with the project's checks, each failure one
    line naming the file: the folder and its config.json (:func:`check_model_folder`: a known ``model_type``,
    wuneng's own types registered with transformers, readable safetensors headers holding the tensors config.json
    describes, checked on a meta-device skeleton before any weight is read), then the weights transformers loads.

    Args:
        path: a ``save_pretrained`` folder of any transformers causal LM or of wuneng's own models (``~`` expanded).
        dtype: a ``torch.dtype``, or None for the checkpoint's own (``dtype="auto"``).
        what: how messages name the folder ("teacher", "model.path", ...).
        check: ``check(model)`` raises ValueError when the model does not fit the caller; it runs on the
            meta-device skeleton before any weight file is opened, and on the loaded model (convert: the
            teacher's structure).

    Raises:
        FileNotFoundError: no folder with a config.json there.
        ModelFolderError: (a ValueError) a broken or inconsistent folder.
        ValueError: ``check`` refused the model (its message, then the folder).
    """
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(os.fspath(path))
    _checked_folder(path, what, check, always_build=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype or "auto", output_loading_info=True
        )
    except RuntimeError as err:  # transformers reports size mismatches this way
        raise ModelFolderError(
            f"{what} {path}: the weights do not match its config.json ({_one_line(err)}); save the model again"
        ) from None
    problems = describe_loading_problems(dict(info), bool(getattr(model.config, "tie_word_embeddings", False)))
    if problems:
        raise ModelFolderError(f"{what} {path}: the weights do not match its config.json ({problems})")
    if check is not None:
        check(model)
    return model
