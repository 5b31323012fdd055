"""The compile driver: checkpoint -> per-layer graphs -> passes -> artifact + executable graph + report.

Order of work (sequential, one decoder layer in memory at a time):
 1. validate everything that can be validated without work: model folder, architecture, dtype/target,
    pass names/options/order, --exclude against fused groups, output folder;
 2. calibration windows (from --calib, or sampled from the float model itself, seed 0, whose weights are
    the validated safetensors: nothing from the model folder is run or unpickled, see trust.py);
 3. layer 0's inputs from a real forward of the embedding (pre-hook on layer 0); the embedding is
    streamed into the artifact and released: no part of the head is held while the layers compile;
 4. for each layer i: capture (torch.export) -> user passes -> observe -> calibrate -> lower; run the
    lowered layer on the calibration inputs to make layer i+1's inputs (so later layers calibrate on
    quantized activations); stream its tensors into the artifact; save its executable program
    (executable.py: JSON graph; its tensors are the artifact's, stored once);
 5. the head read again (final norm, lm_head; logits checked), description, config, tokenizer, report;
    everything is written into a temporary sibling folder renamed to OUT at the very end.
"""
import contextlib
import dataclasses
import re
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed, knobs, resume
from .backends.ascend import lower as _ascend_lower  # noqa: F401  registers the "lower" pass TAIL names
from .backends.ascend.artifact import ArtifactWriter
from .backends.ascend.encode import EXPERT_SCALE_ALSO
from .activation_checks import check_finite, check_logits
from .calib_data import calibration_shortfall, make_windows, read_texts, sample_windows_from_model
from .checkpoint_checks import check_seq_len, check_token_ids
from .config import CompileOptions
from .engine_check import check_engine, engine_report, pipeline_features
from .errors import QCError
from .ir.capture import HFSkeleton, LayerInputs
from .ir.moe import is_moe_layer, routed_token_counts
from .loading import check_float16_range, dtype_name, load_tokenizer, open_checkpoint
from .memory import check_sampling_memory, long_lived_frozen, release_freed_memory
from .model_zoo import resolve_model_dir
from .outdir import OutputFolder, estimate_output_bytes, resolved, symlink_on_path
from .passes import TAIL, LayerContext, PassManager, make_pass
from .passes.group_size import first_claim, layer_fused_groups, layer_linear_shapes, model_linear_shapes, \
    resolve_group_sizes
from .passes.moe_checks import check_expert_passes
from .passes.instruments import DumpInstrument, StatsInstrument, TimingInstrument, check_dump_filter
from .passes.simulate_tp import check_simulate_tp
from .policy import policy_excludes, resolve_policy
from .report import write_report
from .executable import EXECUTABLE_DIR, HEAD_ARTIFACT_NAMES, ExecutableWriter
from .model import auto_batch_size, head_from_checkpoint, run_layer_batched
from .targets import check_target, get_target



def build_pipeline(opts: CompileOptions) -> PassManager:
    """The user's passes plus the internal tail, validated (no work done)."""
    user = [make_pass(name, options) for name, options in opts.passes]
    for p in user:
        if p.internal:
            raise QCError(f"pass {p.name} is internal (the compiler appends it); remove it from --passes")
    if user and all(getattr(p, "standalone", False) for p in user):
        # only float passes whose result is a model of its own (e.g. `--passes sparse:ratio=0.5`): no tail,
        # the artifact and the executable graph are the transformed float model (every tensor FLOAT)
        pm = PassManager(user)
    else:
        pm = PassManager(user + [make_pass(n) for n in TAIL])
    pm.validate()
    return pm


def check_exclude_matches(patterns, config: dict) -> None:
    """Each --exclude regex must match some Linear of the model: one matching none (a typo such as
    'mlp\\.down_porj', or a name from another architecture) quantized every Linear the user meant to keep float,
    without a word. A pattern that matches only modules that are float anyway (lm_head, the embedding, a MoE
    router `mlp.gate` or `mlp.shared_expert_gate`) is accepted."""
    layers = range(int(config["num_hidden_layers"]))
    names = list(model_linear_shapes(config)) + ["lm_head", "model.embed_tokens"] + [
        f"model.layers.{i}.mlp.{gate}" for i in layers for gate in ("gate", "shared_expert_gate")]
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            raise QCError(f"--exclude '{pattern}' (or a recipe's exclude) matches no Linear of this model; expected a "
                          "regex found in full Linear names, e.g. 'mlp\\.down_proj' for model.layers.0.mlp.down_proj")


