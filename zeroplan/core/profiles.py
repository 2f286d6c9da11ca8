"""Model and GPU profiles: data files under profiles/, validated once on load.

A model profile names its vision tower (a file under zeroplan/profiles/vision/ or an inline [vision]
table), the projector's downsample ratio and the LLM's shapes. Derived numbers (parameter
counts) are computed in zeroplan.core.params, never typed into a profile.
"""

from __future__ import annotations

import dataclasses

import json
import math
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from zeroplan.core.bounded import read_text_bounded
from zeroplan.core.errors import InvalidProfile, UnknownGPU, UnknownModel

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_GPU = "a100-80gb"
LLM_ARCHS = ("qwen2", "llama", "phi3")
NORMS = ("layer_norm", "rms_norm")
MAX_PROFILE_BYTES = 1 << 20
# The most a profile's shape may say: several times the largest models trained (Llama-3 405B has
# 126 layers, hidden 16384, a 128k vocabulary; InternViT-6B 45 layers, 448 px / 14 px tiles), so
# no real model is refused, while a typo like 2^40 layers fails at once instead of making every
# estimate loop for minutes over layers that cannot exist.
SHAPE_LIMITS = {"hidden_size": 1 << 17, "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024,
                "intermediate_size": 1 << 19, "vocab_size": 1 << 22, "head_dim": 4096, "patch_size": 1024,
                "image_size": 8192}
MAX_PATCH_GRID = 256  # image_size / patch_size: 65,536 patches a tile at most
MAX_GPU_MEMORY_BYTES = 1 << 44
# The [calibrated] table: each key, its kind and the range it may take (`zeroplan calibrate`
# writes it; estimate, recommend and generate read it).
CALIBRATED_RANGES: dict[str, tuple[type, float, float]] = {
    "cuda_context_bytes": (int, 0, MAX_GPU_MEMORY_BYTES), "runs": (int, 0, 1 << 40),
    "compute_efficiency": (float, 1e-6, 1.0), "misaligned_gemm_efficiency": (float, 1e-6, 1.0),
    "layer_overhead_s": (float, 0.0, 10.0), "compiled_layer_overhead_s": (float, 0.0, 10.0),
    "recompute_layer_overhead_s": (float, 0.0, 10.0), "step_tensor_overhead_s": (float, 0.0, 10.0),
    "stage3_module_overhead_s": (float, 0.0, 10.0), "layer_gpu_s": (float, 0.0, 10.0),
    "grad_hook_overhead_s": (float, 0.0, 10.0), "overlap_exponent": (float, 1.0, 64.0),
    "allocator_replay_median_error": (float, 0.0, 1e6), "allocator_replay_worst_error": (float, 0.0, 1e6),
}


@dataclass(frozen=True)
class VisionTower:
    """InternViT shapes (transformers' InternVLVisionConfig fields)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    norm: str
    qkv_bias: bool
    qk_norm: bool
    source: str = ""

    @property
    def patches_per_tile(self) -> int:
        """Patch tokens of one tile (the class token not counted)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LanguageModel:
    """The LLM's shapes; `arch` picks the transformers class that builds it."""

    name: str
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool
    tie_word_embeddings: bool
    head_dim: int
    hf_class_note: str = ""
    vocab_source: str = ""


@dataclass(frozen=True)
class ModelProfile:
    """One InternVL model: vision tower, projector (pixel shuffle + MLP) and LLM."""

    name: str
    aliases: tuple[str, ...]
    family: str
    vision: VisionTower
    llm: LanguageModel
    downsample_ratio: float
    internvl_ds_config: str
    source: str
    path: str = ""

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one image tile becomes after the pixel shuffle (256 for 448 px / 14 px)."""
        return round(self.vision.patches_per_tile * self.downsample_ratio**2)

    @property
    def projector_in_features(self) -> int:
        """Width of the pixel-shuffled vision features: hidden * (1/ratio)^2."""
        return self.vision.hidden_size * int(1 / self.downsample_ratio) ** 2


@dataclass(frozen=True)
class GPUProfile:
    """A GPU model's capacity, speed and links; numbers cited in `source`."""

    name: str
    aliases: tuple[str, ...]
    memory_bytes: int
    bf16_dense_tflops: float
    hbm_bandwidth_gbps: float
    intra_node_link: str
    intra_node_bandwidth_gbps: float
    inter_node_bandwidth_gbps: float
    pcie_bandwidth_gbps: float
    cuda_context_bytes: int
    source: str
    calibrated: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    host_memory_bytes_per_node: int = 0  # a typical node's RAM, assumed when neither probed nor stated (0: unknown)
    host_memory_source: str = ""
    host: dict[str, Any] = field(default_factory=dict)  # measured host figures (offload), with a source


