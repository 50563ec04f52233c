"""What a pre-quantized checkpoint's `quantization_config` says, in the terms torpor loads.

torpor loads FP8 checkpoints as they are published, with no dequantize and requantize: each
quantized linear is an e4m3 `<module>.weight` [N, K] with a `<module>.weight_scale`, one per
output row ([N, 1]) or one for the tensor ([1] or a scalar). Two publishers' forms are read:
- compressed-tensors (`quant_method` "compressed-tensors", format "float-quantized", or
  "naive-quantized" holding the same float8 tensors): llm-compressor's output, the form of
  Llama-3.1-70B-Instruct-FP8. Modules are picked by `config_groups[*].targets` ("Linear", a
  module name, or "re:" and a regular expression matched from the name's start) minus
  `ignore`. Static activation schemes add an `<module>.input_scale`.
- FBGEMM fp8 (`quant_method` "fbgemm_fp8"): per-row float32 scales, every linear but
  `modules_to_not_convert` (the LM head too when that list is absent, as transformers reads
  it). The form Meta published its 405B FP8 in.

Anything else (another method, block-wise or group scales, integer weights, a quantized KV
cache) is refused: InvalidArgument, reason `UNSUPPORTED_QUANTIZATION`, naming the method and
the scheme. The activation side of a scheme (static `input_scale`, FBGEMM's
`activation_scale_ub`) is validated and not used: the engine quantizes activations per row at
run time, which is at least as fine as one static scale per tensor (worker/engine/fp8.py,
docs/ARCHITECTURE.md "The engine").

torpord reads this at registration and the engine at load, so it imports neither torch nor
the worker.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn

from torpor.errors import InvalidArgument

REASON = "UNSUPPORTED_QUANTIZATION"
LM_HEAD = "lm_head"
EMBED = "model.embed_tokens"
# The linears of a layer, by group: a group is one engine tensor (q/k/v fuse into wqkv,
# gate/up into w13), so its modules are quantized alike or not at all.
_LAYER_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# compressed-tensors' preset schemes of e4m3 weights that torpor loads (a config group may
# name one instead of spelling it out).
_PRESETS: dict[str, dict[str, Any]] = {
    "FP8": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    },
    "FP8_DYNAMIC": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {
            "num_bits": 8,
            "type": "float",
            "strategy": "token",
            "dynamic": True,
        },
    },
}
_FLOAT_FORMATS = ("float-quantized", "naive-quantized")


class Method(enum.Enum):
    """The publishers' forms torpor reads (config.json's `quant_method`)."""

    COMPRESSED_TENSORS = "compressed-tensors"
    FBGEMM_FP8 = "fbgemm_fp8"


@dataclass(frozen=True)
class LinearScheme:
    """How one published linear is stored: an e4m3 weight and its `weight_scale`."""

    per_row: bool
    """weight_scale is [N, 1] (or [N]), one per output row; else [1] (or a scalar)."""
    static_input: bool = False
    """An `input_scale` is published (a static activation scheme): checked, not used."""


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization: which linears are published in fp8, and how."""

    method: Method
    schemes: tuple[tuple[str, LinearScheme], ...]
    """(module name, scheme) of every quantized linear, e.g. "model.layers.0.mlp.up_proj"."""
    form: str = ""
    """The method's own name of the storage format, for messages ("float-quantized")."""

    @cached_property
    def _by_module(self) -> dict[str, LinearScheme]:
        return dict(self.schemes)

    def scheme(self, module: str) -> LinearScheme | None:
        """The scheme of `module` (a name without `.weight`), or None if it is unquantized."""
        return self._by_module.get(module)

    def describe(self) -> str:
        return f"{self.method.value} ({self.form})" if self.form else self.method.value


def linear_modules(num_layers: int) -> Iterator[tuple[str, ...]]:
    """The linears of a Llama-family model by engine tensor, then the LM head alone."""
    for n in range(num_layers):
        for group in _LAYER_GROUPS:
            yield tuple(f"model.layers.{n}.{name}" for name in group)
    yield (LM_HEAD,)


def from_config(config: Mapping[str, Any], num_layers: int, tied: bool) -> Quantization | None:
    """The quantization of a config.json (parsed), or None when it has none; InvalidArgument
    naming the method and scheme for one torpor does not load."""
    raw = config.get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        _bad("quantization_config must be a JSON object", raw)
    method = raw.get("quant_method")
    if method == Method.COMPRESSED_TENSORS.value:
        quant = _compressed_tensors(raw, num_layers)
    elif method == Method.FBGEMM_FP8.value:
        quant = _fbgemm(raw, num_layers)
    else:
        _refuse(
            f"quantization_config.quant_method {method!r} is not supported; torpor loads fp8 "
            "checkpoints of compressed-tensors (float-quantized) and fbgemm_fp8",
            method,
        )
    _check_groups(quant, num_layers, tied)
    return quant