def check_exclude_groups(patterns, config: dict) -> None:
    """An --exclude that splits q/k/v or gate/up (an expert's too: engines fuse them) is an error before any work."""
    for i in range(int(config["num_hidden_layers"])):
        for group in layer_fused_groups(config, i):
            hit = [n for n in group if any(re.search(p, f"model.layers.{i}.{n}") for p in patterns)]
            if hit and len(hit) != len(group):
                rest = [n for n in group if n not in hit]
                raise QCError(f"--exclude matches model.layers.{i}.{hit[0]} but not {_names(rest)}: engines fuse "
                              f"{_group_name(group)}, so exclude all of them or none")


def _group_name(group) -> str:
    """q_proj/k_proj/v_proj, or 'mlp.experts.* (every expert's gate/up/down)' for a MoE layer's experts."""
    if len(group) > 3:
        return "mlp.experts.* (every expert's gate_proj/up_proj/down_proj: one fused-MoE scheme per layer)"
    return "/".join(n.split(".")[-1] for n in group)


def _names(names) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def check_scheme_groups(passes, config: dict, exclude=()) -> None:
    """Scheme `match` options (with --exclude) that would give q/k/v or gate/up different schemes, or a
    scheme pass that would quantize no Linear at all, are errors before any work."""
    owner = {n: first_claim(passes, n, exclude) for n in model_linear_shapes(config)}
    for i in range(int(config["num_hidden_layers"])):
        for group in layer_fused_groups(config, i):
            owners = [owner[f"model.layers.{i}.{n}"] for n in group]
            if len({id(o) for o in owners}) > 1:
                if len(group) <= 3:
                    got = ", ".join(f"{n.split('.')[-1]}: {o.name if o else 'float'}" for n, o in zip(group, owners))
                    where = f"model.layers.{i}.{group[0].rsplit('.', 1)[0]}.{_group_name(group)}"
                else:  # a MoE layer's experts: name the first two Linears whose schemes differ
                    j = next(j for j, o in enumerate(owners) if o is not owners[0])
                    got = ", ".join(f"{group[x]}: {owners[x].name if owners[x] else 'float'}" for x in (0, j))
                    where = f"model.layers.{i}.{_group_name(group)}"
                raise QCError(f"the schemes would split {where} "
                              f"({got}): engines fuse them, so one scheme must take all of them (adjust the "
                              f"passes' match option or --exclude)")
    for p in passes:
        if getattr(p, "claims", None) is not None and not any(o is p for o in owner.values()):
            raise QCError(f"pass {p.name} (match {p.options.match!r}) would quantize no Linear: --exclude or the "
                          f"scheme passes before it take every Linear it matches")


def check_specs_honoured(passes) -> None:
    """Every scheme pass's spec is one the backend lowers exactly (backends/ascend/capability.py); else an
    error before any work (never codes silently written at another width)."""
    from .backends.ascend.capability import unhonoured
    for p in passes:
        if callable(getattr(p, "observed_spec", None)):
            spec = p.observed_spec(getattr(p.options, "group", 0) or 0)
            why = unhonoured(spec)
            if why:
                raise QCError(f"pass {p.name} asks for {spec.describe()}: {why}")


def check_calib_seq_len(opts: CompileOptions, ckpt) -> CompileOptions:
    """--seq-len beyond max_position_embeddings is an error before any work; a default beyond it is lowered to it."""
    limit = ckpt.config.get("max_position_embeddings")
    if opts.seq_len is not None:
        check_seq_len(opts.seq_len, limit)
    elif isinstance(limit, int) and opts.calib_shape()[1] > limit:
        return dataclasses.replace(opts, seq_len=limit)
    return opts


