"""Does `ann2snn convert` scale to a 3B model? Wall time and peak memory on a Qwen2.5-3B-shaped checkpoint.

    python benchmarks/scale.py [--work DIR] [--calib-samples 8] [--seq-len 128] [--skip-ann] [--skip-convert]
                               [--layers 36] [--layer-by-layer]

``--layers N`` builds (and caches separately) the same configuration with N
decoder layers instead of 36: a quicker check of memory changes, not the
benchmark (the embedding and the process's fixed memory weigh more in a
shallower model's ratio).

1. Builds once (cached in ``--work``) a *randomly initialised* checkpoint with the
   Qwen2.5-3B configuration (hidden 2048, 36 layers, 16 heads, 2 key/value
   heads, intermediate 11008, vocab 151936, tied embeddings, rope θ 1e6),
   saved by ``save_pretrained`` in bf16 safetensors shards of at most 2 GB, with
   the embedded qwen2-tiny tokenizer beside it (its ids, < 2048, are valid ids of
   the 151936-entry embedding). The model is built on the meta device and
   materialised in bf16, so building holds the weights once. Nothing is timed.
2. In a fresh subprocess, the ANN alone: load (``from_pretrained``, bf16), then
   ``torch.no_grad`` forward passes over exactly the windows ``convert`` would
   calibrate on (``token_windows`` of the bundled text, same seed), batch 4.
3. In a fresh subprocess, the CLI:
   ``python -m ann2snn.cli convert CKPT --out OUT --calib-samples N --seq-len L --dtype bfloat16``.

Each subprocess is reaped with ``os.wait4``, whose rusage gives that process's
own peak RSS (``ru_maxrss``, the kernel's high-water mark; file-backed pages of
mmapped safetensors count too). While it runs, a sampler thread polls its RSS
(psutil) and the output folder, and the child's stderr (tqdm progress) is read
line by line with timestamps, so the convert is split into phases:

    load        start → transformers' "Loading weights" bar at 100 % (imports, from_pretrained)
    prepare     → first "calibrating" progress output (check_finite, tokenizer, token_windows)
    calibrate   → "calibrating" reaches 100 %
    stats       → the resumable ``.OUT.calibration.safetensors`` exists (save_statistics)
    build       → the hidden ``.OUT.partial-PID`` export folder appears (thresholds / MSE search, module swap)
    export      → the process exits (state dict, safetensors shards, sha256, fsync, rename)

Targets printed at the end: peak RSS ≤ 1.3 × checkpoint size on disk, and
convert wall time ≤ 3 × the ANN's forward time over the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "ann2snn" / "data" / "qwen2-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

QWEN25_3B = dict(
    hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
    hidden_act="silu", max_window_layers=36, use_sliding_window=False,
    bos_token_id=0, eos_token_id=0,  # the qwen2-tiny tokenizer's <|endoftext|>
)
if os.environ.get("ANN2SNN_SCALE_SMOKE") == "1":  # a quick check of this script itself, not a measurement
    QWEN25_3B.update(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
TARGET_RSS = 1.3
TARGET_WALL = 3.0


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- workers (run in subprocesses)


def worker_build(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_3B)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    std = config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head is the embedding: listed once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB", safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, tmp / name)
    params = sum(p.numel() for p in model.parameters())
    (tmp / "BUILD.json").write_text(json.dumps({"parameters": params, "config": QWEN25_3B, "random_init_std": std}, indent=2))
    os.replace(tmp, folder)
    print(json.dumps({"parameters": params}))


def worker_ann(folder: Path, samples: int, seq_len: int, batch: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from ann2snn.calibration.data import read_texts, token_windows
    from ann2snn.models import check_finite
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True,
                                                 use_safetensors=True, attn_implementation="sdpa").eval()
    t1 = time.perf_counter()
    check_finite(model)  # what ann2snn's load_ann adds to from_pretrained
    t2 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(None), seq_len, samples, 0)  # the windows convert calibrates on
    t3 = time.perf_counter()
    batches = []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            b0 = time.perf_counter()
            model(input_ids=windows[start:start + batch], use_cache=False)
            batches.append(time.perf_counter() - b0)
            print(f"ann batch {len(batches)}: {batches[-1]:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps({"from_pretrained_s": t1 - t0, "check_finite_s": t2 - t1, "tokenize_s": t3 - t2,
                      "forward_s": sum(batches), "batches_s": batches, "tokens": int(windows.numel()),
                      "windows": list(windows.shape)}))


# ----------------------------------------------------------------------------- the parent: run and watch a subprocess


class Watched:
    """A subprocess with its peak RSS (wait4), an RSS timeline and timestamped stderr lines."""

    def __init__(self, argv: list[str], watch_dir: Path | None = None, out_name: str | None = None, echo: bool = True):
        import psutil

        self.argv = argv
        self.lines: list[tuple[float, str]] = []
        self.samples: list[tuple[float, int]] = []
        self.events: dict[str, float] = {}
        self.t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._ps = psutil.Process(self.proc.pid)
        self._done = threading.Event()
        self._stdout: list[bytes] = []
        self._watch_dir, self._out_name, self._echo = watch_dir, out_name, echo
        self._threads = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self):
        self._stdout.append(self.proc.stdout.read())

    def _read_stderr(self):
        while True:
            chunk = self.proc.stderr.read1(4096) if hasattr(self.proc.stderr, "read1") else self.proc.stderr.read(1)
            if not chunk:
                break
            # tqdm writes "\r<line>" and flushes, with no terminator until the next update: take every
            # chunk as complete (a line split across two reads shows as two fragments; harmless here).
            for part in re.split(rb"[\r\n]", chunk):
                self._line(part)

    def _line(self, raw: bytes):
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return
        t = time.perf_counter() - self.t0
        if self.lines and self.lines[-1][1] == text:
            return
        self.lines.append((t, text))
        if "Loading weights" in text and "100%" in text:
            self.events.setdefault("weights_loaded", t)
        if "calibrating" in text:
            self.events.setdefault("calibrate_start", t)
            if "100%" in text:
                self.events.setdefault("calibrate_end", t)
        if self._echo:
            print(f"    [{t:7.1f}s] {text[:160]}", flush=True)

    def _sample(self):
        while not self._done.is_set():
            t = time.perf_counter() - self.t0
            try:
                self.samples.append((t, self._ps.memory_info().rss))
            except Exception:
                pass
            if self._watch_dir is not None and self._watch_dir.is_dir():
                try:
                    names = os.listdir(self._watch_dir)
                except OSError:
                    names = []
                out = self._out_name
                if f".{out}.calibration.safetensors" in names:
                    self.events.setdefault("stats_saved", t)
                if any(n.startswith(f".{out}.partial-") for n in names):
                    self.events.setdefault("export_start", t)
            self._done.wait(0.25)

    def wait(self) -> dict:
        _, status, usage = os.wait4(self.proc.pid, 0)
        wall = time.perf_counter() - self.t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=10)
        return {"rc": self.proc.returncode, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024,
                "stdout": b"".join(self._stdout).decode("utf-8", "replace")}

    def peak_between(self, start: float, end: float) -> int:
        values = [rss for t, rss in self.samples if start <= t <= end]
        return max(values) if values else 0


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in the worker's output:\n{text[-2000:]}")


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ann2snn-scale"), help="cache folder for the checkpoint and the export")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="ANN forward batch (convert calibrates with batch 4)")
    parser.add_argument("--skip-ann", action="store_true")
    parser.add_argument("--skip-convert", action="store_true")
    parser.add_argument("--layers", type=int, default=QWEN25_3B["num_hidden_layers"],
                        help="decoder layers of the random checkpoint (36 = Qwen2.5-3B; fewer for a quick check)")
    parser.add_argument("--keep-export", action="store_true", help="keep the converted export (else deleted to free disk)")
    parser.add_argument("--layer-by-layer", action="store_true", help="convert with --layer-by-layer (one decoder layer in memory)")
    parser.add_argument("--_worker", choices=["build", "ann"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.layers != QWEN25_3B["num_hidden_layers"]:
        QWEN25_3B.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
    ckpt = args.work / ("qwen2.5-3b-random" if args.layers == 36 else f"qwen2.5-3b-random-{args.layers}layers")
    if args._worker == "build":
        return worker_build(ckpt)
    if args._worker == "ann":
        return worker_ann(ckpt, args.calib_samples, args.seq_len, args.batch)

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(args.work), "--layers", str(args.layers)]
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}", flush=True)
    if not (ckpt / "BUILD.json").is_file():
        print(f"building the random Qwen2.5-3B-shaped checkpoint in {ckpt} (not timed) …", flush=True)
        run = Watched(me + ["--_worker", "build"])
        result = run.wait()
        if result["rc"] != 0:
            sys.exit(f"build failed (rc {result['rc']})")
        print(f"  built in {result['wall_s']:.0f} s, builder peak RSS {gib(result['peak_rss'])}", flush=True)
    build = json.loads((ckpt / "BUILD.json").read_text())
    size, weights = checkpoint_bytes(ckpt), weight_bytes(ckpt)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    print(f"checkpoint {ckpt}: {build['parameters'] / 1e9:.3f} B parameters, {len(shards)} shards, "
          f"{gib(size)} on disk ({gib(weights)} of safetensors)", flush=True)

    ann = None
    if not args.skip_ann:
        print(f"\n[ANN] load + forward over {args.calib_samples} × {args.seq_len} tokens, batch {args.batch}, bf16 …", flush=True)
        run = Watched(me + ["--_worker", "ann", "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
                            "--batch", str(args.batch)])
        result = run.wait()
        if result["rc"] != 0:
            sys.exit(f"ANN worker failed (rc {result['rc']})")
        ann = last_json(result["stdout"]) | {"wall_s": result["wall_s"], "peak_rss": result["peak_rss"]}
        print(f"  from_pretrained {ann['from_pretrained_s']:.1f} s, check_finite {ann['check_finite_s']:.1f} s, "
              f"forward {ann['forward_s']:.1f} s ({', '.join(f'{b:.1f}' for b in ann['batches_s'])} s per batch), "
              f"{ann['tokens'] / ann['forward_s']:.1f} tokens/s; process peak RSS {gib(ann['peak_rss'])}", flush=True)

    conv = None
    if not args.skip_convert:
        out = args.work / "snn"
        for stale in [out, *args.work.glob(f".{out.name}.*")]:  # no resume: calibrate from scratch
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "ann2snn.cli", "convert", str(ckpt), "--out", str(out),
                "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--dtype", "bfloat16"]
        argv += ["--layer-by-layer"] if args.layer_by_layer else []
        print(f"\n[convert] {' '.join(argv[1:])}", flush=True)
        run = Watched(argv, watch_dir=args.work, out_name=out.name)
        result = run.wait()
        conv = result | {"events": run.events}
        print(f"  rc {result['rc']}, wall {result['wall_s']:.1f} s, peak RSS {gib(result['peak_rss'])}", flush=True)
        if result["stdout"].strip():
            print("  stdout: " + result["stdout"].strip()[-500:], flush=True)
        marks = [("start", 0.0)] + [(k, run.events[k]) for k in ("weights_loaded", "calibrate_start", "calibrate_end", "stats_saved", "export_start")
                                    if k in run.events] + [("exit", result["wall_s"])]
        names = {"weights_loaded": "load", "calibrate_start": "prepare", "calibrate_end": "calibrate", "stats_saved": "stats", "export_start": "build", "exit": "export"}
        print("  phases (end of each from progress output / files; RSS peak from 0.25 s psutil samples):")
        for (_, begin), (key, end) in zip(marks, marks[1:]):
            print(f"    {names[key]:<10} {end - begin:8.1f} s   (ends at {end:7.1f} s)   RSS peak {gib(run.peak_between(begin, end))}")
        if out.is_dir():
            print(f"  export {out}: {gib(checkpoint_bytes(out))} ({', '.join(sorted(p.name for p in out.iterdir()))})")
            if not args.keep_export:
                shutil.rmtree(out)
        conv["timeline"] = run.samples[:: max(1, len(run.samples) // 400)]

    print("\n==== summary ====")
    print(f"checkpoint on disk            {gib(size)}  ({gib(weights)} safetensors, {len(shards)} shards)")
    if ann:
        print(f"ANN load (from_pretrained)    {ann['from_pretrained_s']:.1f} s  (+ check_finite {ann['check_finite_s']:.1f} s)")
        print(f"ANN forward ({ann['tokens']} tokens)     {ann['forward_s']:.1f} s   (ANN process peak RSS {gib(ann['peak_rss'])})")
    if conv:
        print(f"convert wall                  {conv['wall_s']:.1f} s   (rc {conv['rc']})")
        print(f"convert peak RSS              {gib(conv['peak_rss'])}")
        rss_ratio = conv["peak_rss"] / size
        print(f"peak RSS / checkpoint         {rss_ratio:.2f}   target ≤ {TARGET_RSS}  {'OK' if rss_ratio <= TARGET_RSS else 'MISSED'}")
        if ann:
            wall_ratio = conv["wall_s"] / ann["forward_s"]
            print(f"convert wall / ANN forward    {wall_ratio:.2f}   target ≤ {TARGET_WALL}  {'OK' if wall_ratio <= TARGET_WALL else 'MISSED'}")
    record = {"checkpoint_bytes": size, "ann": ann, "convert": conv}
    (args.work / "scale_result.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"(raw numbers and the RSS timeline: {args.work / 'scale_result.json'})")


if __name__ == "__main__":
    main()
