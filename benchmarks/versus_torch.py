"""covidx (TensorFlow/Keras) against its PyTorch references on the same CPU, measured side by side.

Two worker processes, one TensorFlow (this interpreter) and one PyTorch (``--torch-python``, a separate
virtual environment with ``benchmarks/requirements-torch.txt``; PyTorch never enters covidx's own
requirements), build the same workload and then take turns: the driver asks one to time ``--repeats``
batches, waits for the answer, then asks the other, for ``--rounds`` rounds; a worker only computes while
it is asked, so the two never run at the same time and a change of machine load hits both alike. Each
round also times an fp32 4096x4096 matmul in both, so the achieved GFLOP/s of every workload can be set
against the matmul figure of the same run. Printed: medians (images/s), ratio covidx / PyTorch, GFLOP/s.

Rows (``--rows`` selects a comma-separated subset; batch 4 at 512 px, 8 at 224 unless said):

====================  ===============================================  =================================
row                   covidx                                           PyTorch reference
====================  ===============================================  =================================
seme-resnet50-512     SEME-ResNet50 @512 inference                     torchvision ResNet50
seme-densenet169-512  SEME-DenseNet169 @512 inference                  torchvision DenseNet169
dpn92                 DPN-92 @224 inference                            timm dpn92
se-dpn92              SE-DPN-92 @224 inference                         timm dpn92 (no SE)
ma-net                MA-Net (MAG-SD) @224, 1 channel, inference       torchvision ResNet50, 1 channel
ensemble              concatenated ensemble @224 inference             VGG19 + DenseNet121 + EfficientNet-B0
resnet50-train        ResNet50 train step @224, SGD momentum 0.9       torchvision ResNet50, same step
dpn92-train           DPN-92 train step @128, batch 16, SGD momentum   timm dpn92, same step
magsd-train           MAG-SD iteration: 1 + 3 attention-guided         ResNet50 + attention maps + BAP,
                      forwards, 1 backward, @224, 1 channel            the same 1 + 3 forwards, 1 backward
seme-resnet50-512-bf16  SEME-ResNet50 @512, bfloat16 (inference_copy)  ResNet50 under torch.autocast(bf16)
resnet50-train-bf16   ResNet50 train step @224, mixed_bfloat16         the same step, forward under autocast
====================  ===============================================  =================================

PyTorch inference runs under ``torch.inference_mode`` in NCHW and channels-last, each also with its
conv-BN pairs fused by ``torch.fx.experimental.optimization.fuse`` (as covidx's inference copy folds
them); the fastest of these (chosen at warm-up) is timed. covidx's training rows train the network as
``python -m covidx.train`` does: every BN one fused kernel forward and backward
(:func:`covidx.precision.fused_batch_norms`), bfloat16 kernel gradients as one matmul where oneDNN's
kernel is slow (:func:`covidx.layers.grouped_conv.fast_convolutions`), each variable's SGD update one
kernel (:class:`covidx.training.optimizers.FusedSGD`). Both frameworks use ``--threads`` threads (default: all cores).
FLOPs per image are counted in PyTorch (``torch.utils.flop_counter``) on the reference and used for both
sides' GFLOP/s (the architectures match to within the SE blocks / attention heads).

Usage::

    python benchmarks/versus_torch.py --torch-python /path/to/torch-venv/bin/python \\
        [--rows dpn92,dpn92-train] [--rounds 3] [--repeats 3] [--tf-jit]

The two halves run in separate interpreters, so each worker imports its framework inside its own
functions (never at module top).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# name: (label, PyTorch reference, image size, channels, batch, kind)
ROWS = {
    "seme-resnet50-512": ("SEME-ResNet50 @512, inference", "ResNet50", 512, 3, 4, "infer"),
    "seme-densenet169-512": ("SEME-DenseNet169 @512", "DenseNet169", 512, 3, 4, "infer"),
    "dpn92": ("DPN-92 @224", "timm dpn92", 224, 3, 8, "infer"),
    "se-dpn92": ("SE-DPN-92 @224", "timm dpn92, no SE", 224, 3, 8, "infer"),
    "ma-net": ("MA-Net @224 (1 channel)", "ResNet50, 1 channel", 224, 1, 8, "infer"),
    "ensemble": ("ensemble @224", "VGG19 + DenseNet121 + EfficientNet-B0", 224, 3, 8, "infer"),
    "resnet50-train": ("ResNet50 train step @224 (SGD momentum)", "ResNet50", 224, 3, 8, "train"),
    "dpn92-train": ("DPN-92 train step @128, batch 16", "timm dpn92", 128, 3, 16, "train"),
    "magsd-train": ("MAG-SD iteration @224 (1+3 forwards, 1 backward)", "ResNet50 MA-Net equivalent", 224, 1, 8,
                    "train"),
    "seme-resnet50-512-bf16": ("SEME-ResNet50 @512, bfloat16", "ResNet50, torch autocast bf16", 512, 3, 4, "infer"),
    "resnet50-train-bf16": ("ResNet50 train step @224, bfloat16", "ResNet50, torch autocast bf16", 224, 3, 8, "train"),
}
COVIDX_MODEL = {
    "seme-resnet50-512": "seme-resnet50", "seme-densenet169-512": "seme-densenet169", "dpn92": "dpn92",
    "se-dpn92": "se-dpn92", "ma-net": "mag-sd", "ensemble": "ensemble", "resnet50-train": "resnet50-gap",
    "dpn92-train": "dpn92", "magsd-train": "mag-sd", "seme-resnet50-512-bf16": "seme-resnet50",
    "resnet50-train-bf16": "resnet50-gap",
}
NUM_CLASSES = 4
MATMUL_N = 4096


# ----------------------------------------------------------------------------------------------- workers
class Worker:
    """A worker process answering one JSON request per line on its stdin with one JSON line."""

    def __init__(self, python: str, framework: str, threads: int, tf_jit: bool):
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"versus_torch_{framework}_", suffix=".log", delete=False)
        cmd = [python, os.path.abspath(__file__), "--worker", framework, "--threads", str(threads)]
        if tf_jit:
            cmd.append("--tf-jit")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.framework = framework

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"{self.framework} worker died on {request}; its log ({self.log.name}) ends:\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.framework} worker: {answer['error']}")
        return answer

    def close(self):
        try:
            self.ask(cmd="quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)


def serve(setup, matmul_rate, info):
    """Worker loop: ``setup`` builds a row and returns a zero-argument callable timing one batch."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the frameworks print goes to the log, not into the protocol
    step = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["cmd"] == "quit":
                answer = {}
            elif req["cmd"] == "info":
                answer = info()
            elif req["cmd"] == "setup":
                step = None
                step, extra = setup(req["row"])
                answer = extra
            elif req["cmd"] == "time":
                times = []
                for _ in range(req["repeats"]):
                    t0 = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t0)
                answer = {"times": times}
            elif req["cmd"] == "matmul":
                answer = {"gflops": matmul_rate()}
            else:
                answer = {"error": f"unknown command {req['cmd']!r}"}
        except Exception as e:  # reported to the driver, which stops with it
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        if req["cmd"] == "quit":
            return