def _calibration_windows(opts, skeleton, tokenizer, texts, log):
    if texts is not None:
        n, seq_len = opts.calib_shape()
        windows = make_windows(tokenizer, texts, seq_len, n)
        return windows, _calibration_source(opts, texts, windows)
    n, seq_len = opts.calib_shape()
    log(f"no --calib: sampling {n} x {seq_len} tokens from the float model (seed 0)")
    with skeleton.float_model() as model:  # the validated safetensors, never *.bin (capture.py)
        windows = sample_windows_from_model(model, tokenizer, n, seq_len, seed=0)
    return windows, (f"sampled from the float model itself ({windows.shape[0]} x {windows.shape[1]} tokens, "
                     "seed 0, temperature 1)")


def shard_limit(part_file_size: int | None) -> dict:
    """ArtifactWriter arguments for msModelSlim's part_file_size (GiB of 2**30 bytes, its ONE_GB_FILE_BYTES;
    0 = everything in one file: msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py
    `get_safetensors_writer`)."""
    if part_file_size is None:
        return {}
    return {"max_shard_bytes": part_file_size * 2**30 if part_file_size > 0 else 2**62}


def _check_dump(dump: Path | None, model_dir: Path) -> None:
    if dump is None:
        return
    where, model = resolved(dump), resolved(model_dir)
    if where == model or model in where.parents:  # it wrote layerNNN/ into the model folder
        raise QCError(f"--dump {dump} {'is' if where == model else 'lies inside'} the model folder {model_dir}: "
                      "the model folder is an input and is never written; choose another --dump")
    why = symlink_on_path(dump)
    if why:  # rule 1: written where it is named, never at a link's target
        raise QCError(f"--dump {dump} {why}: give the folder itself; choose another --dump")
    if dump.exists() and not dump.is_dir():
        raise QCError(f"--dump {dump} exists and is not a folder")
    try:
        dump.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QCError(f"cannot create --dump folder {dump} ({e.strerror or e})") from None


