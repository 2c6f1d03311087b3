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


def fake_toolkit(directory: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc reports the given release."""
    nvcc = directory / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return directory


def test_cuda_version_mismatch_is_named(tmp_path):
    from lstm_fused import _cuda_build

    toolkit = str(fake_toolkit(tmp_path, "13.0"))
    message = _cuda_build.cuda_mismatch("12.1", toolkit)
    assert "CUDA 12.1" in message and "CUDA 13.0" in message and toolkit in message
    assert "CUDA 12.x toolkit" in message and "LSTM_FUSED_CUDA=0" in message
    assert _cuda_build.cuda_mismatch("13.2", toolkit) is None  # torch's rule: majors agree
    assert _cuda_build.cuda_mismatch(None, toolkit) is None  # a CPU build of torch
    assert _cuda_build.cuda_mismatch("12.1", str(tmp_path / "missing")) is None


def test_cuda_arch_list(monkeypatch):
    from lstm_fused import _cuda_build

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _cuda_build.arch_list("80;90", gpu_visible=False) == "8.0;9.0"
    assert _cuda_build.arch_list("8.6,9.0a", gpu_visible=True) == "8.6;9.0a"
    assert _cuda_build.arch_list(None, gpu_visible=True) is None  # torch asks the GPUs
    assert _cuda_build.arch_list(None, gpu_visible=False) == _cuda_build.DEFAULT_ARCHS
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0")
    assert _cuda_build.arch_list(None, gpu_visible=False) is None


# A CUDA build of torch (as far as lstm_fused can tell) with a toolkit of another major version.
MISMATCH_PROBE = textwrap.dedent("""
    import sys
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in repr(f)]
    sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in repr(h)]
    sys.path_importer_cache.clear()
    import torch
    from torch.utils import cpp_extension
    torch.version.cuda, cpp_extension.CUDA_HOME = "12.1", sys.argv[1]
    try:
        import lstm_fused
    except ImportError as error:
        print(error)
""")


def test_jit_build_with_mismatched_cuda_toolkit_is_a_clear_error(tmp_path):
    pytest.importorskip("ninja")
    copy_package(tmp_path, with_sources=True)
    toolkit = fake_toolkit(tmp_path / "cuda", "13.0")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    env.pop("LSTM_FUSED_CUDA", None)
    result = subprocess.run([sys.executable, "-c", MISMATCH_PROBE, str(toolkit)], env=env,
                            cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built with CUDA 12.1" in result.stdout and "is CUDA 13.0" in result.stdout
    assert "LSTM_FUSED_CUDA=0" in result.stdout
