"""msModelSlim's traditional quantization scripts' flags -> a compile plan (`qcompile quant ARGS`).

`python3 quant_llama.py ARGS` / `python3 quant_qwen.py ARGS` (msModelSlim example/Llama/quant_llama.py and
example/Qwen/quant_qwen.py, the flag table of the LLaMA case document) become `qcompile quant ARGS`. The
script's own logic is reproduced: its defaults (`parse_arguments`), its default `disable_names`
(`create_quant_config`: every mlp.down_proj when a_bit is 8 - the Qwen script also at a_bit 16 -, LLaMA3 the
first 5 layers, LLaMA3.1 fp/instruct both), its AntiOutlierConfig per anti_method (`__main__`), and the
QuantConfig checks and quant-type rule it triggers (msmodelslim/pytorch/llm_ptq/llm_ptq_tools/quant_config/
quant_config_classes/config_utils.py `check_and_generate_config_param`; llm_ptq_utils.py
`QuantType.get_quant_type`). Which script: LlamaForCausalLM -> quant_llama.py, Qwen2/Qwen3 -> quant_qwen.py.
The same mapping reads `modelslim_v0` practice YAMLs (their `calib_cfg` / `anti_cfg` / `calib_params` are the
QuantConfig / AntiOutlierConfig / Calibrator arguments): msmodelslim_yaml.py calls `plan_from_settings`.

Flag -> passes (`FLAG_MAP` is the table `qcompile quant --help` prints):
  w_bit/a_bit/is_dynamic/co_sparse/is_lowbit/open_outlier/group_size -> the scheme (W8A8 w8a8, W8A8 + pdmix
      w8a8mix, W8A8_DYNAMIC w8a8d, W8A16 w8a16, W4A16 w4a16, W4A8_DYNAMIC w4a8d:group=group_size (two-stage per-group),
      W8A8S sparse:ratio=0 + w8a8s (4-bit codes, 310P: --target ascend310p --dtype float16));
  act_method 1 -> act_observer=minmax; 2 (histogram) -> act_observer=histogram (L2 clip search, the base of
      msModelSlim's histogram observer); 3 (automatic mix, a closed algorithm) -> act_observer=histogram too,
      whose search starts from the min-max range and clips only where that lowers the error;
  anti_method m1 (SmoothQuant, AntiOutlierConfig alpha 0.5, norm->Linear groups) -> smooth:alpha=0.5:
      subgraphs=norm-linear; m2 (SmoothQuant enhanced: Outlier Suppression+, shift and searched scaling) ->
      smooth:shift=true:subgraphs=norm-linear; m3 (AWQ) -> awq; m4 (smooth optimisation, iter_smooth) ->
      smooth (alpha searched, every subgraph); m6 (flex smooth: alpha and beta searched; the scripts disable it
      on every o_proj) -> smooth:subgraphs=norm-linear+up-down; m5 (CBQ) -> not available;
  disable_names -> --exclude (exact names); disable_level LN -> fallback:level=N; use_kvcache_quant -> kv8;
  use_fa_quant -> fa3; tp_size N -> simulate_tp:size=N; w_method GPTQ -> gptq; fraction / use_sigma +
  sigma_factor -> w8a8s:fraction= / sigma=; do_smooth (sparse) -> smooth; part_file_size -> weight shard GiB;
  calib_file / calib_texts -> calibration text (none: sampled from the model, the script's bundled
  teacher_qualification.jsonl is not shipped); device_type, mm_tensor (the scripts pass mm_tensor=False
  whatever the flag), model_name, trust_remote_code: accepted.
Not available (one exit-2 line names every such flag): anti_method m5, anti_calib_file (a second calibration
set for anti-outlier), disable_threshold > 0 (LayerSelector's quantile score is a closed binary), fa_amp > 0,
use_reduce_quant true (MindIE all-reduce quantization: closed kernel, and the script writes its description key
without the tensors), w_sym false (asymmetric weights: the engines read weight offsets with opposite signs,
spec W8A16), is_lowbit with W8A8/W8A16 (automatic precision tuning, closed), w_method HQQ/NF, layer_count,
mindie_format, disable_last_linear false (lm_head always stays float), non-default input_ids_name /
attention_mask_name / tokenizer_args keys, W4A4.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import QCError
from .ir.outlier_ranges import OUTLIER_FRACTION_RANGE, SIGMA_FACTOR_RANGE
from .msmodelslim_plan import FrontPlan, Unsupported, check_names, names_regex, pass_options

#: flag -> (default of the scripts' argparse, type). `None` default: not given.
DEFAULTS = {
    "part_file_size": None, "calib_texts": None, "calib_file": None, "w_bit": 8, "a_bit": 8,
    "disable_names": None, "device_type": "cpu", "fraction": 0.01, "act_method": 1, "co_sparse": False,
    "anti_method": "", "disable_level": "L0", "do_smooth": False, "use_sigma": False, "use_reduce_quant": False,
    "tp_size": 1, "sigma_factor": 3.0, "is_lowbit": False, "mm_tensor": True, "w_sym": True,
    "use_kvcache_quant": False, "use_fa_quant": False, "fa_amp": 0, "open_outlier": True, "group_size": 64,
    "is_dynamic": False, "input_ids_name": "input_ids", "attention_mask_name": "attention_mask",
    "tokenizer_args": None, "disable_last_linear": True, "model_name": None, "model_type": None,
    "anti_calib_file": None, "disable_threshold": 0.0, "pdmix": False, "mindie_format": False,
    "layer_count": 0, "w_method": "MinMax",
}
BOOL_FLAGS = {k for k, v in DEFAULTS.items() if isinstance(v, bool)}
INT_FLAGS = {"part_file_size", "w_bit", "a_bit", "act_method", "tp_size", "fa_amp", "group_size", "layer_count"}
FLOAT_FLAGS = {"fraction", "sigma_factor", "disable_threshold"}

LLAMA_MODEL_TYPES = ("llama", "llama2", "llama3", "llama3.1_bf", "llama3.1_fp", "llama3.1_instruct")
QWEN_MODEL_TYPES = ("qwen1", "qwen1.5", "qwen2", "qwen2.5", "qwen3")
GROUP_SIZES = (32, 64, 128, 256)          # config_utils.GROUP_SIZE_LIST
TP_SIZES = (1, 2, 4, 8, 16)                # simulate_tp_config.SUPPORT_TP_SIZES plus 1 (off)
ACT_OBSERVER = {1: "minmax", 2: "histogram", 3: "histogram"}
ANTI_METHODS = {
    "m1": ("smooth", {"alpha": 0.5, "subgraphs": "norm-linear"}),
    "m2": ("smooth", {"shift": True, "subgraphs": "norm-linear"}),
    "m3": ("awq", {}),
    "m4": ("smooth", {}),
    "m6": ("smooth", {"subgraphs": "norm-linear+up-down"}),
}

#: per flag, what it becomes here (`qcompile quant --help`)
FLAG_HELP = {
    "part_file_size": "GiB per weight file (0: one file)",
    "calib_texts": "calibration texts given inline",
    "w_bit": "weight bits: with a_bit / is_dynamic / co_sparse / is_lowbit, the scheme (default 8)",
    "a_bit": "activation bits, 8 or 16 (default 8)",
    "disable_names": "Linears kept float (--exclude); default: the script's (every down_proj at a_bit 8, ...)",
    "device_type": "cpu or npu: the compile runs on CPU either way",
    "fraction": "W8A8S: outlier fraction per row kept at int8 codes (w8a8s:fraction=), 0.01..0.1",
    "act_method": "1 minmax, 2 histogram, 3 auto (-> histogram): act_observer=",
    "co_sparse": "true: W8A8S sparse quantization (w_bit 4, a_bit 8; --target ascend310p --dtype float16)",
    "anti_method": "m1 smooth:alpha=0.5 (norm), m2 smooth:shift=true (norm), m3 awq, m4 smooth, m6 smooth (norm + "
                   "up-down); m5 not available",
    "disable_level": "LN: fallback:level=N (the N most sensitive Linears float)",
    "do_smooth": "W8A8S: smooth before it",
    "use_sigma": "W8A8S: outliers by sigma_factor x std (w8a8s:sigma=)",
    "use_reduce_quant": "not available (MindIE all-reduce quantization)",
    "tp_size": "simulate_tp:size=N on o_proj / down_proj (1, 2, 4, 8, 16)",
    "sigma_factor": "use_sigma's factor, 3.0..4.0 (QuantConfig's check; not the example READMEs' 1.0..3.0)",
    "is_lowbit": "with w_bit 4 a_bit 8: W8A8S (lowbit); with open_outlier false: per-group weights",
    "mm_tensor": "accepted: the scripts always pass mm_tensor=False (per-channel weights)",
    "w_sym": "true only (asymmetric weights are not written)",
    "use_kvcache_quant": "kv8 (C8 int8 KV cache)",
    "use_fa_quant": "fa3 (FAQuant)",
    "fa_amp": "0 only",
    "open_outlier": "false with is_lowbit: per-group weights of group_size",
    "group_size": "per-group size: 32, 64, 128, 256",
    "is_dynamic": "per-token activations: W8A8_DYNAMIC (w8a8d) / W4A8_DYNAMIC (w4a8d)",
    "input_ids_name": "default only", "attention_mask_name": "default only",
    "tokenizer_args": "JSON with padding_side / pad_token only (calibration is not padded)",
    "disable_last_linear": "true only (lm_head always stays float)",
    "model_name": "accepted", "model_type": "llama / llama2 / llama3 / llama3.1_* or qwen1.5 / qwen2 / qwen2.5 / qwen3",
    "anti_calib_file": "not available (one calibration set)", "disable_threshold": "0 only (closed score)",
    "pdmix": "W8A8_MIX (w8a8mix)", "mindie_format": "not available", "layer_count": "0 only",
    "w_method": "MinMax, or GPTQ (gptq before the scheme)",
}

#: the help table: flag -> what it becomes
FLAG_MAP = {
    "w_bit / a_bit / is_dynamic / co_sparse / is_lowbit": "the scheme pass (w8a8, w8a8mix, w8a8d, w8a16, w4a16, "
                                                         "w4a8d, sparse:ratio=0 + w8a8s on ascend310p float16)",
    "act_method 1 | 2 | 3": "act_observer=minmax | histogram | histogram",
    "anti_method m1 | m2 | m3 | m4 | m6": "smooth:alpha=0.5 (norm) | smooth:shift=true (norm) | awq | smooth | "
                                          "smooth (norm + up-down)",
    "disable_names / disable_level LN": "--exclude NAME / fallback:level=N",
    "use_kvcache_quant / use_fa_quant / tp_size N": "kv8 / fa3 / simulate_tp:size=N",
    "w_method GPTQ / fraction / use_sigma": "gptq / w8a8s:fraction= / w8a8s:sigma=sigma_factor",
    "open_outlier false + is_lowbit + group_size G": "per-group weights, group=G",
}


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def coerce(settings: dict, label) -> dict:
    """Settings (strings from the command line or YAML values) converted to the scripts' argparse types."""
    out = {}
    for key, value in settings.items():
        try:
            if value is None:
                out[key] = None
            elif key in BOOL_FLAGS:
                out[key] = _parse_bool(value)
            elif key in INT_FLAGS:
                if isinstance(value, bool) or int(value) != float(value):
                    raise ValueError
                out[key] = int(value)
            elif key in FLOAT_FLAGS:
                if isinstance(value, bool):    # float(True) is 1.0: a YAML `fraction: true` is no number
                    raise ValueError
                out[key] = float(value)
            else:
                out[key] = value
        except (TypeError, ValueError):
            raise QCError(f"{label(key)} {value!r}: expected {_kind(key)}") from None
    return out


