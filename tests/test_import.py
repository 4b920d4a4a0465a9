"""`import pyshrink` stays lean and loads the native kernels, loudly."""
import os
import subprocess
import sys


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_import_does_not_pull_in_transformers_or_onnx():
    r = _run("import sys, pyshrink; print(sorted(m for m in ('transformers', 'onnx', 'onnxruntime') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