def _read_data_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or JSON profile; nothing in it is ever executed."""
    raw = read_text_bounded(path, MAX_PROFILE_BYTES, "profile", InvalidProfile)
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw)
    except (ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidProfile(f"cannot read profile {path}: {reason}") from None
    if not isinstance(data, dict):
        raise InvalidProfile(f"profile {path} must hold a table/object at the top level")
    return data


def _field(data: dict[str, Any], key: str, kind: type, where: str, *, positive: bool = False):
    if key not in data:
        raise InvalidProfile(f"{where}: missing field '{key}'")
    value = data[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidProfile(f"{where}: '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidProfile(f"{where}: '{key}' must be a number, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise InvalidProfile(f"{where}: '{key}' must be finite, got {value!r}")
    if kind in (str, bool) and not isinstance(value, kind):
        raise InvalidProfile(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
    if positive and not value > 0:
        raise InvalidProfile(f"{where}: '{key}' must be positive, got {value!r}")
    if kind is int and value > SHAPE_LIMITS.get(key, 1 << 40):
        raise InvalidProfile(f"{where}: '{key}' is implausibly large ({value}); at most "
                             f"{SHAPE_LIMITS.get(key, 1 << 40)} is accepted")
    return value


def _vision_from(data: dict[str, Any], where: str) -> VisionTower:
    ints = {k: _field(data, k, int, where, positive=True) for k in
            ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "image_size")}
    norm = _field(data, "norm", str, where)
    if norm not in NORMS:
        raise InvalidProfile(f"{where}: 'norm' must be one of {', '.join(NORMS)}, got {norm!r}")
    if ints["hidden_size"] % ints["num_heads"]:
        raise InvalidProfile(f"{where}: hidden_size must be divisible by num_heads")
    if ints["image_size"] % ints["patch_size"]:
        raise InvalidProfile(f"{where}: image_size must be a multiple of patch_size")
    if ints["image_size"] // ints["patch_size"] > MAX_PATCH_GRID:
        raise InvalidProfile(f"{where}: image_size / patch_size is {ints['image_size'] // ints['patch_size']}; "
                             f"at most {MAX_PATCH_GRID} patches a side are accepted")
    return VisionTower(
        name=_field(data, "name", str, where), norm=norm,
        qkv_bias=_field(data, "qkv_bias", bool, where), qk_norm=_field(data, "qk_norm", bool, where),
        source=str(data.get("source", "")), **ints,
    )


def _llm_from(data: dict[str, Any], where: str) -> LanguageModel:
    ints = {k: _field(data, k, int, where, positive=True) for k in
            ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")}
    arch = _field(data, "arch", str, where)
    if arch not in LLM_ARCHS:
        raise InvalidProfile(f"{where}: 'arch' must be one of {', '.join(LLM_ARCHS)}, got {arch!r}")
    if ints["num_heads"] % ints["num_kv_heads"]:
        raise InvalidProfile(f"{where}: num_heads must be a multiple of num_kv_heads")
    head_dim = data.get("head_dim", ints["hidden_size"] // ints["num_heads"])
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 0 < head_dim <= SHAPE_LIMITS["head_dim"]:
        raise InvalidProfile(f"{where}: 'head_dim' must be a positive integer of at most {SHAPE_LIMITS['head_dim']}")
    if "head_dim" not in data and ints["hidden_size"] % ints["num_heads"]:
        raise InvalidProfile(f"{where}: hidden_size must be divisible by num_heads (or give head_dim)")
    return LanguageModel(
        name=_field(data, "name", str, where), arch=arch, head_dim=head_dim,
        qkv_bias=_field(data, "qkv_bias", bool, where),
        tie_word_embeddings=_field(data, "tie_word_embeddings", bool, where),
        hf_class_note=str(data.get("hf_class_note", "")), vocab_source=str(data.get("vocab_source", "")),
        **ints,
    )


def _vision_reference(value: Any, base: Path, where: str) -> VisionTower:
    if isinstance(value, dict):
        return _vision_from(value, f"{where} [vision]")
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value.startswith("."):
        raise InvalidProfile(f"{where}: 'vision' must name a file under zeroplan/profiles/vision/ or be a [vision] table")
    for folder in (base, PROFILES_DIR / "vision"):
        candidate = folder / f"{value}.toml"
        if candidate.is_file():
            return _vision_from(_read_data_file(candidate), str(candidate))
    raise InvalidProfile(f"{where}: vision tower '{value}' not found under zeroplan/profiles/vision/")


def model_from_data(data: dict[str, Any], where: str, base: Path | None = None) -> ModelProfile:
    """Validate a parsed model profile and build the ModelProfile it describes."""
    vision = _vision_reference(data.get("vision"), base or PROFILES_DIR / "vision", where)
    llm_data = data.get("llm")
    if not isinstance(llm_data, dict):
        raise InvalidProfile(f"{where}: missing [llm] table")
    ratio = _field(data, "downsample_ratio", float, where, positive=True)
    if ratio > 1 or abs(1 / ratio - round(1 / ratio)) > 1e-9:
        raise InvalidProfile(f"{where}: 'downsample_ratio' must be 1/n (InternVL uses 0.5), got {ratio}")
    grid = vision.image_size // vision.patch_size
    if grid % round(1 / ratio):
        raise InvalidProfile(f"{where}: the {grid}x{grid} patch grid cannot be pixel-shuffled by {ratio}")
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise InvalidProfile(f"{where}: 'aliases' must be a list of strings")
    return ModelProfile(
        name=_field(data, "name", str, where), aliases=tuple(aliases), family=str(data.get("family", "")),
        vision=vision, llm=_llm_from(llm_data, f"{where} [llm]"), downsample_ratio=float(ratio),
        internvl_ds_config=str(data.get("internvl_ds_config", "")), source=str(data.get("source", "")),
        path=where,
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


HF_ORGANISATION = "opengvlab"  # the Hugging Face organisation whose model ids resolve to bundled profiles


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", ".")


@lru_cache(maxsize=1)
def _model_index() -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted((PROFILES_DIR / "models").glob("*.toml")):
        data = _read_data_file(path)
        for key in [data.get("name", path.stem), path.stem, *data.get("aliases", [])]:
            index.setdefault(_norm(str(key)), path)
    return index


def model_names() -> list[str]:
    """Canonical names of the bundled model profiles."""
    return sorted({load_model(str(p)).name for p in set(_model_index().values())})


def load_model(name_or_path: str) -> ModelProfile:
    """Resolve a short name ('40b'), a full name ('InternVL2-40B') or a profile file path."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownModel("--model is empty: give a name such as 8b or InternVL2_5-8B, or a profile file")
    path = Path(name_or_path)
    if name_or_path.endswith((".toml", ".json")) or _is_file(path):
        if not _is_file(path):
            raise UnknownModel(f"model profile file '{name_or_path}' does not exist")
        return model_from_data(_read_data_file(path), str(path), path.parent)
    found = _model_index().get(_norm(name_or_path))
    if found is None and "/" in name_or_path:
        # A Hugging Face id (OpenGVLab/InternVL2_5-8B) names the same model as its bundled profile.
        organisation, _, repository = name_or_path.strip().partition("/")
        if organisation.lower() == HF_ORGANISATION:
            found = _model_index().get(_norm(repository))
    if found is None:
        known = ", ".join(sorted(k for k in _model_index() if len(k) <= 5))
        raise UnknownModel(f"unknown model '{name_or_path[:80]}': use a short name ({known}), "
                           "a full name (the files under zeroplan/profiles/models/), or a profile file")
    return model_from_data(_read_data_file(found), str(found.relative_to(PROFILES_DIR.parent.parent)))


