"""Self-describing ``save_pretrained`` folders: plain transformers (and tools built on it, such as
lm-evaluation-harness) load wuneng models and tokenizers without importing wuneng first.

transformers finds a model class from ``config.json``'s ``model_type``, and only knows ours
(``wuneng_rwkv7``, ...) once ``import wuneng.models`` has registered them. For every other case it
offers the Hub's custom-code mechanism: an ``auto_map`` in ``config.json`` / ``tokenizer_config.json``
naming ``module.Class`` inside the folder, loaded with ``trust_remote_code=True``. The usual recipe
(``register_for_auto_class``) copies the class's source file into the folder, which cannot work for a
class that lives in a package (its relative imports reach outside the file). Instead the folder gets a
one-file shim that imports the classes from the *installed* wuneng package::

    # DIR/wuneng_auto.py
    from wuneng.models.rwkv7.configuration_rwkv7 import RWKV7Config  # noqa: F401
    from wuneng.models.rwkv7.modeling_rwkv7 import RWKV7ForCausalLM, RWKV7Model  # noqa: F401
    from wuneng.tokenization import ByteLevelTokenizer  # noqa: F401

    # DIR/config.json            "auto_map": {"AutoConfig": "wuneng_auto.RWKV7Config",
    #                                         "AutoModel": "wuneng_auto.RWKV7Model",
    #                                         "AutoModelForCausalLM": "wuneng_auto.RWKV7ForCausalLM"}
    # DIR/tokenizer_config.json  "auto_map": {"AutoTokenizer": ["wuneng_auto.ByteLevelTokenizer", null]}

so that, with wuneng installed, ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
and ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` work in a process that
never imported wuneng. Importing the shim registers every wuneng class, after which transformers
prefers the registered ("explicit local") classes, so the objects are exactly wuneng's own. A process
that has imported ``wuneng.models`` (or any model class; a bare ``import wuneng`` is lazy and registers
nothing) needs no ``trust_remote_code``: the registered model classes and ``ByteLevelTokenizer`` answer first
(docs/evaluation.md has the table, tests/test_fresh_process.py the checks).

Use: inherit :class:`AutoMapMixin` first in a model's ``PreTrainedModel`` base or a tokenizer class::

    class RWKV7PreTrainedModel(AutoMapMixin, PreTrainedModel): ...
    class ByteLevelTokenizer(AutoMapMixin, PreTrainedTokenizer): ...

The config's ``AutoConfig`` entry and the ``AutoModel*`` entries come from what ``wuneng`` registered
for the config class (see :func:`model_auto_map`); nothing is listed by hand.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

__all__ = [
    "AutoMapMixin",
    "SHIM_MODULE",
    "SHIM_FILENAME",
    "registered_classes",
    "model_auto_map",
    "tokenizer_auto_map",
    "write_shim",
]

SHIM_MODULE = "wuneng_auto"
SHIM_FILENAME = SHIM_MODULE + ".py"
# the model Auto classes a saved wuneng model is reachable from (when registered for its config class)
MODEL_AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM")

_SHIM_HEADER = '''"""Written by wuneng (wuneng.auto_map); rewritten on every save_pretrained into this folder.

Lets transformers' Auto classes load this folder with trust_remote_code=True in a process that has not
imported wuneng: config.json / tokenizer_config.json name these classes in their "auto_map". The code
comes from the installed wuneng package (pip install wuneng); nothing is copied here.
"""

'''
_IMPORT_LINE = re.compile(r"^from (wuneng(?:\.\w+)*) import ([\w, ]+?)(?:\s+#.*)?$")


def _wuneng_class(cls: type, role: str) -> type:
    if not isinstance(cls, type) or not (cls.__module__ == "wuneng" or cls.__module__.startswith("wuneng.")):
        raise TypeError(f"{role} must be a class defined in the wuneng package, got {cls!r}")
    return cls


def registered_classes(config_class: type) -> dict[str, type]:
    """``{"AutoConfig": config_class, "AutoModel": ..., "AutoModelForCausalLM": ...}`` as registered.

    The model entries are listed when wuneng registered a class for ``config_class`` (every model
    package registers on import). Raises ValueError if ``config_class`` is not the class registered with
    ``AutoConfig`` for its ``model_type`` (that name would not resolve when loading).
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    _wuneng_class(config_class, "config_class")
    model_type = getattr(config_class, "model_type", "")
    if model_type not in CONFIG_MAPPING or CONFIG_MAPPING[model_type] is not config_class:
        raise ValueError(
            f"{config_class.__name__} (model_type {model_type!r}) is not registered with AutoConfig; "
            "import its wuneng.models package (it registers on import) before saving"
        )
    classes = {"AutoConfig": config_class}
    for auto_name in MODEL_AUTO_CLASSES:
        mapping = getattr(transformers, auto_name)._model_mapping
        if config_class in mapping:
            classes[auto_name] = _wuneng_class(
                mapping[config_class], f"the {auto_name} class of {config_class.__name__}"
            )
    return classes