# --------------------------------------------------------------------------------------- TensorFlow side
def tf_worker(args):
    import keras
    import numpy as np
    import tensorflow as tf

    import covidx.training  # noqa: F401  (registers the trainers)
    from covidx.models import create_model
    from covidx.layers.grouped_conv import fast_convolutions
    from covidx.precision import fused_batch_norms, inference_copy, precision_scope
    from covidx.training.magsd import MagSDTrainer
    from covidx.training.optimizers import FusedSGD
    from covidx.training.trainers import Trainer

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    rng = np.random.default_rng(0)

    def info():
        return {"version": f"TensorFlow {tf.__version__}, Keras {keras.__version__}"}

    def matmul_rate():
        a = tf.constant(rng.standard_normal((MATMUL_N, MATMUL_N)).astype("float32"))
        f = tf.function(lambda x: tf.matmul(x, x))
        f(a).numpy()
        t0 = time.perf_counter()
        f(a).numpy()
        return 2 * MATMUL_N**3 / (time.perf_counter() - t0) / 1e9

    def setup(row):
        keras.backend.clear_session()
        label, _, size, channels, batch, kind = ROWS[row]
        with precision_scope("bf16" if kind == "train" and row.endswith("-bf16") else "fp32"):
            net = create_model(COVIDX_MODEL[row], num_classes=NUM_CLASSES, image_size=size, channels=channels)
        x = tf.constant(rng.uniform(0, 255, (batch, size, size, channels)).astype("float32"))
        if kind == "infer":
            # What predict / evaluate / export run: the checkpoint's inference copy (BN folded into the
            # convolutions, the other BNs fused kernels; in bf16 for the -bf16 row).
            net = inference_copy(net, "bf16" if row.endswith("-bf16") else None)
            fn = tf.function(lambda t: net(t, training=False), jit_compile=args.tf_jit)

            def step():
                out = fn(x)
                (out[0] if isinstance(out, (list, tuple)) else out).numpy()
        else:
            # What python -m covidx.train trains: BN one fused kernel each way, bf16 kernel gradients as
            # matmuls where faster, each variable's update one kernel.
            net = fast_convolutions(fused_batch_norms(net))
            trainer = MagSDTrainer(net, seed=0) if row == "magsd-train" else Trainer(net)
            trainer.compile(optimizer=FusedSGD(1e-3, momentum=0.9), loss="categorical_crossentropy",
                            jit_compile=args.tf_jit)
            y = keras.utils.to_categorical(np.arange(batch) % NUM_CLASSES, NUM_CLASSES)

            def step():
                trainer.train_on_batch(x, y)
        step()  # trace + warm-up
        step()
        return step, {"params": int(net.count_params())}

    serve(setup, matmul_rate, info)