def _add_layer_tensors(writer, ctx: LayerContext, gm, ckpt) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Stream layer i's tensors: quantized Linears from ctx.artifact, every other tensor FLOAT from the
    transformed graph (smoothing / awq change norm weights and float Linears; shift adds `<norm>.bias`).
    Returns ({Linear: quant type}, {name inside the layer: tensor written}) (the executable graph reads
    the tensors it shares with the artifact from there)."""
    types, written = {}, {}
    for linear, art in sorted(ctx.artifact.items()):
        for suffix, t in sorted(art.tensors.items()):
            qtype = "FLOAT" if suffix == "bias" else art.quant_type
            writer.add(f"{ctx.prefix}{linear}.{suffix}", t, qtype)
            written[f"{linear}.{suffix}"] = t
        if "weight" not in art.tensors:  # W4A16 experts store weight_packed: the engines still read `.weight`'s type
            writer.describe(f"{ctx.prefix}{linear}.weight", art.quant_type)
        types[linear] = art.quant_type
    for name, (t, qtype) in sorted(ctx.extra_tensors.items()):  # kv8 / fa3 scales (C8, FAQuant)
        writer.add(ctx.prefix + name, t, qtype)
        written[name] = t
    linears = layer_linear_shapes(ckpt.config, ctx.index)
    for name, t in sorted(gm.state_dict().items()):
        linear = name.rsplit(".", 1)[0]
        if linear in ctx.artifact:
            continue
        if not (ckpt.has(ctx.prefix + name) or name.endswith("norm.bias")):
            continue  # a constant export lifted into the graph, not a model tensor
        writer.add(ctx.prefix + name, t, "FLOAT")
        written[name] = t
        if linear in linears:
            types[linear] = "FLOAT"
    covered = set(written) | {f"{linear}.weight" for linear in ctx.artifact}  # a weight stored packed under another name
    lost = sorted(n for n in ckpt.weight_map if n.startswith(ctx.prefix) and n[len(ctx.prefix):] not in covered)
    if lost:
        raise RuntimeError(f"layer {ctx.index}: tensors {lost[:3]} of the checkpoint were neither quantized "
                           "nor kept in the graph")
    return types, written


def compile_model(opts: CompileOptions, log=None) -> dict:
    """Run a whole compile; returns the report dict. Raises QCError on bad input (before any work)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not distributed.is_writer():  # several processes: rank 0 alone speaks and writes (distributed.py)
        log = _silent
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(opts.model)
    dump = opts.dump or knobs.dump_dir()
    out = OutputFolder(opts.out, opts.force, models=[model_dir], folders=[dump], log=log,
                       files=[(opts.calib_option, opts.calib), ("--recipe", opts.recipe_path)],
                       resume=opts.resume, option=opts.out_option)  # outdir.py: exit 2
    ckpt = open_checkpoint(model_dir, opts.dtype, opts.trust_remote_code, log=log)
    opts = check_calib_seq_len(opts, ckpt)
    target = get_target(opts.target)
    pm = build_pipeline(opts)
    quant_types = {p.quant_type for p in pm.passes if p.quant_type}
    warnings = check_target(target, ckpt.dtype, quant_types)
    if target.name == "onnx":
        from .backends.onnx.export import check_available
        check_available()  # onnx / onnxscript / onnxruntime importable, before any work
    check_exclude_matches(opts.exclude, ckpt.config)  # the user's patterns, before the policy's are added
    policy = resolve_policy(opts.policy, ckpt.model_type, pm.passes)  # policy.py: adds exclusions
    opts = dataclasses.replace(opts, policy=policy, exclude=tuple(opts.exclude) + policy_excludes(policy))
    check_exclude_groups(opts.exclude, ckpt.config)
    check_scheme_groups(pm.passes, ckpt.config, opts.exclude)
    check_specs_honoured(pm.passes)
    check_expert_passes(pm.passes, ckpt.config, opts.exclude)
    for p in pm.passes:  # each pass's own checks before work (Pass.check_model: fallback's level)
        p.check_model(pm.passes, ckpt.config, opts.exclude)
    distributed.check_supported(pm.passes, resume=opts.resume)  # several processes: what is not reduced is refused
    pm.passes, group_size = resolve_group_sizes(pm.passes, ckpt.config, opts.exclude)
    check_simulate_tp(pm.passes, ckpt.config, group_size)
    features = pipeline_features(pm.passes, ckpt.config, opts.exclude, ckpt.has, target.name, ckpt.model_type)
    warnings = warnings + check_engine(opts.engine, features)  # --engine: exit 2 here if it cannot load it
    _check_dump(dump if distributed.is_writer() else None, model_dir)
    if (opts.dump_layers is not None or opts.dump_passes is not None) and not dump:
        raise QCError("--dump-layers / --dump-passes select what --dump writes: give --dump DIR too")
    check_dump_filter(opts.dump_layers, opts.dump_passes, ckpt.num_layers, pm.names)
    # bf16 -> fp16 (e.g. ascend310p, fp16 only): every weight in fp16's range, checked before any work
    check_float16_range(ckpt, "compile with --dtype bfloat16" if torch.bfloat16 in target.dtypes else
                        f"target {target.name} runs float16 only (use a checkpoint that fits it, or "
                        f"--target ascend910b --dtype bfloat16)")
    texts = read_texts(opts.calib) if opts.calib is not None else None  # a bad file fails before any work
    if texts is None and opts.calib_texts:
        texts = list(opts.calib_texts)
    if texts is None:  # calibration sampled from the whole float model: it must fit (memory.py)
        check_sampling_memory(ckpt, *opts.calib_shape())
    for w in warnings:
        log(f"warning: {w}")
    out.check_free_space(estimate_output_bytes(ckpt, pm.passes, opts.exclude))
    phases = PhaseTimer()
    phases.seconds["checks before work"] = time.perf_counter() - t0
    if not distributed.is_writer():  # ranks > 0 compute their share of the calibration and write nothing
        return _compile_into(None, opts, ckpt, pm, target, texts, log, t0, warnings, group_size, phases,
                             engine_report(features))
    adopt, restored, windows = None, None, None
    if opts.resume:
        with phases("resume: validate state"):
            adopt, restored, windows = _resume_point(out, opts, ckpt, texts, log)
    with out.staging(adopt) as tmp:  # removed on any failure; a full disk is one line, exit 1
        report = _compile_into(tmp, opts, ckpt, pm, target, texts, log, t0, warnings, group_size, phases,
                               engine_report(features), restored=restored, windows=windows)
        out.commit()  # umask modes; no-replace (or atomic exchange with --force), signals deferred
    return report


def _silent(msg: str) -> None:
    """The log of ranks > 0."""


