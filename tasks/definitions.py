"""MONAI bundle config items: the form in which a task describes its network and transforms.

A *definition* is a JSON-serialisable dict (or a list of them) in MONAI's bundle config syntax:
``{"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, ...}``, with ``$``-expressions
such as ``"$torch.float32"`` where a value is a Python object. The same definition is what the
tasks instantiate to train and what an exported bundle's ``configs/inference.json`` holds, so
MONAI's own ``monai.bundle`` tools rebuild exactly the network and transforms a run used.
Instantiation is MONAI's ``ConfigParser``; nothing here parses config syntax.
"""

from __future__ import annotations

import copy
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["Definition", "instantiate"]

#: One bundle config item: a ``_target_`` dict, a list of them, or a plain value.
Definition = dict[str, Any] | list[Any]


def instantiate(definition: Definition) -> Any:
    """Build the object(s) a definition describes, with MONAI's ``ConfigParser``.

    Args:
        definition: a ``_target_`` dict (one object) or a list of them (a list of objects);
            not modified (the parser works on a deep copy).

    Returns:
        The instantiated object, or the list of instantiated objects.
    """
    parser = ConfigParser({"item": copy.deepcopy(definition)})
    return parser.get_parsed_content("item", instantiate=True)
