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


def test_stage_packages_are_the_same_object_on_every_access():
    # contract, quantize and heal are callable packages named like their function: the first access used to
    # return the function (no .iterative_contract on it), the second the package
    r = _run("import pyshrink\n"
             "firsts = [pyshrink.heal, pyshrink.quantize, pyshrink.contract]\n"
             "print(pyshrink.heal.iterative_contract.__name__, pyshrink.quantize.QuantConfig.__name__,\n"
             "      pyshrink.contract.ContractionSettings.__name__)\n"
             "print(all(f is g and callable(f) for f, g in zip(firsts, [pyshrink.heal, pyshrink.quantize, pyshrink.contract])))\n"
             "print(pyshrink.load_model.__module__, pyshrink.HealResult.__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["iterative_contract", "QuantConfig", "ContractionSettings", "True", "pyshrink.models",
                                "HealResult"]
