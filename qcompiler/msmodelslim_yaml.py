"""msModelSlim practice configs (`msmodelslim quant --config_path FILE.yaml`) -> a compile plan.

Reads the `modelslim_v1` layout (msmodelslim/core/quant_service/modelslim_v1/quant_config.py
`ModelslimV1ServiceConfig`: spec.runner, spec.prior, spec.process, spec.save, spec.dataset) and the older
`modelslim_v0` one (modelslim_v0/quant_config.py `QuantSpec`: calib_cfg / anti_cfg / calib_params /
calib_save_params / calib_dataset, the traditional QuantConfig arguments, mapped by msmodelslim_flags.py).
Every block we can honour maps onto our passes and options; every field or processor we cannot is named in
one exit-2 line (`Unsupported`). YAML only: `yaml.safe_load`, nothing in the file is executed.

modelslim_v1 processors (spec.process, in order; `group` blocks are flattened in order):
  linear_quant (processor/quant/linear.py `LinearProcessorConfig`; qconfig = core/quantizer/linear.py
      `LinearQConfig`, act default float): by (act, weight) scheme as msModelSlim's IR registrations pair them
      (msmodelslim/ir/w8a8_static.py, w8a8_dynamic.py, w8a8_pdmix.py, w8a16_static.py, w4a8_dynamic.py):
        act int8 per_tensor (sym or asym)  + weight int8 per_channel sym -> w8a8 (activations stored asymmetric,
                                                                          as w8a8_static.py represents both)
        act int8 per_token sym             + weight int8 per_channel sym -> w8a8d
        act int8 pd_mix asym               + weight int8 per_channel sym -> w8a8mix
        act int8 per_token sym             + weight int4 per_group sym   -> w4a8d:group=ext.group_size
                                             (int4 per_channel: no engine loads it dense, one line)
        no act (float)                     + weight int8 per_channel|per_group sym -> w8a16 (group = ext.group_size)
        no act (float)                     + weight int4 per_channel|per_group sym -> w4a16 (group 0 | ext.group_size)
      act method minmax -> act_observer=minmax, histogram -> act_observer=histogram (same L2 search,
      core/observer/histogram.py); weight method minmax -> RTN, gptq -> a gptq pass before the schemes (ext
      percdamp -> damp, block_size -> block, group_size -> per-group). include / exclude (globs on module names,
      utils/config_map.py ConfigSet) -> the scheme's match regex; the first block to claim a Linear wins.
  iter_smooth (anti_outlier/iter_smooth/processor.py: alpha 0.9, scale_min 1e-5, symmetric, enable_subgraph_type,
      include/exclude on the subgraph's source module) -> smooth:alpha=A:subgraphs=...:match=... (symmetric
      false -> shift=true, which it applies to norm-linear groups only, as iter_smooth does);
  smooth_quant (norm-linear only, alpha 0.5) -> smooth:alpha=A:subgraphs=norm-linear;
  flex_smooth_quant (alpha and beta searched unless both given) -> smooth (alpha searched: the closest, beta
      = 1 - alpha) or smooth:alpha=A:beta=B;
  awq (weight_qconfig, n_grid; every subgraph type) -> awq:grid=n_grid;
  float_sparse (sparse_ratio, ADMM) -> sparse:ratio=R:match=...,w16a16s:match=... (SparseGPT, the closest);
  dynamic_cache (int8 per_channel symmetric minmax, every layer) -> kv8;  fa3_quant (int8 per_head sym) -> fa3.
spec.save: ascendv1_saver (part_file_size GiB, 0 = one file); spec.runner: accepted (qcompile always works
layer by layer); spec.dataset: a calibration file next to the YAML or in the working directory, unless
--calib_file is given (msModelSlim's bundled lab_calib sets are not shipped); metadata: reported.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import QCError, require_file
from .msmodelslim_plan import FrontPlan, Unsupported, decoder_linear_names, glob_select, names_regex, pass_options

SUBGRAPHS_ALL = ("norm-linear", "linear-linear", "ov", "up-down")
V1_SPEC_KEYS = {"runner", "prior", "process", "save", "dataset"}
RUNNERS = {"auto", "model_wise", "layer_wise", "dp_layer_wise"}
QCONFIG_KEYS = {"dtype", "scope", "symmetric", "method", "ext"}


def load_config(path: Path) -> dict:
    import yaml
    path = Path(path)
    require_file("--config_path", path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QCError(f"--config_path {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
        raise QCError(f"--config_path {path}: expected msModelSlim's layout (apiversion, metadata, spec)")
    return data


def plan_from_config(path: Path, config: dict, model_type: str, calib_given: bool) -> FrontPlan:
    """The FrontPlan of a practice YAML for a model (config.json dict, its model_type)."""
    path = Path(path)
    data = load_config(path)
    api = data.get("apiversion")
    meta = data.get("metadata") or {}
    config_id = meta.get("config_id", path.stem) if isinstance(meta, dict) else path.stem
    if api == "modelslim_v1":
        plan = _v1(path, data["spec"], config, calib_given)
    elif api == "modelslim_v0":
        plan = _v0(path, data["spec"], config, model_type, calib_given)
    else:
        raise QCError(f"--config_path {path}: apiversion {api!r} is not supported (modelslim_v1 or modelslim_v0; "
                      f"the multimodal layouts are for models qcompile does not implement)")
    plan.source = f"--config_path {path.name} (config_id {config_id}, {api})"
    return plan


# ---- modelslim_v1 --------------------------------------------------------------------------------------------
def _v1(path: Path, spec: dict, config: dict, calib_given: bool) -> FrontPlan:
    bad = Unsupported(f"--config_path {path}")
    plan = FrontPlan(source="")
    for key in sorted(set(spec) - V1_SPEC_KEYS):
        bad.add(f"spec.{key}", "not a modelslim_v1 spec field")
    runner = spec.get("runner", "auto")
    if runner not in RUNNERS:
        bad.add(f"spec.runner {runner!r}", f"expected {', '.join(sorted(RUNNERS))}")
    if spec.get("prior"):
        bad.add("spec.prior", "prior stages (adapt_rotation stage 1) are not implemented")
    blocks = []
    for i, block in enumerate(spec.get("process") or []):
        where = f"spec.process[{i}]"
        if not isinstance(block, dict) or "type" not in block:
            raise QCError(f"--config_path {path}: {where} must be a mapping with a type")
        if block["type"] == "group":
            configs = block.get("configs") or []
            if not isinstance(configs, list):
                raise QCError(f"--config_path {path}: {where}.configs must be a list of processor blocks")
            for j, inner in enumerate(configs):
                if not isinstance(inner, dict) or "type" not in inner:
                    raise QCError(f"--config_path {path}: {where}.configs[{j}] must be a mapping with a type")
                blocks.append((f"{where}.configs[{j}]", inner))
            for key in sorted(set(block) - {"type", "configs"}):
                bad.add(f"{where}.{key}", "unknown field of a group")
        else:
            blocks.append((where, block))
    smooth, sparse, schemes, tail = [], [], [], []
    gptq_opts = None
    gptq_blocks = []
    layers = int(config["num_hidden_layers"])
    out = {"smooth": smooth, "sparse": sparse, "schemes": schemes, "tail": tail, "gptq": gptq_blocks,
           "linears": decoder_linear_names(config), "layers": layers, "notes": plan.notes,
           "sources": [f"model.layers.{i}.{m}" for i in range(layers)
                       for m in ("input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj")]}
    modules = out["linears"] + out["sources"] + FLOAT_MODULES + [
        f"model.layers.{i}.mlp.{m}" for i in range(layers) for m in ("gate", "shared_expert_gate")]
    for where, block in blocks:
        _note_unmatched_globs(where, block, modules, plan.notes)
        kind = block.get("type")
        handler = PROCESSORS.get(kind)
        if handler is None:
            bad.add(f"{where} type {kind}", "processor not implemented by qcompile")
            continue
        try:
            _check_globs(where, block)
            handler(where, block, bad, out)
        except QCError as e:  # the handlers name the field; the file is named here, once
            raise QCError(f"--config_path {path}: {e}") from None
    linear_blocks = [b for b in blocks if b[1].get("type") == "linear_quant"]
    if gptq_blocks:
        if len(gptq_blocks) != len(linear_blocks):
            bad.add("weight method gptq", "on some linear_quant blocks only (qcompile's gptq rounds every "
                                          "quantized Linear)")
        gptq_opts = gptq_blocks[0]
    if sparse and schemes:
        bad.add("float_sparse with linear_quant", "a float-sparse Linear is not quantized again (W16A16S)")
    for name, opts in smooth:
        if name == "awq":
            want = _awq_bits(opts.pop("_weight_qconfig"), schemes)
            if want:
                bad.add("awq weight_qconfig", want)
    for i, saver in enumerate(spec.get("save") or []):
        where = f"spec.save[{i}]"
        if not isinstance(saver, dict) or saver.get("type") != "ascendv1_saver":
            bad.add(f"{where} type {saver.get('type') if isinstance(saver, dict) else saver}",
                    "only ascendv1_saver (the AscendV1 layout) is written")
            continue
        for key in sorted(set(saver) - {"type", "part_file_size", "ext"}):
            bad.add(f"{where}.{key}", "unknown saver field")
        if saver.get("ext"):
            bad.add(f"{where}.ext", "saver extensions are not implemented")
        size = saver.get("part_file_size", 4)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise QCError(f"--config_path {path}: {where}.part_file_size must be an integer >= 0, got {size!r}")
        plan.part_file_size = size
    bad.raise_if_any()
    if not schemes and not sparse:
        raise QCError(f"--config_path {path}: spec.process has no linear_quant or float_sparse block: nothing to "
                      f"quantize")
    plan.passes = [p for p in smooth] + [p for p in sparse[:1]]
    if gptq_opts is not None:
        plan.passes.append(("gptq", gptq_opts))
    plan.passes += schemes + [p for p in sparse[1:]] + tail
    _dataset(plan, path, spec.get("dataset"), calib_given, "spec.dataset")
    if runner not in ("auto", "layer_wise"):
        plan.notes.append(f"spec.runner {runner}: qcompile always quantizes layer by layer")
    return plan


def _number(where: str, block: dict, key: str, default, integer: bool = False):
    """block[key] (`default` when absent) as a finite float, or an int with `integer`; QCError naming the field
    otherwise (a list, null or 'abc' was a traceback from float()). A string that reads as a number is taken:
    PyYAML reads `scale_min: 1e-5` (no dot) as a string, and msModelSlim's pydantic configs convert it."""
    value = block.get(key, default)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or (integer and number != int(number)):
            raise ValueError
    except ValueError:
        raise QCError(f"{where}.{key} is {value!r}; expected {'an integer' if integer else 'a number'}") from None
    return int(number) if integer else number


