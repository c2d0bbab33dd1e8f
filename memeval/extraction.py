"""``memeval memorized extract``: find the sequences a model memorized in a JSONL of texts.

Each text (``{"text": ...}`` per line) is tokenized with the model's tokenizer and cut into windows of
k prefix + ℓ suffix tokens starting every ``stride`` tokens (default k + ℓ: no overlap). Identical windows
are measured once. The windows go through :func:`memeval.memorized.memorized` (MemPi's four DEL filters,
batched; greedy generation only for windows above the accuracy threshold). Written to ``OUT``:

- ``memorized.jsonl``: one memorized window per line, ``{"id", "text", "input_ids", "prefix_len",
  "suffix_acc", "distance", "line", "start"}`` (``text`` is the decoded window, ``line`` the 1-based line
  of the source text and ``start`` the window's first token) — file tasks read it (``data.path``);
- ``heldout.jsonl``: ``{"text"}`` of windows far from memorized (teacher-forced suffix accuracy at most
  ``heldout_max_accuracy``), in source order — held-out text for perplexity;
- ``report.json``: the settings, the counts removed by each filter, and the time taken.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memeval.api import TokenSequence
from memeval.errors import UsageError

if TYPE_CHECKING:
    from memeval.models import NeuronModel


@dataclass(frozen=True)
class ExtractConfig:
    prefix_len: int = 32  # k (MemPi on Pythia: 32)
    suffix_len: int = 48  # ℓ (MemPi on Pythia: 48)
    stride: int | None = None  # default k + ℓ
    batch_size: int = 32
    limit: int | None = None  # measure at most this many windows
    heldout_max_accuracy: float = 0.5

    def check(self) -> None:
        for name in ("prefix_len", "suffix_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_len', '').replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be at least 1, got {self.stride}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {self.limit}")


def read_texts(path: Path) -> list[str]:
    """The ``text`` of every line of a JSONL file; one-line errors for a missing file, bad JSON or key."""
    if not path.is_file():
        raise UsageError(f"--texts {path}: no such file (expected JSONL with one {{\"text\": ...}} per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--texts {path}: not UTF-8 text (expected JSONL with one {{\"text\": ...}} per line)") from None
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            texts.append("")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not JSON ({e.msg}); expected {{\"text\": ...}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(f"{path}:{n}: expected an object with a string \"text\" key")
        texts.append(obj["text"])
    if not any(texts):
        raise UsageError(f"--texts {path}: no texts")
    return texts


def windows(texts: list[str], tokenizer: Any, cfg: ExtractConfig) -> tuple[list[TokenSequence], list[tuple[int, int]], int]:
    """Distinct windows of k + ℓ tokens, their (line, start) of first occurrence, and the duplicate count."""
    width = cfg.prefix_len + cfg.suffix_len
    stride = cfg.stride or width
    seqs: list[TokenSequence] = []
    where: list[tuple[int, int]] = []
    seen: set[tuple[int, ...]] = set()
    duplicates = 0
    for line, text in enumerate(texts, 1):
        if not text:
            continue
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids) - width + 1, stride):
            w = tuple(ids[start : start + width])
            if w in seen:
                duplicates += 1
                continue
            seen.add(w)
            seqs.append(TokenSequence(f"w{len(seqs)}", w, cfg.prefix_len))
            where.append((line, start))
            if cfg.limit is not None and len(seqs) >= cfg.limit:
                return seqs, where, duplicates
    return seqs, where, duplicates


def extract(model: "NeuronModel", texts: list[str], cfg: ExtractConfig, progress: bool = True) -> dict[str, Any]:
    """Run the filters over the texts' windows: ``{"memorized": rows, "heldout": texts, "report": dict}``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.console import Console

    from memeval.memorized import decode, filter_counts, memorized

    cfg.check()
    t0 = time.perf_counter()
    seqs, where, duplicates = windows(texts, model.tokenizer, cfg)
    if not seqs:
        raise UsageError(f"no text has {cfg.prefix_len + cfg.suffix_len} tokens (k + ℓ); "
                         "use shorter --prefix/--suffix or longer texts")
    with Progress(TextColumn("[bold]memorized extract"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("windows", total=len(seqs))
        keep, measured = memorized(model, seqs, cfg.batch_size, on_batch=lambda n: bar.advance(task, n))
    tok = model.tokenizer
    rows = [{"id": f"line{where[i][0]}:{where[i][1]}", "text": decode(tok, seqs[i].input_ids),
             "input_ids": list(seqs[i].input_ids), "prefix_len": cfg.prefix_len,
             "suffix_acc": measured[i]["suffix_acc"], "distance": measured[i]["distance"],
             "line": where[i][0], "start": where[i][1]} for i in keep]
    heldout = [decode(tok, s.input_ids) for s, m in zip(seqs, measured)
               if m["suffix_acc"] <= cfg.heldout_max_accuracy]
    report = {"model": getattr(model, "spec", ""), "texts": len(texts), "windows": len(seqs) + duplicates,
              "duplicate_windows": duplicates, "measured": len(seqs), **filter_counts(measured),
              "memorized": len(rows), "heldout": len(heldout), "settings": asdict(cfg),
              "seconds": round(time.perf_counter() - t0, 2)}
    return {"memorized": rows, "heldout": heldout, "report": report}


def write(result: dict[str, Any], out: Path) -> None:
    """Write ``memorized.jsonl``, ``heldout.jsonl`` and ``report.json`` into ``out``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memorized.jsonl", "w") as fh:
        for r in result["memorized"]:
            fh.write(json.dumps(r) + "\n")
    with open(out / "heldout.jsonl", "w") as fh:
        for t in result["heldout"]:
            fh.write(json.dumps({"text": t}) + "\n")
    (out / "report.json").write_text(json.dumps(result["report"], indent=1) + "\n")


def extract_command(model_spec: str, texts_path: Path, out: Path, cfg: ExtractConfig, device: str = "auto",
                    dtype: str = "auto", model_args: str | None = None) -> int:
    """``memeval memorized extract``: load, extract, write, print the counts."""
    from memeval.loading import load_model, parse_model_args, resolve_device, resolve_dtype

    cfg.check()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    texts = read_texts(texts_path)
    args = parse_model_args(model_args)
    dev = resolve_device(device)
    model = load_model(model_spec, device=dev, dtype=resolve_dtype(str(args.get("dtype", dtype)), dev), model_args=args)
    result = extract(model, texts, cfg)
    write(result, out)
    r = result["report"]
    print(f"{r['memorized']} memorized of {r['measured']} distinct windows ({r['duplicate_windows']} duplicates) "
          f"from {r['texts']} texts in {r['seconds']:.1f} s; removed by accuracy {r['failed_accuracy']}, "
          f"distinct {r['failed_distinct']}, distance {r['failed_distance']}, dedup {r['failed_dedup']}")
    print(f"wrote {out / 'memorized.jsonl'}, {out / 'heldout.jsonl'} ({r['heldout']} texts), {out / 'report.json'}")
    return 0