# -- compressed-tensors --------------------------------------------------------------------


def _compressed_tensors(raw: Mapping[str, Any], num_layers: int) -> Quantization:
    method = Method.COMPRESSED_TENSORS.value
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if raw.get(key) not in (None, {}) and not _dense_sparsity(key, raw.get(key)):
            _refuse(f"compressed-tensors {key} is not supported (torpor loads fp8 linears)", method)
    ignore = _names(raw.get("ignore") or [], "ignore")
    rules = _ct_rules(raw)
    _ct_check_targets(rules, ignore, num_layers)
    schemes: list[tuple[str, LinearScheme]] = []
    for modules in linear_modules(num_layers):
        for module in modules:
            if _matches(module, ignore):
                continue
            scheme = next((s for targets, s in rules if _matches(module, targets)), None)
            if scheme is not None:
                schemes.append((module, scheme))
    form = str(raw.get("format") or "mixed")
    return Quantization(Method.COMPRESSED_TENSORS, tuple(schemes), form)


def _ct_rules(raw: Mapping[str, Any]) -> list[tuple[list[str], LinearScheme]]:
    """Each config group's targets and scheme, in order (the first that matches applies)."""
    method = Method.COMPRESSED_TENSORS.value
    groups = raw.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        _bad("compressed-tensors quantization_config.config_groups must be a non-empty object", raw)
    rules: list[tuple[list[str], LinearScheme]] = []
    for name, group in groups.items():
        if isinstance(group, list):  # a preset's name with its targets
            if name not in _PRESETS:
                _refuse(f"compressed-tensors preset scheme {name!r} is not supported", method, name)
            group = {"targets": group, **_PRESETS[name]}
        if not isinstance(group, Mapping):
            _bad(f"compressed-tensors config group {name!r} must be an object", group)
        form = group.get("format") or raw.get("format")
        if form not in _FLOAT_FORMATS:
            _refuse(
                f"compressed-tensors format {form!r} is not supported (group {name!r}); "
                f"torpor loads {' or '.join(_FLOAT_FORMATS)} fp8 weights",
                method,
                form,
            )
        rules.append((_names(group.get("targets"), f"{name}.targets"), _ct_scheme(name, group)))
    return rules


def _ct_check_targets(
    rules: list[tuple[list[str], LinearScheme]], ignore: list[str], num_layers: int
) -> None:
    """Targets are Linear, a linear's name or a regex, and leave the embedding alone (another
    class or module would be quantized in a way the engine does not load)."""
    method = Method.COMPRESSED_TENSORS.value
    linears = {m for modules in linear_modules(num_layers) for m in modules}
    for targets, _ in rules:
        for target in targets:
            if target not in linears and target != "Linear" and not target.startswith("re:"):
                _refuse(
                    f"compressed-tensors target {target!r} is not supported; torpor loads "
                    "targets that are Linear, a linear's name or re:<regular expression>",
                    method,
                    target,
                )
        if _matches(EMBED, targets) and not _matches(EMBED, ignore):
            _refuse(
                "compressed-tensors quantizes the embedding; torpor keeps it unquantized",
                method,
                "embedding",
            )


def _ct_scheme(name: str, group: Mapping[str, Any]) -> LinearScheme:
    method = Method.COMPRESSED_TENSORS.value
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        _refuse(f"compressed-tensors group {name!r} has no weights scheme", method)
    strategy = _float8(name, "weights", weights)
    if strategy not in ("channel", "tensor") or weights.get("dynamic"):
        _refuse(
            f"compressed-tensors group {name!r} weights use strategy {strategy!r}"
            f"{' (dynamic)' if weights.get('dynamic') else ''}; torpor loads fp8 weights "
            "scaled per channel or per tensor",
            method,
            strategy,
        )
    if group.get("output_activations") is not None:
        _refuse(f"compressed-tensors group {name!r} quantizes output activations", method)
    inputs = group.get("input_activations")
    static = False
    if inputs is not None:  # None: weight-only fp8 (W8A16), also loaded
        if not isinstance(inputs, Mapping):
            _bad(f"compressed-tensors group {name!r} input_activations must be an object", inputs)
        act = _float8(name, "input_activations", inputs)
        dynamic = inputs.get("dynamic", False)
        static = dynamic is False
        if not (
            (act == "token" and dynamic is True) or (act == "tensor" and dynamic in (True, False))
        ):
            _refuse(
                f"compressed-tensors group {name!r} input activations use strategy "
                f"{act!r} (dynamic={dynamic!r}); torpor loads per-token or per-tensor "
                "activation schemes",
                method,
                act,
            )
    return LinearScheme(per_row=strategy == "channel", static_input=static)


