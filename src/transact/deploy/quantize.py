"""llama.cpp's own quantizer: ``llama-quantize`` (every GGUF type llama.cpp runs, with its per-tensor type
mixes such as Q4_K_M) and ``llama-imatrix`` (the importance matrix that guides it, from calibration text).

Neither tool is part of a Python wheel. They are compiled once, into the cache, from the llama.cpp tree in
the pinned xllamacpp release's source distribution: the same commit as the runtime that loads the files
and the converter that writes their unquantized input (``transact.deploy.llamacpp``). Building needs cmake
and a C++17 compiler (a few minutes on 2 cores; ``scripts/install.sh`` does it).

Quantized types need a matrix's input width (GGUF's ``ne[0]``) to be a multiple of the type's block:
256 for the K-quants and IQ4_XS, 32 for the others. llama.cpp quantizes a tensor that is not with a
fallback type (``FALLBACK``), and a tensor that fits neither in F16; ``width_warnings`` says so before
any work, for the widths pruning changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transact.deploy import deci_gguf, llamacpp
from transact.deploy.llamacpp import CONVERTER_TYPES, XLLAMACPP_VERSION, default_threads
from transact.errors import TransactError

if TYPE_CHECKING:
    from transact.arch import ModelShape

TOOLS = ("llama-quantize", "llama-imatrix")
TOOLS_ENV = "TRANSACT_LLAMACPP_TOOLS"

# transact's --outtype name -> (llama-quantize's type name, the block its main matrices need)
QUANT_TYPES = {
    "q4_0": ("Q4_0", 32), "q4_1": ("Q4_1", 32), "q5_0": ("Q5_0", 32), "q5_1": ("Q5_1", 32),
    "iq4_nl": ("IQ4_NL", 32),
    "q2_k": ("Q2_K", 256), "q3_k_s": ("Q3_K_S", 256), "q3_k_m": ("Q3_K_M", 256), "q3_k_l": ("Q3_K_L", 256),
    "q4_k_s": ("Q4_K_S", 256), "q4_k_m": ("Q4_K_M", 256), "q5_k_s": ("Q5_K_S", 256), "q5_k_m": ("Q5_K_M", 256),
    "q6_k": ("Q6_K", 256), "iq4_xs": ("IQ4_XS", 256),
}
# what llama.cpp writes instead when a matrix's input width is not a multiple of the block (llama-quant.cpp)
FALLBACK = {"q2_k": "Q4_0", "q3_k": "Q4_0", "q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0", "iq4_xs": "IQ4_NL"}
# the source tree minus what no build reads (model vocabularies, docs, pictures: 115 of its 180 MB)
_SKIP_DIRS = ("models/", "docs/", "media/")
_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON",
)


OUTTYPES = (*CONVERTER_TYPES, *QUANT_TYPES)


def check_outtypes(outtypes: tuple[str, ...] | list[str]) -> None:
    """Refuse an empty list or a type llama.cpp does not write (before any work starts)."""
    unknown = [t for t in outtypes if t not in OUTTYPES]
    if unknown or not outtypes:
        raise TransactError(f"unknown --outtype {','.join(unknown) or '(none)'}; llama.cpp writes: "
                            f"{', '.join(OUTTYPES)}")


def is_quantized_type(outtype: str) -> bool:
    return outtype in QUANT_TYPES


IMATRIX_AUTO = "auto"  # --imatrix's default
IMATRIX_NONE = "none"


def imatrix_source(imatrix: str | None, outtype: str) -> str | None:
    """The text a file of ``outtype`` gets its importance matrix from, given ``--imatrix``: only the quantizer's
    types take one; ``auto`` is the built-in calibration text (it lowered perplexity in every file measured,
    docs/results.md "Importance matrices on three models"), ``none`` (or None) is none."""
    if not is_quantized_type(outtype) or imatrix in (None, IMATRIX_NONE):
        return None
    return "builtin" if imatrix == IMATRIX_AUTO else imatrix


def names_imatrix_text(imatrix: str | None) -> bool:
    """Whether ``--imatrix`` names a text (to check before any work), not ``auto`` or ``none``."""
    return imatrix not in (None, IMATRIX_AUTO, IMATRIX_NONE)


def block_of(outtype: str) -> int:
    """The input width every main matrix must be a multiple of for ``outtype`` to apply to it unchanged."""
    return QUANT_TYPES[outtype][1] if outtype in QUANT_TYPES else (32 if outtype == "q8_0" else 1)


def fallback_of(outtype: str, width: int) -> str:
    """The type llama.cpp writes for a matrix of input ``width`` asked to be ``outtype`` ('' = no fallback)."""
    block = block_of(outtype)
    if width % block == 0:
        return ""
    if block == 256:
        family = outtype[:4] if outtype.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")) else outtype
        fallback = FALLBACK[family]
        return fallback if width % 32 == 0 else "F16"
    return "F16"


HIDDEN_MATRICES = "blk.*.attn_q/k/v, ffn_gate/up, output"  # the matrices that read the hidden state


@dataclass(frozen=True)
class WidthWarning:
    tensor: str  # llama.cpp's tensor name pattern, e.g. "blk.*.ffn_down"
    width: int
    outtype: str
    fallback: str

    def __str__(self) -> str:
        block = block_of(self.outtype)
        fix = (f"prune with --multiple-of {block} to avoid it" if self.tensor != HIDDEN_MATRICES else
               "the hidden size is never pruned: this is the model's own")
        return (f"{self.tensor}: input width {self.width} is not a multiple of {block}, so llama.cpp writes it as "
                f"{self.fallback} instead of {QUANT_TYPES.get(self.outtype, (self.outtype,))[0]} ({fix})")


def matrix_widths(shape: ModelShape) -> dict[str, int]:
    """The input width of each kind of weight matrix llama.cpp quantizes, by its GGUF tensor name pattern:
    the attention output takes heads x head_dim, the MLP's down projection the MLP (or expert) width, every
    other matrix the hidden size."""
    widths = {HIDDEN_MATRICES: shape.hidden_size,
              "blk.*.attn_output": shape.num_heads * shape.head_dim,
              "blk.*.ffn_down" + ("_exps" if shape.is_moe else ""): shape.intermediate_size}
    if shape.shared_expert_size is not None:
        widths["blk.*.ffn_down_shexp"] = shape.shared_expert_size
    return widths


def width_warnings(widths: dict[str, int], outtype: str) -> list[WidthWarning]:
    """Which matrices a quantized ``outtype`` cannot take as asked. ``widths``: tensor pattern -> input width
    (heads x head_dim for ``attn_output``, the MLP width for ``ffn_down``, the hidden size for the rest)."""
    return [WidthWarning(name, w, outtype, fb) for name, w in widths.items() if (fb := fallback_of(outtype, w))]


def fit_notes(widths: dict[str, int], stepped: Collection[str] = ()) -> list[str]:
    """One line per matrix kind whose input width some llama.cpp quantized type cannot take as asked: what
    falls back for the 32-block types (q8_0, q4_0, iq4_nl, ...) and for the 256-block K-quants (q4_k_m, ...).
    A tensor in ``stepped`` has per-layer widths in steps of its width (a per-layer search), so some layers
    may fall back."""
    lines = []
    for tensor, width in widths.items():
        block = 32 if width % 32 else 256 if width % 256 else None
        if block is None:
            continue
        what = (f"per-layer input widths in steps of {width}: in a layer whose width is not a multiple of {block}"
                if tensor in stepped else f"input width {width}, not a multiple of {block}:")
        lines.append(f"llama.cpp: {tensor} has {what} " + (
            "every quantized type (q8_0, q4_0, q4_k_m, ...) stores it in F16" if block == 32 else
            f"the K-quants store it in their fallback type (q4_k_m: {fallback_of('q4_k_m', width)}, q6_k: "
            f"{fallback_of('q6_k', width)})"))
    return lines


# ---------------------------------------------------------------- building the tools


def tools_dir(*, progress: bool = True) -> Path:
    """The directory holding ``llama-quantize`` and ``llama-imatrix`` (built once into the cache).

    ``$TRANSACT_LLAMACPP_TOOLS`` may point at a directory of prebuilt llama.cpp tools instead (their version
    is then the user's responsibility)."""
    if custom := os.environ.get(TOOLS_ENV):
        path = Path(custom).expanduser()
        missing = [t for t in TOOLS if not (path / t).is_file()]
        if missing:
            raise TransactError(f"${TOOLS_ENV}={custom} holds no {', '.join(missing)}")
        return path
    from transact.io.assets import cache_dir

    target = cache_dir() / f"llama.cpp-tools-{XLLAMACPP_VERSION}"
    if all((target / t).is_file() for t in TOOLS):
        return target
    _check_build_tools()
    _build(target, progress=progress)
    return target


def _check_build_tools() -> None:
    missing = [name for name, found in (("cmake", shutil.which("cmake")),
                                        ("a C++ compiler (c++)", shutil.which("c++") or shutil.which("g++")))
               if not found]
    if missing:
        raise TransactError(f"building llama.cpp's quantizer needs {' and '.join(missing)} (e.g. `apt install "
                            f"cmake g++`), or set ${TOOLS_ENV} to a directory with prebuilt {' and '.join(TOOLS)}")


def _build(target: Path, *, progress: bool) -> None:
    from transact.io.files import replace_dir, staging_dir

    data = llamacpp.llamacpp_sdist(progress=progress)
    prefix = f"xllamacpp-{XLLAMACPP_VERSION}/thirdparty/llama.cpp/"
    with tempfile.TemporaryDirectory(prefix="transact-llama.cpp-") as work:
        source, build = Path(work) / "src", Path(work) / "build"
        _extract_tree(data, prefix, source)
        if progress:
            print(f"building llama.cpp's {' and '.join(TOOLS)} (llama.cpp of xllamacpp {XLLAMACPP_VERSION}; a few "
                  "minutes, once) ...", file=sys.stderr)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, *_CMAKE_FLAGS], "configure")
        _run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(default_threads())], "build")
        tmp = staging_dir(target)
        try:
            for tool in TOOLS:
                shutil.copy2(build / "bin" / tool, tmp / tool)
            shutil.copy2(source / "LICENSE", tmp / "LICENSE")
            replace_dir(tmp, target)  # with the usual modes; the tools stay executable
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _extract_tree(data: bytes, prefix: str, dest: Path) -> None:
    import io

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if rel and not rel.startswith(_SKIP_DIRS) and (member.isfile() or member.isdir()):
                member.name = rel
                tar.extract(member, dest, filter="data")


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise TransactError(f"llama.cpp's quantizer: the {what} step failed:\n{tail}")


