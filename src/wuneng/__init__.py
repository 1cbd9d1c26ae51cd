"""wuneng: hybrid state + attention language models (RWKV-7, WuNeng, Meta-State)."""

__version__ = "0.1.0"

# Public classes, imported lazily (PEP 562) so that ``import wuneng`` and ``wuneng --help`` stay fast.
# Importing a model class registers it with the transformers Auto classes; ``import wuneng.models``
# registers all of them at once. Add new public names here: name -> module.
_LAZY_EXPORTS = {
    "RWKV7Config": "wuneng.models.rwkv7",
    "RWKV7Model": "wuneng.models.rwkv7",
    "RWKV7ForCausalLM": "wuneng.models.rwkv7",
    "RecurrentStateCache": "wuneng.cache",
    "MetaStateConfig": "wuneng.models.metastate",
    "MetaStateModel": "wuneng.models.metastate",
    "MetaStateForCausalLM": "wuneng.models.metastate",
    "WuNengConfig": "wuneng.models.wuneng",
    "WuNengModel": "wuneng.models.wuneng",
    "WuNengForCausalLM": "wuneng.models.wuneng",
    "HybridMixer": "wuneng.layers.hybrid",
    "grow_model": "wuneng.grow",
    "state_report": "wuneng.grow",
}


def __getattr__(name):
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'wuneng' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