def _flag(where: str, block: dict, key: str, default):
    """block[key] (`default` when absent) as a bool; QCError naming the field for anything but true / false
    (a string such as "false" was truthy: symmetric: "false" quantized symmetrically)."""
    value = block.get(key, default)
    if value is not default and not isinstance(value, bool):
        raise QCError(f"{where}.{key} is {value!r}; expected true or false")
    return value


def _check_globs(where: str, block: dict) -> None:
    """include / exclude: a glob or a list of globs (strings); QCError naming the field otherwise (a list of
    numbers was a traceback in fnmatch)."""
    for key in ("include", "exclude"):
        value = block.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise QCError(f"{where}.{key} is {value!r}; expected a list of module-name globs")


#: modules outside the decoder Linears a pattern may name (always float here)
FLOAT_MODULES = ["lm_head", "model.embed_tokens", "model.norm"]


def _note_unmatched_globs(where: str, block: dict, modules: list[str], notes: list[str]) -> None:
    """A note for each include / exclude glob that matches no module of the model (msModelSlim warns about those:
    processor/quant/linear.py post_run): an exclude with a typo otherwise left the Linears it meant to keep float
    quantized without a word. `modules`: the decoder Linears, the smoothing sources, norms, routers, lm_head."""
    for key in ("include", "exclude"):
        patterns = block.get(key) or []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if isinstance(pattern, str) and not glob_select(modules, [pattern]):
                notes.append(f"{where}.{key} {pattern!r} matches no module of this model")


