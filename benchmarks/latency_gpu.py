"""Latency of batched EPD (K = 1, 2, 3) against iPNDM at equal Para.NFE on a GPU, with a UNet-sized model.

The model is the bundled digits architecture scaled up to a CIFAR-10-sized U-Net with random weights
(channels 128, mults 1-2-2-2, 2 blocks per level, 3x32x32 images: 37.0M parameters, close to DDPM's
35.7M CIFAR-10 model), EDM-preconditioned, in the library's own denoiser wrapper. Latency does not depend
on the weights. For each dtype (network in fp32 / fp16 / bf16; solver arithmetic in fp32) and batch size:
one call of B rows vs B*K rows, and whole samples (iPNDM vs EPD with K branches) at each Para.NFE; CUDA
events, warm-up runs, median of repeats (``epd_solver.bench.latency``). Prints Markdown tables, writes JSON.

    python benchmarks/latency_gpu.py --out latency_gpu.json                 # on a GPU machine
    python benchmarks/latency_gpu.py --device cpu --quick --out /tmp/l.json  # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import epd_solver  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from epd_solver.bench.latency import latency_markdown, measure_latency  # noqa: E402
from epd_solver.models import DigitsUNet, EDMPrecondNet, UNetDenoiser  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_model(channels: int, resolution: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    net = DigitsUNet(channels=channels, mults=(1, 2, 2, 2), blocks=2, in_channels=3, dropout=0.0)
    precond = EDMPrecondNet(net).to(device=device, dtype=dtype)
    config = {"name": f"random-unet-c{channels}-{resolution}px", "sigma_min": 0.002, "sigma_max": 80.0,
              "shape": [3, resolution, resolution]}
    return UNetDenoiser(precond, config), sum(p.numel() for p in net.parameters())


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        info.update(torch_threads=torch.get_num_threads(), processor=platform.processor() or platform.machine())
    return info


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (refused if it exists, unless --force)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default=None, help="network dtypes (default fp32,fp16,bf16; fp32 with --quick)")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--ks", default="1,2,3")
    p.add_argument("--nfe", default="5,9", help="Para.NFE of the whole-sample runs (odd: EPD uses AFS)")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (with --device cpu)")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test (e.g. with --device cpu)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.channels, args.resolution, args.warmup, args.repeats = 8, 8, 1, 2
        args.batch_sizes, args.nfe, args.dtypes = "1,2", "3", args.dtypes or "fp32"
    args.dtypes = args.dtypes or "fp32,fp16,bf16"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available: pass --device cpu (with --quick for a smoke test)")
        torch.backends.cudnn.benchmark = True
    batches, ks, nfes = ints(args.batch_sizes), ints(args.ks), ints(args.nfe)
    if any(n % 2 == 0 for n in nfes):
        raise SystemExit("--nfe values must be odd (EPD with AFS)")
    result = {"config": vars(args), "environment": device_info(device), "runs": []}
    start = time.perf_counter()
    for name in args.dtypes.split(","):
        model, n_params = build_model(args.channels, args.resolution, device, DTYPES[name])
        result["parameters"] = n_params
        records = []
        for batch in batches:  # one batch size at a time, so that running out of memory skips only that size
            try:
                records += measure_latency(model, model.shape, [batch], ks, nfes, device, torch.float32,
                                           args.warmup, args.repeats,
                                           progress=lambda m: print(f"[{name}] {m}", file=sys.stderr))
            except torch.cuda.OutOfMemoryError:
                print(f"[{name}] batch {batch}: out of memory, skipped", file=sys.stderr)
                result["runs"].append({"dtype": name, "batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
        result["runs"].append({"dtype": name, "records": records})
        env = result["environment"]
        header = (f"### {env.get('gpu', env['device'])}, network {name} (solver arithmetic fp32), {n_params / 1e6:.1f}M "
                  f"parameters, 3x{args.resolution}x{args.resolution}; median of {args.repeats} after "
                  f"{args.warmup} warm-up runs")
        if records:
            print(latency_markdown(records, header))
        del model
    result["seconds"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
