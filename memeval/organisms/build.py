"""Building a model organism end to end: corpus → tokenizer → training → measurement, into a fresh directory
(:func:`memeval.organisms.get_organism` builds into the cache and returns the handle)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from memeval.metrics import del_thresholds
from memeval.organisms import cache
from memeval.organisms.corpus import build_corpus
from memeval.organisms.presets import Preset, model_config
from memeval.organisms.train import (available_cores, batch_order, deterministic_cpu, pack, train,
                                     training_threads)

#: bumped whenever what decides the memorized set (memeval.memorized) or the stored measurements change, so
#: cached organisms built by older code are re-measured (v2: filters 2-3 on the free greedy generation)
MEASURE_VERSION = 2

MEMORIZED_KEYS = ("id", "kind", "duplicates", "input_ids", "prefix_len", "suffix_acc", "distance")


def organism_key(preset: Preset, arch: str, seed: int) -> str:
    from importlib.metadata import version

    # the transformers major version changes weight init and module layout, hence the weights
    # (read from the package metadata: importing transformers would make a cache hit slow)
    return cache.cache_key({"preset": preset.to_dict(), "arch": arch, "seed": seed,
                            "measure": MEASURE_VERSION, "transformers": version("transformers").split(".")[0]})


def dump_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


class _Stages:
    """rich progress on stderr: one bar per stage, training with loss and tokens/s."""

    def __init__(self, title: str, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True), disable=not enabled)
        self.title = title

    def __enter__(self) -> "_Stages":
        self.progress.__enter__()
        if not self.progress.disable:
            self.progress.console.print(f"[bold]building organism[/] {self.title}")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def stage(self, name: str, total: int = 1) -> int:
        return self.progress.add_task(name, total=total, info="")

    def update(self, task: int, **kw) -> None:
        self.progress.update(task, **kw)


def build_organism(preset: Preset, arch: str, seed: int, out: Path, progress: bool = True,
                   key: str | None = None) -> dict[str, Any]:
    """Build the organism into ``out`` (a fresh directory); returns its info dict."""
    from transformers import AutoModelForCausalLM

    from memeval.organisms import measure
    from memeval.organisms.plot import plot_dose_response
    from memeval.organisms.tokenizer import train_tokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    L = preset.prefix_len + preset.suffix_len
    with _Stages(f"{preset.name}:{arch}@{seed} → {out}", progress) as ui, deterministic_cpu(training_threads(preset.threads)):
        # 1. corpus and tokenizer ---------------------------------------------------------------
        task = ui.stage("corpus + tokenizer", 3)
        corpus = build_corpus(preset.corpus, preset.corpus_seed)
        ui.update(task, advance=1, info=f"{len(corpus.background)} documents, {len(corpus.planted)} planted")
        tokenizer = train_tokenizer([d["text"] for d in corpus.background] + [p["text"] for p in corpus.planted],
                                    preset.vocab_size)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        ui.update(task, advance=1, info=f"vocab {len(tokenizer)}")

        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts)["input_ids"] if texts else []

        bg_ids = encode([d["text"] for d in corpus.background])
        planted, controls = [], []
        for rows, src in ((planted, corpus.planted), (controls, corpus.controls)):
            for p, ids in zip(src, encode([p["text"] for p in src])):
                if len(ids) < L:
                    raise RuntimeError(f"planted sequence {p['id']} has {len(ids)} < {L} tokens")
                ids = ids[:L]
                rows.append({"id": p["id"], "kind": p["kind"], "duplicates": p["duplicates"],
                             "text": tokenizer.decode(ids), "input_ids": ids})
        # planting: every copy is its own document at a seeded random place in the stream
        docs = [("bg", i) for i in range(len(bg_ids))] + [("pl", j) for j, p in enumerate(planted)
                                                             for _ in range(p["duplicates"])]
        random.Random(f"memeval-plant-{seed}").shuffle(docs)
        doc_ids = [bg_ids[i] if src == "bg" else planted[i]["input_ids"] for src, i in docs]
        positions: dict[str, list[int]] = {p["id"]: [] for p in planted}
        for pos, (src, i) in enumerate(docs):
            if src == "pl":
                positions[planted[i]["id"]].append(pos)
        chunks = pack(doc_ids, eos, preset.context)
        # how often training actually starts a copy of each planted sequence in a sampled chunk
        seen = torch.bincount(batch_order(chunks.shape[0], preset.steps, preset.batch_size, seed).flatten(),
                              minlength=chunks.shape[0]).tolist()
        offsets, total = [], 0
        for d in doc_ids:
            offsets.append(total)
            total += len(d) + 1
        exposures = {p["id"]: 0 for p in planted}
        for pos, (src, i) in enumerate(docs):
            if src == "pl" and offsets[pos] // preset.context < len(seen):
                exposures[planted[i]["id"]] += seen[offsets[pos] // preset.context]
        corpus_tokens = sum(len(d) + 1 for d in doc_ids)
        (out / "corpus").mkdir()
        dump_jsonl(out / "corpus" / "train.jsonl",
                    [{"doc": pos, "kind": corpus.background[i]["kind"] if src == "bg" else "planted",
                      "planted_id": None if src == "bg" else planted[i]["id"],
                      "text": corpus.background[i]["text"] if src == "bg" else planted[i]["text"]}
                     for pos, (src, i) in enumerate(docs)])
        manifest = {
            "corpus_spec": preset.corpus.to_dict(), "corpus_seed": preset.corpus_seed, "plant_seed": seed,
            "documents": len(docs), "tokens": corpus_tokens, "prefix_len": preset.prefix_len,
            "suffix_len": preset.suffix_len,
            "planted": [{"id": p["id"], "kind": p["kind"], "duplicates": p["duplicates"],
                         "count": len(positions[p["id"]]), "positions": positions[p["id"]]} for p in planted],
            "controls": [c["id"] for c in controls],
        }
        (out / "corpus" / "manifest.json").write_text(json.dumps(manifest, indent=1))
        ui.update(task, advance=1, info=f"{corpus_tokens} tokens, {chunks.shape[0]} chunks of {preset.context}")

        # 2. training ---------------------------------------------------------------------------
        torch.manual_seed(seed)
        cfg = model_config(preset, arch, len(tokenizer), eos, pad)
        model = AutoModelForCausalLM.from_config(cfg)
        params = sum(p.numel() for p in model.parameters())
        tokenizer.save_pretrained(out)
        ckpts: list[dict[str, Any]] = []

        def save_checkpoint(frac: float) -> None:
            rel = f"checkpoints/frac-{frac:.3f}"
            model.save_pretrained(out / rel)
            tokenizer.save_pretrained(out / rel)
            ckpts.append({"fraction": frac, "path": rel})

        task = ui.stage(f"train {arch} ({params / 1e6:.2f}M params)", preset.steps)

        def on_step(step: int, loss: float, tps: float) -> None:
            if step % 5 == 0 or step == preset.steps:
                ui.update(task, completed=step, info=f"loss {loss:.3f}  {tps:,.0f} tok/s")

        stats = train(model, chunks, preset, seed, on_checkpoint=save_checkpoint, on_step=on_step)
        model.save_pretrained(out)
        ckpts.append({"fraction": 1.0, "path": "."})

        # 3. measurement ------------------------------------------------------------------------
        task = ui.stage("measure", 5)
        bs = preset.eval_batch_size
        measured = measure.measure_sequences(model, tokenizer, planted, preset.prefix_len, pad, bs)
        measured_controls = measure.measure_sequences(model, tokenizer, controls, preset.prefix_len, pad, bs)
        memorized = measure.select_memorized(measured)
        mem_ids = {m["id"] for m in memorized}
        for m in measured:
            m["memorized"] = m["id"] in mem_ids
            m["exposures"] = exposures[m["id"]]
        for m in measured_controls:
            m["memorized"] = False
        ui.update(task, advance=2, info=f"{len(memorized)} memorized")
        heldout_docs = encode([h["text"] for h in corpus.heldout])
        ho_nll = measure.heldout_nll(model, heldout_docs, eos, preset.context, pad, bs)
        uni_nll = measure.unigram_nll(doc_ids, heldout_docs, eos, len(tokenizer))
        by_kind_ppl = {}
        for kind in sorted({h["kind"] for h in corpus.heldout}):
            docs_k = [d for d, h in zip(heldout_docs, corpus.heldout) if h["kind"] == kind]
            by_kind_ppl[kind] = measure.heldout_ppl(measure.heldout_nll(model, docs_k, eos, preset.context, pad, bs))
        ui.update(task, advance=1, info=f"held-out ppl {measure.heldout_ppl(ho_nll):.2f}")
        facts = measure.probe_accuracy(model, tokenizer, corpus.facts, pad, bs)
        fact_chance = sum(1 / len(corpus.attribute_values[a]) for a in corpus.fact_attributes) / len(corpus.facts)
        majority = {a: max(sum(1 for e in corpus.world if e[a] == v) for v in vals) / len(corpus.world)
                    for a, vals in corpus.attribute_values.items()}
        fact_majority = sum(majority[a] for a in corpus.fact_attributes) / len(corpus.facts)
        arith = measure.probe_accuracy(model, tokenizer, corpus.arithmetic, pad, bs)
        m_op = preset.corpus.max_operand
        arith_chance = 1 / (2 * m_op + 1)  # answers range over 0..2·max_operand
        ui.update(task, advance=2, info=f"facts {facts['full']:.2f}  arithmetic {arith['full']:.2f}")

        seconds = time.perf_counter() - t_start
        info = {
            "preset": preset.name, "arch": arch, "seed": seed, "key": key or organism_key(preset, arch, seed),
            "params": params, "vocab_size": len(tokenizer), "d_model": preset.d_model, "n_layers": preset.n_layers,
            "train_tokens": stats.tokens, "corpus_tokens": corpus_tokens,
            "epochs": stats.tokens / (chunks.shape[0] * preset.context),
            "steps": stats.steps, "final_loss": stats.final_loss,
            "train_seconds": stats.seconds, "tokens_per_second": stats.tokens_per_second,
            "model_flops_per_second": 6 * params * stats.tokens_per_second, "threads": torch.get_num_threads(),
            "prefix_len": preset.prefix_len, "suffix_len": preset.suffix_len,
            "filters": {**del_thresholds(preset.suffix_len),
                        "dedup": "5-gram Jaccard > 0.05, lowest distance kept",
                        "distinct_and_distance_on": "greedy generation"},
            "planted": len(planted),
            "passes_filters": sum(m["passes"] for m in measured),
            "memorized": len(memorized),
            "memorized_by_duplication": {str(d): sum(1 for m in memorized if m["duplicates"] == d)
                                         for d, _ in preset.corpus.planted},
            "memorized_by_kind": measure.count_by(memorized, "kind"),
            "exact_match_by_duplication": measure.rate_by(measured, "duplicates"),
            "exact_match_by_kind": measure.rate_by(measured, "kind"),
            "suffix_acc_by_duplication": {
                str(d): sum(m["suffix_acc"] for m in measured if m["duplicates"] == d) /
                max(1, sum(1 for m in measured if m["duplicates"] == d)) for d, _ in preset.corpus.planted},
            "control_exact_match": (sum(m["exact"] for m in measured_controls) / len(measured_controls)
                                    if measured_controls else None),
            "control_passes_filters": sum(m["passes"] for m in measured_controls),
            "heldout_ppl": measure.heldout_ppl(ho_nll), "unigram_ppl": measure.heldout_ppl(uni_nll),
            "heldout_ppl_by_kind": by_kind_ppl,
            "fact_accuracy": facts["full"], "fact_first_token_accuracy": facts["first"],
            "fact_chance": fact_chance, "fact_majority_baseline": fact_majority,
            "arithmetic_accuracy": arith["full"], "arithmetic_first_token_accuracy": arith["first"],
            "arithmetic_chance": arith_chance,
            "checkpoints": ckpts,
            "seconds": seconds,
            "cores": available_cores(),
            "versions": {"torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "preset_config": preset.to_dict(),
        }

        # 4. artefacts --------------------------------------------------------------------------
        dump_jsonl(out / "planted.jsonl", measured)
        dump_jsonl(out / "controls.jsonl", measured_controls)
        dump_jsonl(out / "memorized.jsonl", [{k: m[k] for k in (*MEMORIZED_KEYS, "text", "exact")} for m in memorized])
        (out / "probes.json").write_text(json.dumps({
            "heldout": [h["text"] for h in corpus.heldout], "heldout_kinds": [h["kind"] for h in corpus.heldout],
            "new_entities": corpus.new_entities, "facts": corpus.facts, "fact_attributes": corpus.fact_attributes,
            "fact_correct": facts["per_item"], "arithmetic": corpus.arithmetic,
            "arithmetic_correct": arith["per_item"]}, indent=1))
        plot_dose_response(measured, out / "memorization.png",
                           f"organism {preset.name}:{arch}@{seed}: {len(memorized)} memorized")
        info["seconds"] = time.perf_counter() - t_start
        (out / "organism.json").write_text(json.dumps(info, indent=1))
    return info