def _kind(key: str) -> str:
    return "true or false" if key in BOOL_FLAGS else "an integer" if key in INT_FLAGS else "a number"


def _default_disable_names(family: str, model_type: str, a_bit: int, num_layers: int, threshold: float) -> list[str]:
    """The scripts' `create_quant_config` defaults when disable_names is not given."""
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(num_layers)]
    first5 = [f"model.layers.{i}.{n}" for i in range(5) for n in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj")]
    if family == "qwen":
        return down if a_bit in (8, 16) else []
    if a_bit != 8:
        return []
    if threshold > 0:
        return down
    if model_type == "llama3":
        return [f"model.layers.{i}.mlp.down_proj" for i in range(5)] + first5 + ["lm_head"]
    if model_type in ("llama3.1_fp", "llama3.1_instruct"):
        return down + first5 + ["lm_head"]
    return down


def quant_type_of(s: dict) -> str:
    """QuantType.get_quant_type after config_utils' adjustments (s: the adjusted settings)."""
    w, a = s["w_bit"], s["a_bit"]
    if s["is_dynamic"]:
        return {(8, 8): "W8A8_DYNAMIC", (4, 8): "W4A8_DYNAMIC", (4, 4): "W4A4_DYNAMIC"}.get((w, a), "UNKNOWN")
    if s["co_sparse"]:
        return "W8A8S"
    table = {(8, 8): "W8A8", (8, 16): "W8A16", (4, 16): "W4A16", (16, 16): "FLOAT"}
    if (w, a) in table:
        return table[(w, a)]
    if s["is_lowbit"] and (w, a) == (4, 8):
        return "W8A8S"
    return "UNKNOWN"


def plan_from_settings(given: dict, config: dict, model_type: str, label, where: str, *, script: bool = True,
                       anti: dict | None = None) -> FrontPlan:
    """Map the scripts' settings (`given`: flag -> value, only what the user set) onto a FrontPlan.

    `label(flag)` names a flag in messages (`--w_sym` on the command line, `spec.calib_cfg.w_sym` in a YAML);
    `where` prefixes the one-line error listing every unsupported setting. `script`: the scripts' behaviour
    (their default disable_names, mm_tensor forced False, m6 disabled on every o_proj); False: QuantConfig's own
    defaults as a modelslim_v0 YAML gets them (modelslim_v0/quant_service.py: QuantConfig(**calib_cfg), so
    mm_tensor defaults to True, per-tensor weights). `anti`: AntiOutlierConfig extras of a v0 YAML
    (`alpha` / `beta` of flex_config, `o_proj_disabled`)."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise QCError(f"{where}: unknown setting {', '.join(label(k) for k in unknown)} (not a flag of msModelSlim's "
                      f"quant_llama.py / quant_qwen.py)")
    s = dict(DEFAULTS)
    s.update(coerce(given, label))
    notes = []
    # A float setting is judged by its value wherever it comes from: `--sigma_factor 3` is 3.0 (the scripts'
    # argparse has type=float, example/Llama/quant_llama.py parse_arguments), and so is a YAML `sigma_factor: 3`.
    # msModelSlim itself refuses the YAML integer (modelslim_v0/quant_service.py passes calib_cfg to QuantConfig
    # as read; config_utils.check_lowbit_config / check_sparse_config call ascend_utils/common/security/type.py
    # check_number(value, float, ...), whose check_type is isinstance(value, float): TypeError "sigma factor must
    # be float, not int"). Refusing 3 when 3.0 is taken would change no bit of the artifact, so qcompile takes it
    # and says in a note that msModelSlim would not, for a YAML meant for both tools.
    if not script:
        for key in sorted({"fraction", "sigma_factor"} & set(given)):
            if given[key] is not None and not isinstance(given[key], float):
                notes.append(f"{label(key)} {given[key]!r} read as {s[key]}; msModelSlim's QuantConfig refuses "
                             f"anything but a float there (check_number(..., float)): write {s[key]} for it")
    anti = anti or {}
    family = "qwen" if str(model_type).startswith("qwen") else "llama"
    num_layers = int(config["num_hidden_layers"])
    bad = Unsupported(where)

    # -- the script's own flags ---------------------------------------------------------------------------
    script_types = QWEN_MODEL_TYPES if family == "qwen" else LLAMA_MODEL_TYPES
    mtype = s["model_type"] or ("qwen2" if family == "qwen" else "llama2")
    if mtype not in script_types:
        raise QCError(f"{label('model_type')} {mtype!r}: this {family} checkpoint takes "
                      f"{'quant_qwen.py' if family == 'qwen' else 'quant_llama.py'}'s model types "
                      f"{', '.join(script_types)}")
    if mtype == "qwen1":
        raise QCError(f"{label('model_type')} qwen1: the first Qwen generation (QWenLMHeadModel) is not implemented "
                      f"by qcompile; this checkpoint is {model_type}")
    if s["anti_method"] == "m5":
        bad.add(f"{label('anti_method')} m5", "CBQ's block reconstruction is not implemented")
    elif s["anti_method"] and s["anti_method"] not in ANTI_METHODS:
        raise QCError(f"{label('anti_method')} {s['anti_method']!r}: expected m1, m2, m3, m4, m5 or m6")
    if s["anti_calib_file"]:
        bad.add(label("anti_calib_file"), "anti-outlier runs on the one calibration set; drop it or pass it as "
                                          "--calib_file")
    if s["disable_threshold"] > 0:
        bad.add(label("disable_threshold"), "LayerSelector's quantile score is a closed binary; use "
                                            "--disable_level LN (measured fallback) or --disable_names")
    if s["fa_amp"] > 0:
        bad.add(label("fa_amp"), "automatic fallback of attention quantization is not implemented")
    if s["use_reduce_quant"]:
        bad.add(label("use_reduce_quant"), "MindIE's all-reduce quantization kernel is closed and the script "
                                           "writes reduce_quant_type without the reduce/gather scales")
    if s["mindie_format"]:
        bad.add(label("mindie_format"), "only the AscendV1 layout is written")
    if s["layer_count"] > 0:
        bad.add(label("layer_count"), "qcompile quantizes every decoder layer")
    if not s["disable_last_linear"]:
        bad.add(f"{label('disable_last_linear')} false", "lm_head always stays float")
    for key in ("input_ids_name", "attention_mask_name"):
        if s[key] != DEFAULTS[key]:
            bad.add(label(key), "calibration is tokenized by the checkpoint's own tokenizer")
    if s["tokenizer_args"] is not None:
        try:
            targs = json.loads(s["tokenizer_args"]) if isinstance(s["tokenizer_args"], str) else s["tokenizer_args"]
        except ValueError:
            raise QCError(f"{label('tokenizer_args')} {s['tokenizer_args']!r}: expected a JSON object") from None
        if not isinstance(targs, dict) or set(targs) - {"padding_side", "pad_token"}:
            bad.add(label("tokenizer_args"), "only padding_side / pad_token (calibration windows are not padded)")
    if s["w_method"] not in ("MinMax", "GPTQ"):
        bad.add(f"{label('w_method')} {s['w_method']}", "only MinMax and GPTQ weights")
    if s["tp_size"] not in TP_SIZES:
        raise QCError(f"{label('tp_size')} {s['tp_size']}: expected one of {', '.join(map(str, TP_SIZES))}")
    level = re.fullmatch(r"[Ll](\d+)", str(s["disable_level"]))
    if not level:
        raise QCError(f"{label('disable_level')} {s['disable_level']!r}: expected L0, L1, L2, ...")

    # -- QuantConfig's checks and adjustments (config_utils.check_and_generate_config_param) -----------------
    # the ranges are ir/outlier_ranges.py's (the one source for these flags and w8a8s:/sparse: options alike)
    if not OUTLIER_FRACTION_RANGE[0] <= s["fraction"] <= OUTLIER_FRACTION_RANGE[1]:
        raise QCError(f"{label('fraction')} {s['fraction']}: must be in {list(OUTLIER_FRACTION_RANGE)} "
                      f"(QuantConfig, config_utils.check_sparse_config)")
    if not SIGMA_FACTOR_RANGE[0] <= s["sigma_factor"] <= SIGMA_FACTOR_RANGE[1]:
        raise QCError(f"{label('sigma_factor')} {s['sigma_factor']}: must be in {list(SIGMA_FACTOR_RANGE)}, the "
                      f"range msModelSlim's QuantConfig enforces (config_utils.check_lowbit_config); the [1.0, 3.0] "
                      f"of the example READMEs' flag tables (example/Llama/README.md, ...) is not what its code "
                      f"accepts")
    if s["a_bit"] == 8 and not s["w_sym"]:
        raise QCError(f"{label('w_sym')} false: msModelSlim requires w_sym true when a_bit is 8")
    if s["use_kvcache_quant"] and s["use_fa_quant"]:
        raise QCError(f"{label('use_kvcache_quant')} and {label('use_fa_quant')}: msModelSlim cannot quantize the "
                      f"KV cache and FA at the same time")
    if s["co_sparse"] and s["is_lowbit"]:
        s["co_sparse"] = False                                    # lowbit wins (check_sparse_config)
    if s["co_sparse"] and (s["w_bit"], s["a_bit"]) != (4, 8):
        notes.append(f"co_sparse: w_bit/a_bit {s['w_bit']}/{s['a_bit']} replaced by 4/8 (as msModelSlim does)")
        s["w_bit"], s["a_bit"] = 4, 8
    if s["act_method"] not in ACT_OBSERVER:
        raise QCError(f"{label('act_method')} {s['act_method']}: expected 1, 2 or 3")
    if s["act_method"] == 3 and s["is_lowbit"]:
        raise QCError(f"{label('act_method')} 3 cannot be combined with is_lowbit (QuantConfig)")
    if s["is_dynamic"] and (s["w_bit"] not in (4, 8) or s["a_bit"] == 16):
        raise QCError(f"{label('is_dynamic')}: dynamic quantization needs w_bit 4 or 8 and a_bit 8")
    w4a8 = (s["w_bit"], s["a_bit"]) == (4, 8)
    per_group = s["is_lowbit"] and not s["open_outlier"] and (s["a_bit"] == 16 or w4a8)
    if per_group and s["group_size"] not in GROUP_SIZES:
        raise QCError(f"{label('group_size')} {s['group_size']}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    w4a8_sparse = w4a8 and (s["co_sparse"] or (s["is_lowbit"] and not s["is_dynamic"]))
    if w4a8 and not w4a8_sparse and not (s["is_dynamic"] and per_group):
        raise QCError(f"{label('w_bit')} 4 with {label('a_bit')} 8 is W4A8_DYNAMIC, which msModelSlim builds only "
                      f"per-group: add {label('is_dynamic')} true {label('is_lowbit')} true "
                      f"{label('open_outlier')} false {label('group_size')} 32|64|128|256")
    qtype = quant_type_of(s)
    if qtype == "UNKNOWN" or qtype in ("W4A4_DYNAMIC", "FLOAT"):
        raise QCError(f"{label('w_bit')} {s['w_bit']} {label('a_bit')} {s['a_bit']}"
                      f"{' dynamic' if s['is_dynamic'] else ''}: no quantization type msModelSlim and qcompile share "
                      f"(W8A8, W8A8_DYNAMIC, W8A16, W4A16, W4A8_DYNAMIC, W8A8S)")
    if s["pdmix"] and qtype != "W8A8":
        raise QCError(f"{label('pdmix')} true needs the W8A8 type, not {qtype} (QuantConfig)")
    if s["is_lowbit"] and qtype in ("W8A8", "W8A16") and not per_group:
        bad.add(f"{label('is_lowbit')} true with {qtype}", "msModelSlim's automatic precision tuning is closed")
    if not script and s["mm_tensor"] and qtype in ("W8A8", "W8A16", "W4A16", "W8A8_DYNAMIC"):
        bad.add(f"{label('mm_tensor')} true (QuantConfig's default)", "per-tensor weights; the engines' schemes are "
                                                                      "per-channel: set mm_tensor: false")
    if s["device_type"] not in ("cpu", "npu"):
        raise QCError(f"{label('device_type')} {s['device_type']!r}: expected cpu or npu")
    if not s["w_sym"]:
        bad.add(f"{label('w_sym')} false", "asymmetric weights: vLLM-Ascend and MindIE read weight offsets with "
                                          "opposite signs (spec, W8A16)")
    if s["anti_method"] and s["anti_method"] != "m3" and s["a_bit"] != 8:
        raise QCError(f"{label('anti_method')} {s['anti_method']} needs a_bit 8 (AntiOutlierConfig; m3 also takes 16)")

    # -- passes ---------------------------------------------------------------------------------------------
    passes = []
    target, dtype = "ascend910b", None
    if s["anti_method"] in ANTI_METHODS:
        name, opts = ANTI_METHODS[s["anti_method"]]
        opts = dict(opts)
        if s["anti_method"] == "m6":
            if not anti.get("o_proj_disabled", script):  # a v0 YAML without the scripts' o_proj rule: every subgraph
                opts.pop("subgraphs")
            if anti.get("alpha") is not None and anti.get("beta") is not None:  # fixed flex exponents
                opts.update(alpha=float(anti["alpha"]), beta=float(anti["beta"]))
        passes.append((name, pass_options(**opts)))
    group = s["group_size"] if per_group else 0
    act = ACT_OBSERVER[s["act_method"]]
    if qtype == "W8A8S":
        if s["do_smooth"] and not any(n == "smooth" for n, _ in passes):
            passes.append(("smooth", {}))
        passes.append(("sparse", pass_options(ratio=0)))
    if s["w_method"] == "GPTQ":
        passes.append(("gptq", {}))
    if qtype == "W8A8":
        passes.append(("w8a8mix" if s["pdmix"] else "w8a8", pass_options(act_observer=act if act != "minmax" else None)))
    elif qtype == "W8A8_DYNAMIC":
        passes.append(("w8a8d", {}))
    elif qtype == "W8A16":
        passes.append(("w8a16", pass_options(group=group)))
    elif qtype == "W4A16":
        passes.append(("w4a16", pass_options(group=group)))
    elif qtype == "W4A8_DYNAMIC":  # msModelSlim builds it per-group only (checked above): issue 12's two-stage form
        passes.append(("w4a8d", pass_options(group=s["group_size"])))
    elif qtype == "W8A8S":
        outliers = pass_options(sigma=s["sigma_factor"]) if s["use_sigma"] else pass_options(fraction=s["fraction"])
        passes.append(("w8a8s", {**pass_options(act_observer=act if act != "minmax" else None), **outliers}))
        target, dtype = "ascend310p", "float16"
        notes.append("W8A8S: Atlas 300I Duo rules (--target ascend310p --dtype float16)")
    if s["use_kvcache_quant"]:
        passes.append(("kv8", {}))
    if s["use_fa_quant"]:
        passes.append(("fa3", {}))
    if s["tp_size"] > 1:
        passes.append(("simulate_tp", pass_options(size=s["tp_size"])))
        if script:
            notes.append(f"{label('tp_size')} {s['tp_size']}: the scripts parse it without passing it on; qcompile "
                         f"applies what the flag table documents (QuantConfig.simulate_tp: per-card communication "
                         f"Linears)")
    if int(level.group(1)) > 0:
        passes.append(("fallback", pass_options(level=int(level.group(1)))))
    bad.raise_if_any()

    # -- float Linears, data, files ---------------------------------------------------------------------------
    if s["disable_names"] is not None:
        names = s["disable_names"] if isinstance(s["disable_names"], list) else [s["disable_names"]]
        names = check_names([str(n) for n in names], config, label("disable_names"))
    elif script:
        known = set(_all_linears(config))
        names = [n for n in _default_disable_names(family, mtype, s["a_bit"], num_layers, s["disable_threshold"])
                 if n in known]
        if names:
            notes.append(f"default disable_names of {'quant_qwen.py' if family == 'qwen' else 'quant_llama.py'} "
                         f"(model_type {mtype}): {len(names)} Linears float")
    else:
        names = []
    exclude = [names_regex(names, num_layers)] if names else []
    if "mm_tensor" in given and script:
        notes.append(f"{label('mm_tensor')}: the scripts pass mm_tensor=False to QuantConfig whatever the flag says "
                     f"(per-channel weights)")
    plan = FrontPlan(source=f"msModelSlim {'quant_qwen.py' if family == 'qwen' else 'quant_llama.py'} settings "
                            f"({qtype})", passes=passes, target=target, dtype=dtype, exclude=exclude, policy="none",
                     part_file_size=s["part_file_size"], notes=notes)
    if s["calib_file"]:
        plan.calib = Path(str(s["calib_file"]))
    if s["calib_texts"]:
        plan.calib_texts = [str(t) for t in (s["calib_texts"] if isinstance(s["calib_texts"], list)
                                             else [s["calib_texts"]])]
    return plan


def _all_linears(config: dict) -> list[str]:
    from .msmodelslim_plan import decoder_linear_names
    return decoder_linear_names(config)