def model_auto_map(config_class: type) -> dict[str, str]:
    """``auto_map`` for ``config.json``: ``{"AutoConfig": "wuneng_auto.<Config>", "AutoModel": ...,
    "AutoModelForCausalLM": ...}`` (see :func:`registered_classes`)."""
    return _auto_map_of(registered_classes(config_class))


def _auto_map_of(classes: dict[str, type]) -> dict[str, str]:
    return {name: f"{SHIM_MODULE}.{cls.__name__}" for name, cls in classes.items()}


def tokenizer_auto_map(tokenizer_class: type) -> dict[str, list]:
    """``auto_map`` for ``tokenizer_config.json``: ``{"AutoTokenizer": ["wuneng_auto.<Class>", None]}``
    (a slow, i.e. Python, tokenizer and no fast one)."""
    _wuneng_class(tokenizer_class, "tokenizer_class")
    return {"AutoTokenizer": [f"{SHIM_MODULE}.{tokenizer_class.__name__}", None]}


def _shim_classes(path: Path) -> dict[str, set[str]]:
    """``{module: {class names}}`` imported by an existing shim (empty if there is none)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith(_SHIM_HEADER.split("\n", 1)[0]):
        raise FileExistsError(f"{path} exists and was not written by wuneng; refusing to overwrite it")
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            found.setdefault(m.group(1), set()).update(n.strip() for n in m.group(2).split(",") if n.strip())
    return found


def write_shim(save_directory: Union[str, os.PathLike], classes: Iterable[type]) -> Path:
    """Write ``save_directory/wuneng_auto.py`` importing ``classes`` (merged with the classes an earlier
    shim there imports, so a model and a tokenizer saved into one folder share it). Atomic (temp file +
    ``os.replace``). Returns the shim's path."""
    folder = Path(save_directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"write_shim: {folder} is not a directory")
    path = folder / SHIM_FILENAME
    imports = _shim_classes(path)
    for cls in classes:
        _wuneng_class(cls, "every shim class")
        imports.setdefault(cls.__module__, set()).add(cls.__name__)
    lines = [
        f"from {module} import {', '.join(sorted(names))}  # noqa: F401" for module, names in sorted(imports.items())
    ]
    text = _SHIM_HEADER + "\n".join(lines) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{SHIM_FILENAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _weights_with_umask(save_directory: Union[str, os.PathLike]) -> None:
    """safetensors writes weight files as 0o600 whatever the umask; give the ones just written the mode a
    plain ``open`` would have (``0o666 & ~umask``), so other users of a shared machine can read a saved model
    exactly when the user's umask says so. Only weight files: nothing else in the folder is touched."""
    from .saving import apply_umask

    for name in os.listdir(save_directory):
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            apply_umask(os.path.join(save_directory, name))


def _unsharded_class(cls: type) -> type:
    """The model class itself under FSDP2: ``fully_shard`` turns a model's class into ``FSDP<Name>(FSDPModule,
    <Name>)`` (defined in torch), which the shim must not name."""
    bases = cls.__bases__
    if cls.__name__.startswith("FSDP") and len(bases) == 2 and bases[0].__name__ == "FSDPModule":
        return bases[1]
    return cls


class AutoMapMixin:
    """Makes ``save_pretrained`` folders self-describing (see the module doc). Put it first in the bases of a
    ``PreTrainedModel`` subclass (the config gets the model ``auto_map``) or of a tokenizer class
    (``tokenizer_config.json`` gets ``AutoTokenizer``); both write the ``wuneng_auto.py`` shim."""

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """A no-op for wuneng classes.

        transformers calls this on classes it loads through ``auto_map``; afterwards ``save_pretrained``
        would copy the class's source file into the folder and point ``auto_map`` at that copy, which
        breaks for classes inside a package. wuneng folders name the classes through the shim instead.
        """
        return None

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any):
        from transformers import PretrainedConfig, PreTrainedModel
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        if isinstance(self, PreTrainedModel):
            config_class = type(self.config)
            _wuneng_class(config_class, "the config class")
            # a config class transformers loaded through auto_map was flagged for source copying (its
            # register_for_auto_class is transformers'); undo that, the shim names it instead
            if config_class.__dict__.get("_auto_class") is not None:
                config_class._auto_class = None
            classes = registered_classes(config_class)
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_auto_map_of(classes)}
            result = super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                write_shim(save_directory, [*classes.values(), _unsharded_class(type(self))])
                _weights_with_umask(save_directory)
            return result
        if isinstance(self, PreTrainedTokenizerBase):
            self._auto_map = tokenizer_auto_map(type(self))
            result = super().save_pretrained(save_directory, *args, **kwargs)
            write_shim(save_directory, [type(self)])
            return result
        if isinstance(self, PretrainedConfig):  # pragma: no cover - configs get their auto_map from the model
            raise TypeError("AutoMapMixin is for PreTrainedModel and tokenizer classes, not configs")
        raise TypeError(f"AutoMapMixin: {type(self).__name__} is neither a PreTrainedModel nor a tokenizer")