def _check_fields(where, block, allowed, bad):
    for key in sorted(set(block) - set(allowed) - {"type"}):
        bad.add(f"{where}.{key}", f"not a field qcompile maps for {block.get('type')}")


def _qconfig(where: str, q, bad) -> dict | None:
    """A QConfig mapping checked for the fields msModelSlim's QConfig has (core/quantizer/base.py)."""
    if q is None:
        return None
    if not isinstance(q, dict):
        raise QCError(f"{where} must be a mapping (dtype, scope, symmetric, method)")
    for key in sorted(set(q) - QCONFIG_KEYS):
        bad.add(f"{where}.{key}", "not a QConfig field")
    return q


def _match(block, names, layers: int, default=("*",)):
    """None when include/exclude select every name, else (regex of the selected names, how many)."""
    include = block.get("include") or list(default)
    exclude = block.get("exclude") or []
    include = [include] if isinstance(include, str) else list(include)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    chosen = glob_select(names, include, exclude)
    if len(chosen) == len(names):
        return None, len(chosen)
    return (names_regex(chosen, layers) if chosen else "^$"), len(chosen)


def _subgraphs(where, block, bad, default=SUBGRAPHS_ALL) -> str:
    types = block.get("enable_subgraph_type", list(default))
    types = [types] if isinstance(types, str) else types  # one type, as include / exclude take one glob
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise QCError(f"{where}.enable_subgraph_type is {types!r}; expected a list of {', '.join(SUBGRAPHS_ALL)}")
    unknown = [t for t in types if t not in SUBGRAPHS_ALL]
    if unknown:
        raise QCError(f"{where}.enable_subgraph_type {unknown}: expected some of {', '.join(SUBGRAPHS_ALL)}")
    kept = [t for t in types if t != "linear-linear"]  # no linear-linear subgraph in dense Llama/Qwen layers
    if not kept:
        bad.add(f"{where}.enable_subgraph_type {types}", "selects no subgraph of a dense Llama/Qwen layer")
        return None
    chosen = "+".join(t for t in ("norm-linear", "ov", "up-down") if t in kept)
    return None if chosen == "norm-linear+ov+up-down" else chosen  # None: smooth's default, all three