def _resume_point(out: OutputFolder, opts, ckpt, texts, log):
    """--resume: (the stopped compile's folder, its validated state, the calibration windows when from text)
    or (None, None, None) when there is none. QCError (exit 2; the folder left as it is) when its state is
    damaged or was made with another model, other options or calibration (resume.py)."""
    candidate = out.find_resumable()
    if candidate is None:
        log(f"--resume: no interrupted compile of {opts.out} to resume: compiling from layer 0")
        return None, None, None
    windows = None
    if texts is not None:  # the windows' digest is part of the fingerprint (cheap: tokenizing the text)
        windows, _ = _calibration_windows(opts, None, load_tokenizer(ckpt.path, ckpt.trust_remote_code), texts, log)
    expected = resume.fingerprint(opts, ckpt, resume.calibration_digest(windows, opts.calib_shape()))
    restored = resume.load(candidate.folder, expected, ckpt.num_layers)
    log(f"--resume: continuing {candidate.folder} at layer {restored.done} of {ckpt.num_layers}")
    return candidate, restored, windows


class PhaseTimer:
    """Wall seconds per phase of a compile (`with phases("name"):`), for the report: where the time goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _compile_into(tmp: Path | None, opts, ckpt, pm, target, texts, log, t0, warnings, group_size: int = 0,
                  phases: PhaseTimer | None = None, engines: dict | None = None,
                  restored: resume.Restored | None = None, windows=None) -> dict:
    """The work inside the staging folder `tmp`: from layer 0, or, with `restored` (a validated state of a
    stopped compile, now in `tmp`), from its next layer. After every layer the resume state is committed (one
    process only). Ranks > 0 of several processes get tmp None: they compute and write nothing."""
    phases = phases or PhaseTimer()
    timing = TimingInstrument()
    if restored is None:
        with phases("calibration data"):
            tokenizer = load_tokenizer(ckpt.path, ckpt.trust_remote_code)
            skeleton = HFSkeleton(ckpt)
            windows = calib_source = None
            if distributed.rank() == 0:  # several processes: rank 0 makes the windows, every rank gets them
                windows, calib_source = _calibration_windows(opts, skeleton, tokenizer, texts, log)
                check_token_ids(windows, ckpt.config.get("vocab_size"), tokenizer, "calibration text")
            windows, calib_source = distributed.broadcast_windows(windows, calib_source)
        windows_shape = tuple(windows.shape)
        distributed.check_shares(windows.shape[0])
        first, stop = distributed.shard(windows.shape[0])  # this rank's contiguous share (all of it alone)
        with phases("layer 0 inputs"):
            inputs = skeleton.layer0_inputs(windows[first:stop])
        fingerprint = resume.fingerprint(opts, ckpt, resume.calibration_digest(
            windows if texts is not None else None, opts.calib_shape()))
        del windows
        batch_size = opts.batch_size or auto_batch_size(inputs.hidden.shape[1])
        presweeps = {}  # model-wide passes (Pass.presweep, e.g. fallback): measure every layer first
        for index, p in enumerate(pm.passes):
            if p.model_wide:
                with phases(f"{p.name} pre-sweep"):
                    pm.passes[index], presweeps[p.name] = p.presweep(pm.passes, skeleton, inputs, ckpt, opts.exclude,
                                                                     batch_size, log, EXPERT_SCALE_ALSO)
        writer = executable = saver = None
        if tmp is not None:
            writer = ArtifactWriter(tmp, ckpt.dtype, **shard_limit(opts.part_file_size), resumable=True)
            executable = ExecutableWriter(tmp / EXECUTABLE_DIR)
            writer.add("model.embed_tokens.weight", skeleton.embed_weight, "FLOAT")
        if tmp is not None and distributed.world() == 1:  # a rank's state holds only its share: not resumable
            saver = resume.StateSaver(tmp, fingerprint, ckpt.num_layers)
        layers_report, extra_description, start = [], {}, 0  # extra: top-level description keys set by passes
    else:
        with phases("resume: restore state"):
            removed = resume.sweep(tmp, restored)  # what the stopped compile did after its last commit
            if removed:
                log(f"--resume: removed {len(removed)} files of work after layer {restored.done - 1}'s commit")
            skeleton = HFSkeleton(ckpt)
            rec = restored.record
            inputs, start, windows_shape = restored.inputs, restored.done, tuple(rec["windows_shape"])
            calib_source = _calibration_source(opts, texts, windows) if texts is not None else rec["calibration"]
            presweeps = dict(rec["presweeps"])
            pm.passes = [p.restore(presweeps[p.name]) if p.name in presweeps else p for p in pm.passes]
            layers_report, extra_description = list(rec["layers"]), dict(rec["extra_description"])
            for k, v in rec["pass_seconds"].items():
                timing.seconds[k] += v
            for k, v in rec["phase_seconds"].items():
                phases.seconds[k] = phases.seconds.get(k, 0.0) + v
            batch_size = opts.batch_size or auto_batch_size(inputs.hidden.shape[1])
            writer = ArtifactWriter.restore(tmp, ckpt.dtype, restored.artifact)
            executable = ExecutableWriter(tmp / EXECUTABLE_DIR, state=restored.executable)
            saver = resume.StateSaver(tmp, restored.fingerprint, ckpt.num_layers, restored)
    for w in calibration_shortfall(opts.calib_shape(), windows_shape, opts.calib):
        log(f"warning: {w}")
        warnings.append(w)

    instruments = [timing, StatsInstrument()]
    dump = opts.dump or knobs.dump_dir()
    if dump and tmp is not None:
        instruments.append(DumpInstrument(dump, opts.dump_layers, opts.dump_passes))
    pm.instruments = instruments
    # memory: the head (embedding, lm_head) is not held while the layers compile; it is read again after them
    skeleton.release_embedding()

    def record() -> dict:  # what the report needs of the layers done (resume state)
        return {"layers": layers_report, "extra_description": extra_description, "presweeps": presweeps,
                "calibration": calib_source, "windows_shape": list(windows_shape),
                "pass_seconds": dict(timing.seconds), "phase_seconds": dict(phases.seconds)}

    bar = tqdm(range(start, ckpt.num_layers), desc="compiling layers", unit="layer", file=sys.stderr,
               disable=not knobs.progress_enabled(), initial=start, total=ckpt.num_layers)
    with long_lived_frozen():  # each layer's release_freed_memory scans only what layers made (memory.py)
        for i in bar:
            t_layer = time.perf_counter()
            with phases("capture (torch.export)"):
                gm = skeleton.capture_layer(i, inputs)
            ctx = LayerContext(index=i, inputs=inputs, dtype=ckpt.dtype, exclude=tuple(opts.exclude),
                               batch_size=batch_size, expert_scale_also=EXPERT_SCALE_ALSO)
            try:
                with phases("passes"):
                    gm = pm.run(gm, ctx)
                with phases("layer forward (as compiled)"):
                    out_hidden = run_layer_batched(gm, inputs.hidden, inputs.position_embeddings, batch_size)
                    check_finite(out_hidden, i, ckpt.dtype, "as compiled")  # the executable graph computes exactly this
            except QCError:
                if ckpt.dtype == torch.float16:  # the usual cause: the float layer itself overflows float16
                    float_gm = skeleton.capture_layer(i, inputs)
                    check_finite(run_layer_batched(float_gm, inputs.hidden, inputs.position_embeddings, batch_size),
                                 i, ckpt.dtype, "float, before any pass")
                raise
            expert_tokens = None
            if is_moe_layer(ckpt.config, i):
                with phases("experts: routed calibration tokens"):
                    counts = routed_token_counts(gm, inputs.hidden, inputs.position_embeddings, batch_size)
                    # several processes: each routed its own share of the windows; the report counts them all
                    expert_tokens = distributed.all_sum(torch.tensor(counts)).tolist()
            types, written = {}, None
            if writer is not None:
                with phases("artifact tensors"):
                    types, written = _add_layer_tensors(writer, ctx, gm, ckpt)
                extra_description.update(ctx.description)
                with phases("executable graph"):
                    executable.add(gm, inputs, in_artifact=written)  # what the artifact holds is not stored twice
            layers_report.append({"layer": i, "linears": types, "seconds": round(time.perf_counter() - t_layer, 3),
                                  "passes": _jsonable(ctx.records)})
            if expert_tokens is not None:  # MoE layer: calibration tokens the router sent to each expert (ir/moe.py)
                layers_report[-1]["expert_tokens"] = expert_tokens
            inputs = LayerInputs(hidden=out_hidden, position_embeddings=inputs.position_embeddings)
            del gm, ctx, written  # the layer's tensors are on disk: hold none of them while the next layer compiles
            release_freed_memory()  # peak RSS independent of depth (memory.py)
            if saver is not None:
                with phases("resume state"):  # a kill from here on resumes at layer i + 1 (resume.py)
                    saver.commit(i + 1, inputs, writer, executable, _jsonable(record()))
            knobs.test_kill_after_layer(i)
            knobs.test_pause(f"layer{i}")
    with phases("head, logits check, finish"):
        if writer is None:  # ranks > 0: their share's logits are checked too, nothing is written
            check_logits(head_from_checkpoint(ckpt, skeleton.rotary), inputs.hidden, ckpt.dtype)
            return {"rank": distributed.rank(), "layers": layers_report}
        description = _finish(writer, executable, ckpt, skeleton, inputs, target, pm, group_size, extra_description)

    report = {
        "model": str(opts.model), "model_dir": str(ckpt.path), "architecture": ckpt.architecture,
        "target": target.name, "dtype": dtype_name(ckpt.dtype), "passes": pm.names,
        "pass_options": [[n, {k: str(v) for k, v in o.items()}] for n, o in opts.passes],
        "source": opts.source, "notes": list(opts.notes), "processes": distributed.world(),
        "exclude": list(opts.exclude), "policy": opts.policy, "calibration": calib_source,
        "model_quant_type": description["model_quant_type"], "warnings": warnings,
        "engine": opts.engine, "engines": engines or {},
        "pass_seconds": {k: round(v, 3) for k, v in timing.seconds.items()},
        # wall seconds per phase (passes: the sum of pass_seconds); the process start (imports) is not in it
        "phase_seconds": {k: round(v, 3) for k, v in phases.seconds.items()},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{name: _jsonable(r) for name, r in presweeps.items()},  # model-wide passes' reports ("fallback")
        "layers": layers_report,
    }
    if restored is not None:  # seconds above add up both runs; wall_seconds and peak RSS are this run's
        report["resumed_at_layer"] = restored.done
    if target.name == "onnx":  # lowered from the executable graph written above (backends/onnx/export.py)
        from .backends.onnx.export import export_onnx
        report["onnx"] = export_onnx(tmp, log=log)
    write_report(tmp, report)
    writer.drop_resume_files()  # complete: nothing resumes from here (a kill now leaves a stale folder)
    if saver is not None:
        saver.discard()
    return report


def _calibration_source(opts, texts, windows) -> str:
    """The report's calibration line for windows made from text."""
    where = opts.calib if opts.calib is not None else f"{len(texts)} calibration texts given inline"
    return f"{where} ({windows.shape[0]} x {windows.shape[1]} tokens)"


