"""The attention, block and fused-pass benchmarks run on a machine without a GPU (tiny sizes, Triton interpreter) and
print their tables with every variant measured (a failing variant would show its error in the note column)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")


@pytest.mark.parametrize("script,rows", [("attention.py", ["sdpa bf16", "int8 fp8-PV", "int8 fp16-PV"]),
                                         ("block.py", ["bf16 (SDPA)", "INT8 linears", "INT8 attn (fp8 P·V)",
                                                       "fused block"]),
                                         ("fused_parts.py", ["(a) LayerNorm", "(b) RMSNorm", "(c) o", "(d) ffn.0",
                                                             "(e) ffn.2"])])
def test_benchmark_cpu_smoke(script, rows, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "WAN_INT8_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--cpu-smoke"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    for name in rows:
        hits = [line for line in table if name in line]
        assert hits, (name, table)
        if "note" in table[0]:   # a failing variant is recorded with its error in the note column
            assert all(line.rstrip().endswith("|  |") for line in hits), (name, table)