def _float8(group: str, side: str, args: Mapping[str, Any]) -> str:
    """The strategy of e4m3 quantization arguments; refused unless symmetric 8-bit float."""
    kind, bits = args.get("type", "int"), args.get("num_bits", 8)
    if kind != "float" or bits != 8 or args.get("symmetric", True) is not True:
        _refuse(
            f"compressed-tensors group {group!r} {side} are {bits}-bit {kind}"
            f"{'' if args.get('symmetric', True) else ' asymmetric'}; torpor loads "
            "symmetric 8-bit float (e4m3)",
            Method.COMPRESSED_TENSORS.value,
            f"{kind}{bits}",
        )
    if args.get("block_structure"):
        _refuse(
            f"compressed-tensors group {group!r} {side} are block-wise (strategy "
            f"{args.get('strategy')!r}, block_structure {args['block_structure']!r}); torpor "
            "loads fp8 weights scaled per channel or per tensor",
            Method.COMPRESSED_TENSORS.value,
            "block",
        )
    if args.get("actorder"):
        _refuse(
            f"compressed-tensors group {group!r} {side} are reordered (actorder "
            f"{args['actorder']!r})",
            Method.COMPRESSED_TENSORS.value,
            "actorder",
        )
    strategy, size = args.get("strategy"), args.get("group_size")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if size is None else "channel" if size == -1 else "group"
    return str(strategy)


def _dense_sparsity(key: str, value: Any) -> bool:
    return (
        key == "sparsity_config" and isinstance(value, Mapping) and value.get("format") == "dense"
    )


# -- FBGEMM fp8 ----------------------------------------------------------------------------


def _fbgemm(raw: Mapping[str, Any], num_layers: int) -> Quantization:
    listed = raw.get("modules_to_not_convert")
    # transformers' rule: without a list, the LM head is kept; with one, the list says.
    skip = [LM_HEAD] if listed is None else _names(listed, "modules_to_not_convert")
    bound = raw.get("activation_scale_ub", 1200.0)
    if isinstance(bound, bool) or not isinstance(bound, int | float) or not bound > 0:
        _bad("fbgemm_fp8 activation_scale_ub must be a positive number", bound)
    schemes = [
        (module, LinearScheme(per_row=True))
        for modules in linear_modules(num_layers)
        for module in modules
        if not any(_fbgemm_skips(module, pattern) for pattern in skip)
    ]
    return Quantization(Method.FBGEMM_FP8, tuple(schemes), "per-row")


def _fbgemm_skips(module: str, pattern: str) -> bool:
    # transformers' rule: the pattern (a regular expression) matches from the start up to a
    # module boundary ("model.layers.1" skips layer 1, not 11), or the name ends with it.
    try:
        return bool(re.match(rf"(?:{pattern})(?:\.|$)", module)) or module.endswith(pattern)
    except re.error:
        return module.endswith(pattern)


# -- shared --------------------------------------------------------------------------------


def _check_groups(quant: Quantization, num_layers: int, tied: bool) -> None:
    """Every engine tensor is all fp8 or all unquantized; a tied head is not quantized."""
    for modules in linear_modules(num_layers):
        schemes = [quant.scheme(m) is not None for m in modules]
        if any(schemes) and not all(schemes):
            done = [m for m, s in zip(modules, schemes, strict=True) if s]
            rest = [m for m, s in zip(modules, schemes, strict=True) if not s]
            _refuse(
                f"{quant.describe()} quantizes {', '.join(done)} but not {', '.join(rest)}; "
                "torpor fuses them into one tensor, quantized alike",
                quant.method.value,
            )
    if tied and quant.scheme(LM_HEAD) is not None:
        _refuse(
            f"{quant.describe()} quantizes lm_head, which is tied to the embedding; "
            "ignore lm_head (torpor keeps a tied head unquantized)",
            quant.method.value,
        )


def _matches(module: str, targets: list[str]) -> bool:
    """compressed-tensors' rule: "Linear" (every linear here), "re:" a regular expression
    matched from the start of the name, or the exact name."""
    for target in targets:
        if target == "Linear" and module != EMBED:
            return True
        if target.startswith("re:"):
            try:
                if re.match(target[3:], module):
                    return True
            except re.error as exc:
                _bad(
                    f"quantization_config has an invalid regular expression {target!r}: {exc}",
                    target,
                )
        elif target == module:
            return True
    return False


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _bad(f"quantization_config {what} must be a list of strings", value)
    return list(value)


def _refuse(message: str, method: Any, scheme: Any = None) -> NoReturn:
    metadata = {"quant_method": str(method)}
    if scheme is not None:
        metadata["scheme"] = str(scheme)
    raise InvalidArgument(f"config.json: {message}", reason=REASON, metadata=metadata)


def _bad(message: str, value: Any) -> NoReturn:
    raise InvalidArgument(
        f"config.json: {message}, got {value!r:.200}",
        reason="BAD_CONFIG",
        metadata={"key": "quantization_config"},
    )
