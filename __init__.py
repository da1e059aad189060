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

try:  # the nodes need ComfyUI; without it (tests, the CLI) the pack exposes no nodes
    from wan_int8.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811
except ImportError as _exc:  # pragma: no cover - depends on the host
    if "comfy" not in str(_exc) and "folder_paths" not in str(_exc) and "wan_int8.comfy.nodes" not in str(_exc):
        raise

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
