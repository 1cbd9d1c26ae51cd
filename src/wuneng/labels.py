"""The label convention shared by training, evaluation and the models' losses.

``IGNORE_INDEX`` marks a position that is not a target (a prompt, padding, an unlabelled query). It is -100,
the default ``ignore_index`` of ``torch.nn.functional.cross_entropy`` and the value transformers' models
skip, so labels built here work with any of them.
"""

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX"]