def _linear_quant(where, block, bad, out):
    _check_fields(where, block, ("qconfig", "include", "exclude"), bad)
    q = block.get("qconfig")
    if not isinstance(q, dict) or "weight" not in q:
        raise QCError(f"{where}.qconfig must have a weight QConfig (and optionally act)")
    for key in sorted(set(q) - {"act", "weight"}):
        bad.add(f"{where}.qconfig.{key}", "not a LinearQConfig field")
    w = _qconfig(f"{where}.qconfig.weight", q["weight"], bad)
    a = _qconfig(f"{where}.qconfig.act", q.get("act"), bad)
    scheme, opts = _scheme(where, a, w, bad, out)
    if scheme is None:
        return
    match, count = _match(block, out["linears"], out["layers"])
    if count == 0:  # msModelSlim only warns about patterns that match no module (linear.py post_run)
        out["notes"].append(f"{where}: include/exclude match no Linear of this model; block skipped")
        return
    if match is not None:
        opts["match"] = match
    out["schemes"].append((scheme, opts))


def _scheme(where, a, w, bad, out):
    """(pass name, options) of a linear_quant's (act, weight) QConfigs; (None, None) after recording why not."""
    wd, ws, wm = w.get("dtype"), w.get("scope"), w.get("method", "minmax")
    wsym = _flag(f"{where}.qconfig.weight", w, "symmetric", True)
    wext = dict(w.get("ext") or {})
    group = 0
    if wd not in ("int8", "int4") or ws not in ("per_channel", "per_group"):
        bad.add(f"{where}.qconfig.weight {wd} {ws}", "weights are int8/int4 per_channel or per_group here")
        return None, None
    if not wsym:
        bad.add(f"{where}.qconfig.weight.symmetric false", "asymmetric weights: vLLM-Ascend and MindIE read weight "
                                                           "offsets with opposite signs (spec, W8A16)")
    if ws == "per_group":
        group = wext.pop("group_size", 64 if wm == "gptq" else None)
        if group is None:
            bad.add(f"{where}.qconfig.weight per_group", "needs ext.group_size")
            return None, None
    if wm == "gptq":
        gptq = {}
        for src, dst in (("percdamp", "damp"), ("block_size", "block")):
            if src in wext:
                gptq[dst] = wext.pop(src)
        out["gptq"].append(pass_options(**gptq))
    elif wm != "minmax":
        bad.add(f"{where}.qconfig.weight.method {wm}", "weights are rounded by minmax (RTN) or gptq here")
    if wext:
        bad.add(f"{where}.qconfig.weight.ext {sorted(wext)}", "not mapped")
    bits = 8 if wd == "int8" else 4
    if a is None or a.get("dtype", "float") == "float":
        name = "w8a16" if bits == 8 else "w4a16"
        return name, pass_options(group=group)
    ad, asc, am = a.get("dtype"), a.get("scope"), a.get("method", "minmax")
    asym = _flag(f"{where}.qconfig.act", a, "symmetric", None)
    if a.get("ext"):
        bad.add(f"{where}.qconfig.act.ext", "not mapped")
    if ad != "int8":
        bad.add(f"{where}.qconfig.act.dtype {ad}", "activations are int8 here")
        return None, None
    if group and not (bits == 4 and asc == "per_token"):
        bad.add(f"{where}.qconfig.weight per_group with int8 {asc} activations", "per-group weights with int8 "
                "activations are W4A8_DYNAMIC only (int4, per_token); otherwise weight-only")
        return None, None
    observer = {"minmax": None, "histogram": "histogram"}
    if asc == "per_tensor" and bits == 8:
        if am not in observer:
            bad.add(f"{where}.qconfig.act.method {am}", "per-tensor activations take minmax or histogram")
        return "w8a8", pass_options(act_observer=observer.get(am))
    if asc == "pd_mix" and bits == 8 and asym is False:
        if am not in observer:
            bad.add(f"{where}.qconfig.act.method {am}", "pd_mix activations take minmax or histogram")
        return "w8a8mix", pass_options(act_observer=observer.get(am))
    if asc == "per_token" and asym is True:
        if am != "minmax":
            bad.add(f"{where}.qconfig.act.method {am}", "per-token activations are min-max at run time")
        if bits == 8:
            return "w8a8d", {}
        if not group:
            bad.add(f"{where}.qconfig.weight int4 per_channel with per_token activations", "per-channel "
                    "W4A8_DYNAMIC loads in no engine for a dense Linear (backends/ascend/engines.py): write scope "
                    "per_group with ext.group_size 32|64|128|256 (the two-stage form)")
            return None, None
        return "w4a8d", pass_options(group=group)
    bad.add(f"{where}.qconfig act int8 {asc} {'symmetric' if asym else 'asymmetric'} with weight {wd}",
            "no such scheme (W8A8: per_tensor; W8A8_DYNAMIC / W4A8_DYNAMIC: per_token symmetric; W8A8_MIX: "
            "pd_mix asymmetric)")
    return None, None