# ------------------------------------------------------------------------------------------ PyTorch side
def torch_worker(args):
    import timm
    import torch
    import torch.fx.experimental.optimization as fx_optimization
    import torch.nn.functional as F
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def info():
        return {"version": f"PyTorch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}"}

    def matmul_rate():
        a = torch.randn(MATMUL_N, MATMUL_N)
        torch.mm(a, a)
        t0 = time.perf_counter()
        torch.mm(a, a)
        return 2 * MATMUL_N**3 / (time.perf_counter() - t0) / 1e9

    def resnet50(channels):
        m = torchvision.models.resnet50(num_classes=NUM_CLASSES)
        if channels != 3:
            m.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        return m

    def reference(row, channels):
        if row.startswith(("seme-resnet50", "resnet50-train")) or row == "ma-net":
            return resnet50(channels)
        if row == "seme-densenet169-512":
            return torchvision.models.densenet169(num_classes=NUM_CLASSES)
        if row in ("dpn92", "se-dpn92", "dpn92-train"):
            return timm.create_model("dpn92", pretrained=False, num_classes=NUM_CLASSES)
        if row == "ensemble":
            return Ensemble()
        if row == "magsd-train":
            return MANet(channels)
        raise ValueError(row)

    class Ensemble(torch.nn.Module):
        """The three backbones run one after another, features concatenated, one classifier."""

        def __init__(self):
            super().__init__()
            self.vgg = torchvision.models.vgg19().features
            self.dense = torchvision.models.densenet121().features
            self.eff = torchvision.models.efficientnet_b0().features
            self.fc = torch.nn.Linear(512 + 1024 + 1280, NUM_CLASSES)

        def forward(self, x):
            feats = [F.adaptive_avg_pool2d(m(x), 1).flatten(1) for m in (self.vgg, self.dense, self.eff)]
            return self.fc(torch.cat(feats, 1))

    class MANet(torch.nn.Module):
        """ResNet50 (1 channel) + M=32 attention maps from layer2/3/4 + bilinear attention pooling + FC.

        The MAG-SD network (Li et al. §3.2) as covidx builds it, in PyTorch, for the iteration timing.
        """

        def __init__(self, channels, maps=32):
            super().__init__()
            r = resnet50(channels)
            self.stem = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
            self.layer2, self.layer3, self.layer4 = r.layer2, r.layer3, r.layer4
            self.att = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Conv2d(c, maps, 1, bias=False), torch.nn.BatchNorm2d(maps, eps=1e-3),
                                    torch.nn.ReLU()) for c in (2048, 1024, 512))
            self.fc = torch.nn.Linear(maps * 2048, NUM_CLASSES, bias=False)

        def forward(self, x):
            f1 = self.layer2(self.stem(x))
            f2 = self.layer3(f1)
            f3 = self.layer4(f2)
            a = self.att[0](f3) + F.avg_pool2d(self.att[1](f2), 2) + F.avg_pool2d(self.att[2](f1), 4)
            m = torch.einsum("bmhw,bchw->bmc", a, f3).flatten(1) / (f3.shape[2] * f3.shape[3])
            m = torch.sign(m) * torch.sqrt(m.abs() + 1e-12)
            m = F.normalize(m, dim=-1) * 100
            return F.softmax(self.fc(m), -1), a

    def attention_views(x, a):
        """Attention mixup (crop-resize of the map's box), dimming, patching: one map per view, batched."""
        b, _, h, w = x.shape
        idx = torch.multinomial(torch.sqrt(a.sum((2, 3)) + 1e-12), 3, replacement=True)
        maps = torch.gather(a, 1, idx[:, :, None, None].expand(-1, -1, a.shape[2], a.shape[3]))
        maps = F.interpolate(maps, (h, w), mode="bilinear", align_corners=False)
        maps = maps / (maps.amax((2, 3), keepdim=True) + 1e-12)
        theta = torch.empty(b, 3, 1, 1).uniform_(0.4, 0.6)
        masks = maps > theta
        ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        boxes = []
        for m in masks[:, 0]:
            nz = m.nonzero()
            lo, hi = (nz.min(0).values, nz.max(0).values) if len(nz) else (torch.tensor([0, 0]), torch.tensor([h - 1, w - 1]))
            boxes.append(torch.tensor([lo[1], lo[0], hi[1] + 1, hi[0] + 1], dtype=torch.float32))
        crops = torchvision.ops.roi_align(x, [bx[None] for bx in boxes], (h, w), aligned=True)
        mixed = 0.6 * x + 0.4 * crops
        dimmed = x * torch.where(masks[:, 1:2], 0.001, 1.001)
        patched = x * (~(masks[:, 2:3] & (ys % 32 < 16) & (xs % 32 < 16))).float()
        return [mixed, dimmed, patched]

    def setup(row):
        label, _, size, channels, batch, kind = ROWS[row]
        model = reference(row, channels)
        x = torch.rand(batch, channels, size, size) * 255
        bf16 = row.endswith("-bf16")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()
            model(x[:1])
        flops = counter.get_total_flops()
        if kind == "infer":
            model.eval()
            variants = {"": model}
            try:  # covidx folds BN into the convolutions at inference; so may a PyTorch user (torch.fx)
                variants[", conv-BN fused"] = fx_optimization.fuse(model)
            except Exception as e:  # noqa: BLE001  (a model torch.fx cannot trace runs unfused)
                print(f"{row}: torch.fx conv-BN fusion failed ({type(e).__name__}: {e}); timed unfused", file=sys.stderr)
            candidates = {}
            for fused, base in variants.items():
                for fmt in (torch.contiguous_format, torch.channels_last):
                    m, xi = base.to(memory_format=fmt), x.contiguous(memory_format=fmt)

                    def step(m=m, xi=xi):
                        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                            m(xi)

                    step()
                    t0 = time.perf_counter()
                    step()
                    layout = "channels_last" if fmt is torch.channels_last else "NCHW"
                    candidates[time.perf_counter() - t0] = (step, layout + fused)
            step, layout = candidates[min(candidates)]
            return step, {"flops_per_image": flops, "layout": layout}
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        y = torch.arange(batch) % NUM_CLASSES
        if row == "magsd-train":
            def step():
                opt.zero_grad(set_to_none=True)
                p, a = model(x)
                with torch.no_grad():
                    views = attention_views(x, a.detach())
                loss = F.nll_loss(torch.log(p + 1e-7), y)
                onehot = F.one_hot(y, NUM_CLASSES).float()
                for v in views:
                    pv, _ = model(v)
                    loss = loss + (pv - onehot).abs().sum(-1).mean()
                loss.backward()
                opt.step()
            flops *= 4  # four forwards
        else:
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
        step()
        step()
        return step, {"flops_per_image": flops * (3 if kind == "train" else 1), "layout": "NCHW"}

    serve(setup, matmul_rate, info)


