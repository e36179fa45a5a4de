"""llama.cpp: its own Hugging Face → GGUF converter, and its runtime, both from one pinned release.

The runtime is ``xllamacpp`` (a prebuilt CPU build of llama.cpp on PyPI, run in-process). Its source
distribution on PyPI carries the llama.cpp tree the wheel was compiled from, including
``convert_hf_to_gguf.py``, its ``conversion/`` package and ``gguf-py``; transact takes the converter from
there, so the converter and the runtime always come from the same llama.cpp commit. The converter files
are fetched once from PyPI (checked against a pinned SHA-256) into the cache and run as a subprocess,
which keeps its own ``gguf-py`` (newer than the ``gguf`` release transformers reads GGUF with) apart.

Which llama.cpp architecture a checkpoint becomes, and how its config.json is presented to the converter
for that, is family knowledge: each family adapter's ``gguf`` rule (``transact.arch``) says.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from transformers import PretrainedConfig

from transact.arch import GgufTarget, get_adapter
from transact.deploy import deci_gguf
from transact.errors import TransactError
from transact.extras import require

XLLAMACPP_VERSION = "2026.10.11549"
_SDIST = (
    "https://files.pythonhosted.org/packages/87/62/b6dfaaf346d3d4fd0e2a2df755f2693b77673f2735da7ba0592af9d2f09e/"
    f"xllamacpp-{XLLAMACPP_VERSION}.tar.gz"
)
_SDIST_SHA256 = "c17ee1163006f70726abb9f72137830818f3d8cb60bfc34cb232d08428eaa22b"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
CONVERTER_ENV = "TRANSACT_LLAMACPP_CONVERTER"

# The converter's own output types; the others are made from its output by llama.cpp's quantizer
# (``transact.deploy.quantize``, built from the same llama.cpp tree).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")


# ---------------------------------------------------------------- the converter


def runtime_version() -> str:
    """The installed xllamacpp release (llama.cpp's runtime); a clear error naming the extra if absent."""
    from importlib.metadata import version

    require("gguf", "llama.cpp support")
    return version("xllamacpp")


def converter_dir(*, progress: bool = True) -> Path:
    """The directory holding llama.cpp's ``convert_hf_to_gguf.py`` (fetched once into the cache).

    ``$TRANSACT_LLAMACPP_CONVERTER`` may point at a llama.cpp checkout instead (its version is then the
    user's responsibility)."""
    if custom := os.environ.get(CONVERTER_ENV):
        path = Path(custom).expanduser()
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise TransactError(f"${CONVERTER_ENV}={custom} holds no convert_hf_to_gguf.py")
        return path
    from transact.io.assets import cache_dir

    target = cache_dir() / f"llama.cpp-converter-{XLLAMACPP_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    _fetch_converter(target, progress=progress)
    return target


def llamacpp_sdist(*, progress: bool = True) -> bytes:
    """The pinned xllamacpp source distribution (llama.cpp's tree inside), checked against its SHA-256;
    kept in the cache once downloaded, since the converter and the quantizer tools both come from it."""
    from transact.io.assets import cache_dir
    from transact.io.files import move_into_place, staging_file

    kept = cache_dir() / f"xllamacpp-{XLLAMACPP_VERSION}.tar.gz"
    if kept.is_file() and hashlib.sha256(data := kept.read_bytes()).hexdigest() == _SDIST_SHA256:
        return data
    if progress:
        print(f"fetching llama.cpp's source (xllamacpp {XLLAMACPP_VERSION}, 38 MB) from PyPI ...", file=sys.stderr)
    try:
        with urllib.request.urlopen(_SDIST, timeout=120) as response:
            data = response.read()
    except OSError as e:
        raise TransactError(f"could not download llama.cpp's source from PyPI ({e}); set ${CONVERTER_ENV} "
                            "to a llama.cpp checkout to work offline") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != _SDIST_SHA256:
        raise TransactError(f"the downloaded xllamacpp source has SHA-256 {digest}, expected {_SDIST_SHA256}")
    tmp = staging_file(kept)
    try:
        tmp.write_bytes(data)
        move_into_place(tmp, kept)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def _fetch_converter(target: Path, *, progress: bool) -> None:
    from transact.io.files import staging_dir

    data = llamacpp_sdist(progress=progress)
    prefix = f"xllamacpp-{XLLAMACPP_VERSION}/thirdparty/llama.cpp/"
    tmp = staging_dir(target)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if rel and member.isfile() and rel.startswith(_CONVERTER_PARTS):
                    member.name = rel
                    tar.extract(member, tmp, filter="data")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_target(config: PretrainedConfig) -> GgufTarget:
    """How the family's adapter has llama.cpp's converter take a checkpoint of this config."""
    return get_adapter(config).gguf_target(config)


def gguf_architecture(config: PretrainedConfig) -> str:
    """The llama.cpp architecture a checkpoint of this config is converted to."""
    return gguf_target(config).architecture


def _conversion_input(model_dir: Path, work: Path, target: GgufTarget) -> Path:
    """``model_dir`` itself, or a directory of links to its files whose config.json carries the keys the
    family's GGUF rule replaces (so that the converter takes the path that computes the same network)."""
    overrides = target.config_overrides
    if not overrides:
        return model_dir
    stage = work / "model"
    stage.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (stage / f.name).symlink_to(f.resolve())
    values = json.loads((model_dir / "config.json").read_text()) | overrides
    (stage / "config.json").write_text(json.dumps(values, indent=1))
    return stage


def convert(model_dir: Path, out_file: Path, outtype: str, *, progress: bool = True) -> None:
    """Run llama.cpp's converter on a Hugging Face directory; writes ``out_file``."""
    if outtype not in CONVERTER_TYPES:
        raise TransactError(f"llama.cpp's converter writes {', '.join(CONVERTER_TYPES)}, not {outtype!r} "
                            "(quantize.write_gguf makes the others)")
    from transformers import AutoConfig

    if deci_gguf.is_per_layer(model_dir):
        _convert_per_layer(model_dir, out_file, outtype, progress=progress)
        return
    target = gguf_target(AutoConfig.from_pretrained(model_dir))
    with tempfile.TemporaryDirectory(prefix="transact-gguf-") as work:
        source = _conversion_input(model_dir, Path(work), target)
        _run_converter(source, out_file, outtype, target.converter_args, progress=progress)


def _run_converter(source: Path, out_file: Path, outtype: str, args: tuple[str, ...] | list[str] = (), *,
                   progress: bool) -> None:
    script = converter_dir(progress=progress) / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(source), "--outfile", str(out_file), "--outtype", outtype, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it ships with
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-12:])
        raise TransactError(f"llama.cpp's converter failed on {source}:\n{tail}")


