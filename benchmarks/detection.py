"""A-priori detection: what the pool costs to train, and how the ground truth depends on K.

    python benchmarks/detection.py                                   # detection_digits, K in 4, 8, 16, all
    python benchmarks/detection.py --task detection_organism --ks 4,8,15

For the task: trains (or reuses) its pool of models, printing the seconds spent; then, for every K, rebuilds
the ground truth with the first K other models of each target as its shadows and scores every detector
(mean ± standard error over targets of ROC AUC and FPR at TPR 0.75), with the ground truth's size and its
share of label-noise samples. Every line carries the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from memeval.metrics import mean_stderr
from memeval.plugins import get_registry
from memeval.protocols.detection import DetectionProtocol
from memeval.shadows import member_info
from memeval.tasks import load_tasks


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="detection_digits")
    ap.add_argument("--ks", default="4,8,16,all", help="shadow counts K (comma list; 'all' = models - 1)")
    ap.add_argument("--methods", default="psmi,loss,logit_gap,mahalanobis,early_lira")
    args = ap.parse_args()

    registry = get_registry()
    task = load_tasks(registry=registry).tasks[args.task]
    t0 = time.perf_counter()
    base = DetectionProtocol(task, DetectionProtocol.load_model(task, "cpu", torch.float32), task.seed)
    base.prepare()
    infos = [member_info(p) for p in base.paths]
    print(f"{args.task}: {task.params.models} models; prepare {time.perf_counter() - t0:.1f} s "
          f"(training, when not cached: {sum(i['seconds'] for i in infos):.1f} s in total, "
          f"{sum(i['seconds'] for i in infos) / len(infos):.2f} s per model, recorded at build time); {load()}")
    methods = [registry.methods[m].obj for m in args.methods.split(",")]
    print(f"{'K':>4} {'memorized':>10} {'noise share':>11}  " + "  ".join(f"{m.name + ' auc':>18}" for m in methods)
          + "  " + "  ".join(f"{m.name + ' fpr@.75':>18}" for m in methods))
    for k_spec in args.ks.split(","):
        k = task.params.models - 1 if k_spec == "all" else int(k_spec)
        sub = dataclasses.replace(task, params=dataclasses.replace(task.params, shadows=k))
        proto = DetectionProtocol(sub, base.model, task.seed)
        proto.prepare()
        cols_auc, cols_fpr = [], []
        for cls in methods:
            ms = proto.evaluate(cls(), proto.items())
            a = mean_stderr(m["auc"] for m in ms if m["auc"] is not None)
            f = mean_stderr(m["fpr@tpr=0.75"] for m in ms if m["fpr@tpr=0.75"] is not None)
            cols_auc.append(f"{a[0]:.3f} ± {a[1]:.3f}".rjust(18))
            cols_fpr.append(f"{f[0]:.3f} ± {f[1]:.3f}".rjust(18))
        r = proto.report
        print(f"{k:>4} {r['memorized_mean']:>10.1f} {r['noise_share_of_memorized']:>11.2f}  " + "  ".join(cols_auc)
              + "  " + "  ".join(cols_fpr) + f"   [{load()}]", flush=True)


if __name__ == "__main__":
    main()
