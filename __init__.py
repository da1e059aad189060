"""ComfyUI entry point of the wan-int8 node pack (the repository root is the custom-node folder).

Importing this touches no GPU and compiles nothing: nodes import the library lazily.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    # One copy of the library whether it is pip-installed or used from this folder.
    sys.path.insert(0, _here)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

import importlib.util as _util

# Inside ComfyUI (its `folder_paths` module is importable) the nodes load, and any failure is raised so ComfyUI
# reports the pack as failed; outside it (tests, the CLI, pip installs) the pack simply exposes no nodes.
if _util.find_spec("folder_paths") is not None:
    from wan_int8.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
