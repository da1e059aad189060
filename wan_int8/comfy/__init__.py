"""ComfyUI glue (the only part of wan-int8 that knows ComfyUI): ops, loading, LoRA patcher integration, nodes.

Modules import ComfyUI lazily, inside functions (`nodes` needs `folder_paths` at import), so the library and
the CLI never need ComfyUI and importing the pack touches no GPU.
"""