def check_calibrated(calibrated: Any, memory_bytes: int, where: str) -> dict[str, Any]:
    """The [calibrated] table, every value of the kind and range CALIBRATED_RANGES gives (a
    context that is negative or not smaller than the GPU would make every plan fit or none)."""
    if not isinstance(calibrated, dict):
        raise InvalidProfile(f"{where}: [calibrated] must be a table")
    unknown = set(calibrated) - set(CALIBRATED_RANGES) - {"source"}
    if unknown:
        raise InvalidProfile(f"{where} [calibrated]: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(known: source, {', '.join(sorted(CALIBRATED_RANGES))})")
    if not isinstance(calibrated.get("source", ""), str):
        raise InvalidProfile(f"{where} [calibrated]: 'source' must be a string")
    for key, value in calibrated.items():
        if key == "source":
            continue
        kind, low, high = CALIBRATED_RANGES[key]
        high = min(high, memory_bytes - 1) if key == "cuda_context_bytes" else high
        number = (int,) if kind is int else (int, float)
        if (isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value)
                or not low <= value <= high):
            what, show = ("a whole number", int) if kind is int else ("a finite number", float)
            raise InvalidProfile(f"{where} [calibrated]: '{key}' must be {what} from {show(low)} to {show(high)}, "
                                 f"got {value!r}")
    return dict(calibrated)