# ---------------------------------------------------------------- running them


def write_gguf(model_dir: Path, out_file: Path, outtype: str, *, imatrix_text: str | None = None,
               imatrix_chunks: int = 32, threads: int | None = None, progress: bool = True) -> dict:
    """``model_dir`` as a GGUF file of ``outtype``: the converter's output, or for a quantized type llama.cpp's
    quantizer run on the converter's output in the checkpoint's own precision (so weights are rounded once),
    guided by an importance matrix over ``imatrix_text`` if given. Returns what was done: the quantizer's
    fallbacks (tensors written in another type than asked) and the importance matrix's size."""
    if not (is_quantized_type(outtype) or _quantized_by_the_tool(model_dir, outtype)):
        llamacpp.convert(model_dir, out_file, outtype, progress=progress)
        return {}
    source_type = unquantized_type(model_dir)
    with tempfile.TemporaryDirectory(prefix=".transact-gguf-", dir=out_file.parent) as work:
        unquantized = Path(work) / f"model.{source_type}.gguf"
        llamacpp.convert(model_dir, unquantized, source_type, progress=progress)
        done: dict = {"quantized_from": source_type}
        imatrix = None
        if imatrix_text is not None:
            # llama-imatrix reads whole 512-token chunks; ~8 characters a token leaves it enough text
            imatrix = importance_matrix(unquantized, imatrix_text[:imatrix_chunks * 512 * 8],
                                        Path(work) / "imatrix.gguf", chunks=imatrix_chunks, threads=threads,
                                        progress=progress)
            done["imatrix_chunks"] = imatrix_chunks
        done["fallbacks"] = quantize(unquantized, out_file, outtype, imatrix=imatrix, threads=threads,
                                     progress=progress)
    return done