def _finish(writer, executable, ckpt, skeleton, inputs, target, pm, group_size, extra_description) -> dict:
    """The head (read again now: held by nobody while the layers compiled), its logits check, the artifact's
    last tensors and files, the executable graph's head and model.json; returns the description."""
    head = head_from_checkpoint(ckpt, skeleton.rotary)
    check_logits(head, inputs.hidden, ckpt.dtype)
    writer.add("model.norm.weight", head.norm_weight, "FLOAT")
    if not ckpt.tie_word_embeddings:
        writer.add("lm_head.weight", head.lm_head_weight, "FLOAT")
    description = writer.finish(ckpt.path, ckpt.config, group_size=group_size,
                                extra_description=extra_description, tied_lm_head=ckpt.tie_word_embeddings)
    head_in_artifact = {k: v for k, v in HEAD_ARTIFACT_NAMES.items()
                        if not (k == "lm_head.weight" and ckpt.tie_word_embeddings)}  # written above
    executable.save_head(head, tied=ckpt.tie_word_embeddings, in_artifact=head_in_artifact)
    executable.finish({
        "architecture": ckpt.architecture, "model_type": ckpt.model_type, "dtype": dtype_name(ckpt.dtype),
        "num_layers": ckpt.num_layers, "hidden_size": ckpt.config["hidden_size"],
        "vocab_size": ckpt.config["vocab_size"], "rms_norm_eps": head.eps,
        "attention_scaling": head.attention_scaling, "tie_word_embeddings": ckpt.tie_word_embeddings,
        "target": target.name, "passes": pm.names})
    return description


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
