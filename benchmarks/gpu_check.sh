#!/usr/bin/env bash
# The CUDA paths, in under 5 minutes on one GPU: a bf16 pack and an fp16 pack of MiniLM runs
# (compared with an fp32 pack of the same runs), then the pack-vs-sequential ratio on the GPU.
# Writes its numbers to ${OUT:-runs/gpu_check}/gpu_check.json and prints them.
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
export LORAINIT_DATA=${LORAINIT_DATA:-$(cd .. && pwd)/shared/data}
"$PY" - "$OUT" <<'PYEOF'
import json, sys, time
import torch
from lorainit.config import RunConfig
from lorainit.train import train_pack

assert torch.cuda.is_available(), "no CUDA device"
out = {"device": torch.cuda.get_device_name(0), "packs": {}}
base = dict(model="minilm", task="sst2", max_steps=200, batch_size=16, max_train_samples=4000,
            max_eval_samples=872, eval_every=100)
runs = lambda precision: [RunConfig.from_dict(base | dict(init=i, lr=lr, precision=precision))
                          for i in "ab" for lr in (2e-4, 8e-4, 3.2e-3)]
for precision in ("fp32", "bf16", "fp16"):
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = train_pack(runs(precision), device="cuda", show_progress=False)
    out["packs"][precision] = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "runs": [{"init": r.config.init, "lr": r.config.lr, "status": r.status,
                  "accuracy": r.final.get("accuracy"),
                  "last_loss": [m["value"] for m in r.metrics if m["name"] == "train_loss"][-1]}
                 for r in results]}
for precision in ("bf16", "fp16"):
    diffs = [abs(a["accuracy"] - b["accuracy"]) for a, b in zip(out["packs"][precision]["runs"], out["packs"]["fp32"]["runs"])
             if a["accuracy"] is not None and b["accuracy"] is not None]
    out["packs"][precision]["max_accuracy_diff_vs_fp32"] = max(diffs) if diffs else None
json.dump(out, open(f"{sys.argv[1]}/gpu_check.json", "w"), indent=2)
print(json.dumps(out, indent=2))
PYEOF
"$PY" benchmarks/pack_vs_sequential.py --device cuda --steps 40 | tee "$OUT/pack_vs_sequential.txt"
