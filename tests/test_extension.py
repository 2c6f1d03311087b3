"""Loading the ops: the JIT build from a source tree, and its clear error when that is impossible."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter that sees a copy of the package with no built extension (the editable
# install's import hooks, which would find the built one, are removed first).
PROBE = textwrap.dedent("""
    import sys
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in repr(f)]
    sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in repr(h)]
    sys.path_importer_cache.clear()
    import torch
    import lstm_fused
    assert lstm_fused.__file__.startswith(sys.argv[1]), lstm_fused.__file__
    torch.manual_seed(0)
    reference = torch.nn.LSTM(3, 4, num_layers=2)
    fused = lstm_fused.LSTM.from_torch(reference)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=2e-5, rtol=1e-4)
    print("ok")
""")


def copy_package(destination: Path, with_sources: bool) -> None:
    shutil.copytree(ROOT / "lstm_fused", destination / "lstm_fused",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if with_sources:
        shutil.copytree(ROOT / "csrc", destination / "csrc")


def run_probe(tree: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), TORCH_EXTENSIONS_DIR=str(cache))
    return subprocess.run([sys.executable, "-c", PROBE, str(tree)], env=env, cwd=tree,
                          capture_output=True, text=True, timeout=600)


def test_missing_extension_and_sources_is_a_clear_error(tmp_path):
    copy_package(tmp_path, with_sources=False)
    result = run_probe(tmp_path, tmp_path / "cache")
    assert result.returncode != 0
    assert "compiled extension lstm_fused._C is missing" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_jit_build_from_source_tree(tmp_path):
    pytest.importorskip("ninja")
    copy_package(tmp_path, with_sources=True)
    result = run_probe(tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    assert any((tmp_path / "cache").rglob("*.so")), "no extension was built in the cache directory"