def _iter_smooth(where, block, bad, out):
    _check_fields(where, block, ("alpha", "scale_min", "symmetric", "enable_subgraph_type", "include", "exclude"),
                  bad)
    if _number(where, block, "scale_min", 1e-5) != 1e-5:
        bad.add(f"{where}.scale_min {block['scale_min']}", "smoothing scales are clamped at 1e-5")
    opts = pass_options(alpha=_number(where, block, "alpha", 0.9), subgraphs=_subgraphs(where, block, bad),
                        shift=True if _flag(where, block, "symmetric", True) is False else None,
                        match=_match(block, out["sources"], out["layers"])[0])
    out["smooth"].append(("smooth", opts))


def _smooth_quant(where, block, bad, out):
    _check_fields(where, block, ("alpha", "symmetric", "include", "exclude"), bad)
    opts = pass_options(alpha=_number(where, block, "alpha", 0.5), subgraphs="norm-linear",
                        shift=True if _flag(where, block, "symmetric", True) is False else None,
                        match=_match(block, out["sources"], out["layers"])[0])
    out["smooth"].append(("smooth", opts))


def _flex_smooth(where, block, bad, out):
    _check_fields(where, block, ("alpha", "beta", "enable_subgraph_type", "include", "exclude"), bad)
    alpha, beta = block.get("alpha"), block.get("beta")
    fixed = alpha is not None and beta is not None
    opts = pass_options(alpha=_number(where, block, "alpha", None) if fixed else None,
                        beta=_number(where, block, "beta", None) if fixed else None,
                        subgraphs=_subgraphs(where, block, bad), match=_match(block, out["sources"], out["layers"])[0])
    out["smooth"].append(("smooth", opts))