# ------------------------------------------------------------------------------------------------ driver
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="batches timed per framework per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--torch-python", default=os.environ.get("COVIDX_TORCH_PYTHON", "/work/venv-torch/bin/python"),
                    help="interpreter of the PyTorch virtual environment (benchmarks/requirements-torch.txt)")
    ap.add_argument("--tf-jit", action="store_true", help="XLA-compile covidx's inference functions and train steps")
    ap.add_argument("--worker", choices=("tf", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "tf":
        return tf_worker(args)
    if args.worker == "torch":
        return torch_worker(args)

    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if not os.path.exists(args.torch_python):
        ap.error(f"{args.torch_python} not found: make a venv with benchmarks/requirements-torch.txt and pass "
                 "--torch-python")
    flags = cpu_flags()
    units = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"
    tfw = Worker(sys.executable, "tf", args.threads, args.tf_jit)
    thw = Worker(args.torch_python, "torch", args.threads, False)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {units}), {args.threads} threads each; "
          f"{tfw.ask(cmd='info')['version']}; {thw.ask(cmd='info')['version']}; XLA {'on' if args.tf_jit else 'off'}; "
          f"{args.rounds} rounds x {args.repeats} batches, alternating", flush=True)
    results = []
    matmul = {"tf": [], "torch": []}
    try:
        for row in rows:
            label, ref, size, channels, batch, kind = ROWS[row]
            t0 = time.perf_counter()
            meta_tf = tfw.ask(cmd="setup", row=row)
            meta_th = thw.ask(cmd="setup", row=row)
            times = {"tf": [], "torch": []}
            for r in range(args.rounds):
                for name, w in (("tf", tfw), ("torch", thw)) if r % 2 == 0 else (("torch", thw), ("tf", tfw)):
                    times[name] += w.ask(cmd="time", repeats=args.repeats)["times"]
                    matmul[name].append(w.ask(cmd="matmul")["gflops"])
            rate = {k: batch / statistics.median(v) for k, v in times.items()}
            gf = meta_th["flops_per_image"] / 1e9
            results.append((row, label, ref, rate["tf"], rate["torch"], gf, meta_th["layout"]))
            print(f"  {label:<50} covidx {rate['tf']:8.3f} img/s   PyTorch {rate['torch']:8.3f} img/s "
                  f"({meta_th['layout']})   ratio {rate['tf'] / rate['torch']:6.3f}   "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        tfw.close()
        thw.close()
    mm = {k: statistics.median(v) for k, v in matmul.items() if v}
    print(f"\nfp32 matmul {MATMUL_N}x{MATMUL_N}, median over the run: TensorFlow {mm.get('tf', 0):.0f} GFLOP/s, "
          f"PyTorch {mm.get('torch', 0):.0f} GFLOP/s\n")
    print("| workload | covidx img/s | PyTorch img/s | ratio | covidx GFLOP/s (% of TF matmul) | PyTorch GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for row, label, ref, a, b, gf, layout in results:
        ga, gb = a * gf, b * gf
        share = f"{100 * ga / mm['tf']:.0f} %" if mm.get("tf") else "-"
        print(f"| {label} | {a:.3g} | {b:.3g} ({ref}, {layout}) | **{a / b:.2f}** | {ga:.0f} ({share}) | {gb:.0f} |")


if __name__ == "__main__":
    main()
