"""Where a train step's time goes, for benchmarks/models.py: torch.profiler over a few eager train steps of one
model, with a ``record_function`` around every layer's forward. A layer's *self* time is what its forward spends
outside the ops it calls (Python, argument checks, strategy and cache look-ups, dispatch): the fixed cost per call
that a network of small layers pays many times. The profiler adds a few microseconds per op to every figure, to
dense and tensorized layers alike."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

TOP_OPS = 12
LABELS = ("module::", "step::")


def _targets(model):
    """(name, module) of every tensorized layer and every leaf module outside one."""
    from tnlayers.layers.tensorized import TensorizedLayer
    tensorized = [name for name, m in model.named_modules() if isinstance(m, TensorizedLayer)]
    for name, m in model.named_modules():
        if isinstance(m, TensorizedLayer) or (not any(m.children()) and name
                                              and not any(name.startswith(t + ".") for t in tensorized)):
            yield name, m


def annotate(model) -> list:
    """Forward hooks that open and close a ``module::<name>`` profiler range per call; returns their handles."""
    stack, handles = [], []

    def pre(label):
        def hook(module, inputs):
            stack.append(record_function(label).__enter__())
        return hook

    def post(module, inputs, output):
        stack.pop().__exit__(None, None, None)
    for name, m in _targets(model):
        handles += [m.register_forward_pre_hook(pre(f"module::{name}")), m.register_forward_hook(post)]
    return handles


def _device_self(avg) -> float:
    return getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0))


def profile_child(spec: dict, prepare) -> dict:
    """Profile ``spec["steps"]`` train steps of one model (after eager warm-up steps, so "auto" has decided);
    ``prepare(spec)`` gives (device, model, x, y, optimizer), as for the timed runs."""
    device, model, x, y, opt = prepare(spec)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    clock = time.process_time if spec.get("clock") == "cpu" else time.perf_counter
    plain = []
    for i in range(3 + spec["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            plain.append(clock() - start)
    handles = annotate(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = clock()
    with profile(activities=activities) as prof:
        for _ in range(spec["steps"]):
            with record_function("step::forward"):
                loss = F.cross_entropy(model(x), y)
            with record_function("step::backward"):
                loss.backward()
            with record_function("step::optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    profiled = (clock() - start) / spec["steps"]
    for handle in handles:
        handle.remove()
    return summarize(prof, model, spec, min(plain), profiled)


def summarize(prof, model, spec, plain_s: float, profiled_s: float) -> dict:
    steps, types = spec["steps"], {name: type(m).__name__ for name, m in model.named_modules()}
    strategy = {name: m.last_strategy for name, m in model.named_modules() if getattr(m, "last_strategy", None)}
    modules, phases, ops = {}, {}, 0
    for event in prof.events():
        if event.name.startswith("module::"):
            name = event.name[len("module::"):]
            row = modules.setdefault(name, dict(type=types.get(name, "?"), strategy=strategy.get(name), calls=0,
                                                total_ms=0.0, self_ms=0.0, ops=0))
            row["calls"] += 1
            row["total_ms"] += event.cpu_time_total / 1e3
            row["self_ms"] += event.self_cpu_time_total / 1e3
            row["ops"] += sum(1 for c in event.cpu_children if not c.name.startswith(LABELS))
        elif event.name.startswith("step::"):
            phase = event.name[len("step::"):]
            phases[phase] = phases.get(phase, 0.0) + event.cpu_time_total / 1e3
        elif event.name.startswith("aten::"):  # an op dispatched from Python or autograd, not inside another op
            ops += not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
    for row in modules.values():
        for field in ("total_ms", "self_ms"):
            row[field] /= steps  # per step; calls and ops stay totals (per call: / calls)
    averages = [a for a in prof.key_averages() if not a.key.startswith(LABELS)]
    averages.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    top = [dict(op=a.key, calls=a.count / steps, self_ms=a.self_cpu_time_total / steps / 1e3,
                total_ms=a.cpu_time_total / steps / 1e3, device_ms=_device_self(a) / steps / 1e3)
           for a in averages[:TOP_OPS]]
    return dict(spec=spec, params=sum(p.numel() for p in model.parameters()), step_ms=plain_s * 1e3,
                profiled_step_ms=profiled_s * 1e3, phases={k: v / steps for k, v in phases.items()},
                ops_per_step=ops / steps, modules=modules, top_ops=top)


def _name(result) -> str:
    spec = result["spec"]
    return spec["format"] if spec["rank"] is None else f"{spec['format']} {spec['rank']}"


def format_profiles(profiled: list) -> list:
    """Markdown lines: per variant totals, per conv layer forward (dense next to each variant), top ops."""
    ok = [p for p in profiled if "error" not in p]
    lines = [f"- profile of {_name(p)}: FAILED {p['error']}" for p in profiled if "error" in p]
    if not ok:
        return lines
    spec = ok[0]["spec"]
    lines += [f"## Profile: where a train step's time goes ({spec['model']}, eager, {spec['steps']} profiled steps)",
              "", "Per step. Layer forward: the `module::` ranges around every layer's forward; *self*: the part "
              "outside the ops it calls (Python, checks, look-ups, dispatch), the fixed cost per call. Ops: aten ops "
              "dispatched from Python or autograd (not those inside another op), forward and backward. The step "
              f"columns are {'CPU' if spec.get('clock') == 'cpu' else 'wall'} time (the best of "
              f"{spec['steps']} steps, and the profiled steps' mean); the profiler's own figures are wall time, "
              "each op a few microseconds longer for the profiling.", "",
              "| variant | step ms (no profiler) | profiled | forward | backward | optimizer | ops per step | "
              "conv layers: forward ms | of which self ms | other layers: forward ms | of which self ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in ok:
        conv = [r for r in p["modules"].values() if "Conv" in r["type"]]
        other = [r for r in p["modules"].values() if "Conv" not in r["type"]]
        ph = p["phases"]
        lines.append(f"| {_name(p)} | {p['step_ms']:.1f} | {p['profiled_step_ms']:.1f} | {ph.get('forward', 0):.1f} | "
                     f"{ph.get('backward', 0):.1f} | {ph.get('optimizer', 0):.1f} | {p['ops_per_step']:.0f} | "
                     f"{sum(r['total_ms'] for r in conv):.1f} | {sum(r['self_ms'] for r in conv):.1f} | "
                     f"{sum(r['total_ms'] for r in other):.1f} | {sum(r['self_ms'] for r in other):.1f} |")
    names = [n for n, r in ok[0]["modules"].items() if "Conv" in r["type"]]
    header = "| layer | " + " | ".join(f"{_name(p)}: forward ms | self ms | ops/call | strategy" for p in ok) + " |"
    lines += ["", "### Conv layers, forward per step (all calls)", "", header,
              "|---|" + "---:|---:|---:|---|" * len(ok)]
    for name in names:
        cells = []
        for p in ok:
            r = p["modules"].get(name)
            cells.append("- | - | - | -" if r is None else f"{r['total_ms']:.2f} | {r['self_ms']:.2f} | "
                         f"{r['ops'] / r['calls']:.0f} | {r['strategy'] or r['type']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for p in ok:
        device = spec["device"].startswith("cuda")
        lines += ["", f"### Top ops by self CPU time: {_name(p)}", "",
                  "| op | calls/step | self ms/step | total ms/step |" + (" device ms/step |" if device else ""),
                  "|---|---:|---:|---:|" + ("---:|" if device else "")]
        for op in p["top_ops"]:
            lines.append(f"| `{op['op']}` | {op['calls']:.0f} | {op['self_ms']:.2f} | {op['total_ms']:.2f} |"
                         + (f" {op['device_ms']:.2f} |" if device else ""))
    return lines