def _quantized_by_the_tool(model_dir: Path, outtype: str) -> bool:
    """q8_0 of per-layer widths: the converter writes q8_0 itself for other checkpoints, but a per-layer file is
    rewritten from its uniform twin tensor by tensor (``deci_gguf``), which only unquantized tensors allow; so
    llama-quantize rounds the rewritten file."""
    return outtype == "q8_0" and deci_gguf.is_per_layer(model_dir)


def unquantized_type(model_dir: Path) -> str:
    """The converter type that holds a checkpoint's weights exactly: f32, bf16 or f16 by its config's dtype."""
    values = json.loads((model_dir / "config.json").read_text())
    dtype = str(values.get("dtype") or values.get("torch_dtype") or "float32")
    return {"float32": "f32", "bfloat16": "bf16"}.get(dtype, "f16")


def quantize(source: Path, out_file: Path, outtype: str, *, imatrix: Path | None = None,
             threads: int | None = None, progress: bool = True) -> list[str]:
    """``llama-quantize`` an unquantized GGUF (f32/f16/bf16) into ``outtype``; returns llama.cpp's fallback
    warnings (one line per tensor written in another type than asked)."""
    names = {"q8_0": "Q8_0", **{name: kind for name, (kind, _) in QUANT_TYPES.items()}}
    if outtype not in names:
        raise TransactError(f"{outtype!r} is not a llama.cpp quantization type; known: {', '.join(names)}")
    tool = tools_dir(progress=progress) / "llama-quantize"
    cmd = [str(tool)]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(source), str(out_file), names[outtype], str(threads or default_threads())]
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join(log.strip().splitlines()[-12:])
        raise TransactError(f"llama.cpp's quantizer failed on {source.name} ({outtype}):\n{tail}")
    return [line.strip() for line in log.splitlines() if "falling back to" in line]


def importance_matrix(gguf_file: Path, text: str, out_file: Path, *, context: int = 512, chunks: int | None = None,
                      threads: int | None = None, progress: bool = True) -> Path:
    """``llama-imatrix`` over ``text`` with the (unquantized) model: the mean squared activation each weight
    column multiplies, which llama-quantize uses to weigh its rounding error."""
    tool = tools_dir(progress=progress) / "llama-imatrix"
    with tempfile.TemporaryDirectory(prefix="transact-imatrix-") as work:
        text_file = Path(work) / "calibration.txt"
        text_file.write_text(text, encoding="utf-8")
        cmd = [str(tool), "-m", str(gguf_file), "-f", str(text_file), "-o", str(out_file), "-c", str(context),
               "-t", str(threads or default_threads()), "--no-ppl"]
        if chunks is not None:
            cmd += ["--chunks", str(chunks)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-12:])
        raise TransactError(f"llama.cpp's importance matrix failed:\n{tail}")
    return out_file