def gpu_from_data(data: dict[str, Any], where: str) -> GPUProfile:
    """Validate a parsed GPU profile."""
    memory_bytes = _field(data, "memory_bytes", int, where, positive=True)
    if memory_bytes > MAX_GPU_MEMORY_BYTES:
        raise InvalidProfile(f"{where}: 'memory_bytes' is implausibly large ({memory_bytes})")
    context = _field(data, "cuda_context_bytes", int, where)
    if not 0 <= context < memory_bytes:
        raise InvalidProfile(f"{where}: 'cuda_context_bytes' must be from 0 to less than memory_bytes, got {context}")
    calibrated = check_calibrated(data.get("calibrated", {}), memory_bytes, where)
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise InvalidProfile(f"{where}: 'aliases' must be a list of strings")
    host = data.get("host", {})
    if not isinstance(host, dict) or any(
            not isinstance(host.get(key, 1.0), (int, float)) or isinstance(host.get(key), bool) or host.get(key, 1.0) <= 0
            for key in ("pinned_bandwidth_gbps", "cpu_adam_elems_per_s", "cpu_adam_kernel_elems_per_s")):
        raise InvalidProfile(f"{where}: [host] must be a table whose pinned_bandwidth_gbps, cpu_adam_elems_per_s and "
                             "cpu_adam_kernel_elems_per_s are positive numbers")
    return GPUProfile(
        name=_field(data, "name", str, where), aliases=tuple(aliases),
        memory_bytes=memory_bytes,
        bf16_dense_tflops=float(_field(data, "bf16_dense_tflops", float, where, positive=True)),
        hbm_bandwidth_gbps=float(_field(data, "hbm_bandwidth_gbps", float, where, positive=True)),
        intra_node_link=str(data.get("intra_node_link", "")),
        intra_node_bandwidth_gbps=float(_field(data, "intra_node_bandwidth_gbps", float, where, positive=True)),
        inter_node_bandwidth_gbps=float(_field(data, "inter_node_bandwidth_gbps", float, where, positive=True)),
        pcie_bandwidth_gbps=float(_field(data, "pcie_bandwidth_gbps", float, where, positive=True)),
        cuda_context_bytes=context, source=str(data.get("source", "")), calibrated=calibrated, path=where,
        host_memory_bytes_per_node=_field(data, "host_memory_gib_per_node", int, where, positive=True) * 2**30
        if "host_memory_gib_per_node" in data else 0,
        host_memory_source=str(data.get("host_memory_source", "")), host=dict(host),
    )


@lru_cache(maxsize=1)
def _gpu_index() -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted((PROFILES_DIR / "gpus").glob("*.toml")):
        data = _read_data_file(path)
        for key in [data.get("name", path.stem), path.stem, *data.get("aliases", [])]:
            index.setdefault(str(key).strip().lower(), path)
    return index


def gpu_names() -> list[str]:
    """File stems of the bundled GPU profiles (what --gpu accepts, besides aliases)."""
    return sorted(p.stem for p in (PROFILES_DIR / "gpus").glob("*.toml"))


def load_gpu(name_or_path: str) -> GPUProfile:
    """Resolve a GPU profile by name, alias (also NVML's device name) or file path."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownGPU(f"--gpu is empty: use one of {', '.join(gpu_names())} or a profile file")
    path = Path(name_or_path)
    if name_or_path.endswith((".toml", ".json")):
        if not _is_file(path):
            raise UnknownGPU(f"GPU profile file '{name_or_path}' does not exist")
        return gpu_from_data(_read_data_file(path), str(path))
    found = _gpu_index().get(name_or_path.strip().lower())
    if found is None:
        raise UnknownGPU(f"unknown GPU '{name_or_path[:80]}': use one of {', '.join(gpu_names())} or a profile file")
    return gpu_from_data(_read_data_file(found), str(found.relative_to(PROFILES_DIR.parent.parent)))


def match_gpu_name(nvml_name: str) -> GPUProfile | None:
    """The bundled profile for a device name as NVML reports it ('NVIDIA H100 80GB HBM3'), if any."""
    key = nvml_name.strip().lower()
    if key in _gpu_index():
        return load_gpu(key)
    rules = (("h200", "h200-141gb"), ("h100", "h100-80gb"), ("a100", "a100-80gb"),
             ("l40s", "l40s"), ("4090", "rtx4090"))
    for needle, stem in rules:
        if needle in key:
            if stem == "a100-80gb" and "40gb" in key:
                stem = "a100-40gb"
            return load_gpu(stem)
    return None


def pad_vocab(profile: ModelProfile, multiple: int) -> ModelProfile:
    """The profile with its vocabulary (embedding and lm_head rows) rounded up to `multiple`, as
    Megatron's make-vocab-size-divisible-by does (1: unchanged). InternVL2.5-2B's 92,553 rows and
    Qwen2.5's 151,674 give the logits a leading dimension that is not a multiple of 8, and cuBLAS
    then runs the step's largest matrix products on slow kernels."""
    if multiple <= 1 or profile.llm.vocab_size % multiple == 0:
        return profile
    vocab = -(-profile.llm.vocab_size // multiple) * multiple
    return dataclasses.replace(profile, llm=dataclasses.replace(profile.llm, vocab_size=vocab))