def _convert_per_layer(model_dir: Path, out_file: Path, outtype: str, *, progress: bool) -> None:
    """A checkpoint of per-layer widths as llama.cpp's ``deci`` (``transact.deploy.deci_gguf``): its uniform
    twin through the converter's Llama path, then rewritten with each layer's own widths."""
    if outtype not in deci_gguf.UNQUANTIZED:
        raise TransactError(f"per-layer widths convert to {', '.join(deci_gguf.UNQUANTIZED)}; q8_0 and the other "
                            f"quantized types are made from those by llama.cpp's quantizer (quantize.write_gguf), "
                            f"not {outtype!r}")
    with tempfile.TemporaryDirectory(prefix="transact-gguf-", dir=out_file.parent) as work:
        twin, widths = deci_gguf.write_twin(model_dir, Path(work) / "twin")
        uniform = Path(work) / "twin.gguf"
        _run_converter(Path(work) / "twin", uniform, outtype, progress=progress)
        deci_gguf.rewrite_as_deci(uniform, out_file, widths, twin["head_dim"])


# ---------------------------------------------------------------- the runtime


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Runtime:
    """One GGUF model loaded in llama.cpp (in-process, through xllamacpp's server core).

    ``slots`` parallel sequences of up to ``context`` tokens each; requests are token ids, so no
    tokenizer difference can enter a comparison."""

    def __init__(self, gguf_file: str | Path, *, context: int = 512, slots: int = 1, threads: int | None = None):
        runtime_version()
        import xllamacpp

        path = Path(gguf_file)
        if not path.is_file():
            raise TransactError(f"{path} does not exist")
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = slots
        params.n_ctx = context * slots
        params.n_batch = params.n_ubatch = min(max(context, 32), 2048)
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or default_threads()
        params.verbosity = -1
        params.warmup = False
        self.path = path
        self.slots = slots
        try:
            self._server = xllamacpp.Server(params)
        except Exception as e:
            raise TransactError(f"llama.cpp could not load {path}: {e}") from None

    def close(self) -> None:
        self._server = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, tokens: list[int], n: int) -> dict:
        """Greedy continuation of ``tokens`` by exactly ``n`` tokens (end-of-generation tokens masked out):
        the server's response, whose ``timings`` hold prompt_ms and predicted_ms."""
        return self._completions(list(map(int, tokens)), n, expected=1)

    def greedy(self, tokens: list[int], n: int) -> tuple[list[int], list[float | None]]:
        """Up to ``n`` greedy tokens after ``tokens`` (ending early at end-of-generation), with llama.cpp's
        log-probability of each (None where the server reports none).

        The server leaves out the probability entry of a token that completes a multi-byte UTF-8
        character, so its entries are matched to the generated tokens in order."""
        response = self._post("/completion", {"prompt": list(map(int, tokens)), "n_predict": n, "temperature": 0.0,
                                              "n_probs": 1, "return_tokens": True, "cache_prompt": False})
        generated = list(response["tokens"])
        logprobs: list[float | None] = [None] * len(generated)
        position = 0
        for entry in response.get("completion_probabilities", []):
            while position < len(generated) and generated[position] != entry["id"]:
                position += 1
            if position < len(generated):
                logprobs[position] = entry["logprob"]
                position += 1
        return generated, logprobs

    def complete_batch(self, prompts: list[list[int]], n: int) -> float:
        """Greedy continuations of all ``prompts`` by ``n`` tokens each, sent as one request (the server
        queues them together and batches them across its slots); returns the wall time in seconds."""
        if len(prompts) > self.slots:
            raise TransactError(f"{len(prompts)} sequences need {len(prompts)} slots; this runtime has {self.slots}")
        t0 = time.perf_counter()
        self._completions([list(map(int, p)) for p in prompts], n, expected=len(prompts))
        return time.perf_counter() - t0

    def _completions(self, prompt: list, n: int, *, expected: int) -> dict:
        """One greedy completion request with end-of-generation masked (``n`` tokens per prompt)."""
        request = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True, "cache_prompt": False}
        response = self._server.handle_completions(request)
        if len(response.get("choices", ())) != expected:
            raise TransactError(f"llama.cpp refused a request on {self.path.name}: {response.get('message', response)}")
        return response

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (special tokens as the GGUF says)."""
        return self._post("/tokenize", {"content": text, "add_special": True})["tokens"]

    def _post(self, path: str, body: dict) -> dict:
        """A request to the server's native HTTP API (it listens on a local port while loaded)."""
        request = urllib.request.Request(self._server.listening_address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.loads(response.read())
        except OSError as e:
            raise TransactError(f"llama.cpp's server refused {path} on {self.path.name}: {e}") from None


@contextlib.contextmanager
def runtimes(files: dict[str, Path], **kwargs) -> Iterator[dict[str, Runtime]]:
    """Several models loaded at once, all closed on exit."""
    loaded: dict[str, Runtime] = {}
    try:
        for name, path in files.items():
            loaded[name] = Runtime(path, **kwargs)
        yield loaded
    finally:
        for runtime in loaded.values():
            runtime.close()


# ---------------------------------------------------------------- what a GGUF file costs


def gguf_summary(path: str | Path) -> dict:
    """Architecture, file size and the bytes one decode step reads: every tensor once, except a separate
    token-embedding table, of which a step reads one row (with tied embeddings the table is also the
    output matrix, read whole)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    step = sum(sizes.values())
    if "output.weight" in sizes:
        step -= sizes.get("token_embd.weight", 0)
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    return {
        "architecture": arch,
        "file_bytes": Path(path).stat().st_size,
        "tensor_bytes": sum(sizes.values()),
        "bytes_per_decode_step": step,
        "expert_bytes": sum(size for name, size in sizes.items() if "_exps." in name),  # routed experts
        "matrix_types": sorted(types),
        "head_count": _field(reader, f"{arch}.attention.head_count"),
        "head_count_kv": _field(reader, f"{arch}.attention.head_count_kv"),
        "key_length": _field(reader, f"{arch}.attention.key_length"),
        "block_count": _field(reader, f"{arch}.block_count"),
    }


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()