def _awq(where, block, bad, out):
    _check_fields(where, block, ("weight_qconfig", "enable_subgraph_type", "n_grid", "include", "exclude"), bad)
    if _subgraphs(where, block, bad) is not None:
        bad.add(f"{where}.enable_subgraph_type", "qcompile's awq scales every subgraph type")
    if _match(block, out["sources"], out["layers"])[0] is not None:
        bad.add(f"{where}.include/exclude", "qcompile's awq scales every quantized Linear")
    opts = pass_options(grid=_number(where, block, "n_grid", 20, integer=True))
    opts["_weight_qconfig"] = _qconfig(f"{where}.weight_qconfig", block.get("weight_qconfig"), bad) or {}
    out["smooth"].append(("awq", opts))


def _awq_bits(wq: dict, schemes) -> str:
    """'' when awq's weight_qconfig agrees with the weight schemes after it, else why not."""
    bits = {"int8": 8, "int4": 4}.get(wq.get("dtype"))
    scheme_bits = {"w8a16": 8, "w8a8": 8, "w8a8d": 8, "w8a8mix": 8, "w4a16": 4, "w4a8d": 4}
    after = {scheme_bits.get(name) for name, _ in schemes}
    if bits is None or after != {bits}:
        return f"{wq.get('dtype')} does not match the linear_quant weights after it"
    return ""


def _float_sparse(where, block, bad, out):
    _check_fields(where, block, ("sparse_ratio", "include", "exclude"), bad)
    ratio = _number(where, block, "sparse_ratio", 0.3)
    match = _match(block, out["linears"], out["layers"])[0]
    out["sparse"].append(("sparse", pass_options(ratio=ratio, match=match)))
    out["sparse"].append(("w16a16s", pass_options(match=match)))


def _dynamic_cache(where, block, bad, out):
    _check_fields(where, block, ("qconfig", "include", "exclude"), bad)
    q = _qconfig(f"{where}.qconfig", block.get("qconfig"), bad) or {}
    want = {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}
    if any(q.get(k, v) != v for k, v in want.items()) or q.get("ext"):
        bad.add(f"{where}.qconfig", "the KV cache is int8 per_channel symmetric minmax (C8) here")
    if (block.get("include") or ["*"]) != ["*"] or block.get("exclude"):
        bad.add(f"{where}.include/exclude", "kv8 quantizes every layer's cache")
    out["tail"].append(("kv8", {}))


def _fa3(where, block, bad, out):
    _check_fields(where, block, ("qconfig", "include", "exclude"), bad)
    q = _qconfig(f"{where}.qconfig", block.get("qconfig"), bad) or {}
    want = {"scope": "per_head", "dtype": "int8", "symmetric": True}
    if any(q.get(k, v) != v for k, v in want.items()) or q.get("ext"):
        bad.add(f"{where}.qconfig", "FA3 is int8 per_head symmetric here")
    if (block.get("include") or ["*"]) != ["*"] or block.get("exclude"):
        bad.add(f"{where}.include/exclude", "fa3 quantizes every layer's attention")
    out["tail"].append(("fa3", {}))


PROCESSORS = {"linear_quant": _linear_quant, "iter_smooth": _iter_smooth, "smooth_quant": _smooth_quant,
              "flex_smooth_quant": _flex_smooth, "awq": _awq, "float_sparse": _float_sparse,
              "dynamic_cache": _dynamic_cache, "fa3_quant": _fa3}


def _dataset(plan: FrontPlan, path: Path, name, calib_given: bool, field: str) -> None:
    if calib_given or not name:
        return
    for base in (path.parent, Path.cwd()):
        candidate = base / str(name)
        if candidate.is_file():
            plan.calib = candidate
            return
    raise QCError(f"--config_path {path}: {field} {name!r} is not next to the config or in the working directory "
                  f"(msModelSlim's bundled calibration sets are not shipped); pass --calib_file FILE")


# ---- modelslim_v0 --------------------------------------------------------------------------------------------
V0_KEYS = {"anti_cfg", "anti_params", "calib_cfg", "calib_params", "calib_save_params", "batch_size",
           "anti_dataset", "calib_dataset"}


def _v0(path: Path, spec: dict, config: dict, model_type: str, calib_given: bool) -> FrontPlan:
    from .msmodelslim_flags import plan_from_settings
    where = f"--config_path {path}"
    bad = Unsupported(where)
    for key in sorted(set(spec) - V0_KEYS):
        bad.add(f"spec.{key}", "not a modelslim_v0 spec field")
    settings, labels = {}, {}

    def put(section: str, key: str, value) -> None:
        settings[key] = value
        labels[key] = f"spec.{section}.{key}"

    calib_cfg = dict(spec.get("calib_cfg") or {})
    for key in ("dev_type", "dev_id"):
        calib_cfg.pop(key, None)
    for key, value in calib_cfg.items():
        put("calib_cfg", key, value)
    anti = dict(spec.get("anti_cfg") or {})
    anti_extra = {}
    if anti:
        put("anti_cfg", "anti_method", anti.pop("anti_method", "m2"))  # AntiOutlierConfig's default
        flex = anti.pop("flex_config", None) or {}
        for key in ("w_bit", "a_bit", "w_sym", "dev_type", "dev_id"):
            anti.pop(key, None)
        disabled = set(anti.pop("disable_anti_names", None) or [])
        for key in sorted(anti):
            bad.add(f"spec.anti_cfg.{key}", "not mapped")
        o_proj = {f"model.layers.{i}.self_attn.o_proj" for i in range(int(config["num_hidden_layers"]))}
        if disabled and disabled != o_proj:
            bad.add("spec.anti_cfg.disable_anti_names", "only the whole set of o_proj (no ov smoothing) is mapped")
        anti_extra = {"o_proj_disabled": disabled == o_proj, "alpha": flex.get("alpha"), "beta": flex.get("beta")}
    if spec.get("anti_params"):
        bad.add("spec.anti_params", "not mapped")
    if spec.get("anti_dataset"):
        bad.add("spec.anti_dataset", "anti-outlier runs on the one calibration set")
    params = dict(spec.get("calib_params") or {})
    if "disable_level" in params:
        put("calib_params", "disable_level", params.pop("disable_level"))
    mix = params.pop("mix_cfg", None)
    for key in sorted(params):
        bad.add(f"spec.calib_params.{key}", "not mapped")
    save = dict(spec.get("calib_save_params") or {})
    if "part_file_size" in save:
        put("calib_save_params", "part_file_size", save.pop("part_file_size"))
    for key in sorted(save):
        bad.add(f"spec.calib_save_params.{key}", "not mapped")
    bad.raise_if_any()
    plan = plan_from_settings(settings, config, model_type, lambda k: labels.get(k, f"spec.calib_cfg.{k}"), where,
                              script=False, anti=anti_extra)
    if mix:
        _mix_cfg(plan, mix, where, config)
    _dataset(plan, path, spec.get("calib_dataset"), calib_given, "spec.calib_dataset")
    return plan


def _mix_cfg(plan: FrontPlan, mix, where: str, config: dict) -> None:
    """calib_params.mix_cfg {glob: "float"} -> more float Linears (only "float" is a type we can honour)."""
    if not isinstance(mix, dict):
        raise QCError(f"{where}: spec.calib_params.mix_cfg must map module globs to a type")
    other = {k: v for k, v in mix.items() if str(v).lower() != "float"}
    if other:
        raise QCError(f"{where}: not supported by qcompile: spec.calib_params.mix_cfg {other} (only \"float\" "
                      f"entries are mapped)")
    chosen = glob_select(decoder_linear_names(config), list(mix))
    if chosen:
        plan.exclude.append(names_regex(chosen, int(config["num_hidden_layers"])))
