"""A user's own model and data: --model, --model-args, --task-config, file tasks, memeval.evaluate, and a
summary.json that covers every current pair of the output directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memeval
from memeval.cli import main
from memeval.errors import UsageError
from memeval.loading import parse_model_args
from memeval.testing import ToyPlugin

TOY = "task: toy_task\nversion: {version}\nprotocol: toy\nmodel: {model}\ntags: [toys]\n" \
      "data: {{sequences: 6, length: 12, prefix: 4}}\nparams: {{k: 0.1}}\n"


@pytest.fixture
def toy(memeval_plugin, tiny_model_dir, tmp_path):
    memeval_plugin(ToyPlugin(), "toy")
    folder = tmp_path / "tasks"
    folder.mkdir()
    model = tiny_model_dir("gpt2")
    (folder / "toy_task.yaml").write_text(TOY.format(version=1, model=model))
    return folder, model, tmp_path / "out"


def per_item(out: Path) -> dict[tuple[str, str, str], dict]:
    return {(r["method"], r["task"], r["item"]): r["metrics"]
            for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------------------------------------
# memeval.evaluate


def test_evaluate_and_the_cli_give_the_same_numbers(toy):
    tasks, _, out = toy
    code = main(["--methods", "toy_oracle,random", "--tasks", "toy_task", "--include-path", str(tasks),
                 "--output", str(out / "cli"), "--device", "cpu", "--task-config", "toy_task.params.k=0.2"])
    assert code == 0
    summary = memeval.evaluate(["toy_oracle", "random"], "toy_task", output=out / "api", device="cpu",
                               task_config={"toy_task.params.k": 0.2}, include_paths=[tasks], progress=False)
    assert per_item(out / "cli") == per_item(out / "api") and len(per_item(out / "api")) == 12
    cli_summary = json.loads((out / "cli" / "summary.json").read_text())
    timeless = lambda entries: [{k: v for k, v in e.items() if k != "seconds_per_item"} for e in entries]
    assert timeless(summary["results"]) == timeless(cli_summary["results"])
    assert summary == json.loads((out / "api" / "summary.json").read_text())
    # the provenance of a Python run is the equivalent command line
    assert summary["meta"]["command"].startswith("memeval run --methods toy_oracle,random --tasks toy_task")
    assert "--task-config toy_task.params.k=0.2" in summary["meta"]["command"]


def test_evaluate_without_output_leaves_nothing_behind(toy, tmp_path, monkeypatch):
    tasks, _, _ = toy
    monkeypatch.chdir(tmp_path)
    summary = memeval.evaluate("toy_oracle", "toy_task", include_paths=[tasks], device="cpu", progress=False)
    assert summary["results"][0]["primary"]["value"] == 1.0
    assert not (tmp_path / "results").exists()


def test_evaluate_scores_an_in_memory_model_without_touching_it(toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memeval.models import NeuronModel

    tasks, model_dir, out = toy
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    before = NeuronModel(hf, tok).fingerprint()
    summary = memeval.evaluate("toy_oracle,random", "toy_task", model=(hf, tok), output=out / "mem",
                               device="cpu", include_paths=[tasks], progress=False)
    spec = summary["tasks"]["toy_task"]["model"]
    assert spec == f"memory:{before}"
    assert NeuronModel(hf, tok).fingerprint() == before
    from_dir = memeval.evaluate("toy_oracle,random", "toy_task", output=out / "dir", device="cpu",
                                include_paths=[tasks], progress=False)
    assert [e["metrics"] for e in summary["results"]] == [e["metrics"] for e in from_dir["results"]]
    # other weights are another model: a new config hash, never the cached numbers of the first
    with_other_weights = AutoModelForCausalLM.from_pretrained(model_dir)
    with_other_weights.lm_head.weight.data.mul_(2) if hasattr(with_other_weights, "lm_head") else None
    next(with_other_weights.parameters()).data.add_(1.0)
    again = memeval.evaluate("toy_oracle", "toy_task", model=(with_other_weights, tok), output=out / "mem",
                             device="cpu", include_paths=[tasks], progress=False)
    assert again["results"][0]["config_hash"] != summary["results"][0]["config_hash"]


def test_evaluate_refuses_to_shard_an_in_memory_model(toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks, model_dir, out = toy
    pair = (AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
    with pytest.raises(UsageError, match="cannot be sharded"):
        memeval.evaluate("toy_oracle", "toy_task", model=pair, output=out, device="cpu,cpu", include_paths=[tasks])


# ---------------------------------------------------------------------------------------------
# --task-config, --model, --model-args


def test_task_config_is_typed_checked_and_hashed(toy, capsys):
    tasks, _, out = toy
    base = ["--methods", "toy_oracle", "--tasks", "toy_task", "--include-path", str(tasks), "--device", "cpu"]
    assert main([*base, "--output", str(out / "a")]) == 0
    assert main([*base, "--output", str(out / "b"), "--task-config", "toy_task.params.k=0.25"]) == 0
    ha = json.loads((out / "a" / "summary.json").read_text())["results"][0]["config_hash"]
    hb = json.loads((out / "b" / "summary.json").read_text())["results"][0]["config_hash"]
    assert ha != hb
    capsys.readouterr()
    for bad, message in [("toy_task.params.kk=1", "has no params key 'kk' (did you mean: k?)"),
                         ("toy_task.params.k=lots", "toy_task.params.k: expected a number"),
                         ("toy_task.k=1", "expected TASK.data.KEY=VALUE"),
                         ("nope.data.path=x", "unknown task 'nope'")]:
        assert main([*base, "--output", str(out / "c"), "--task-config", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (bad, err)


def test_model_override_is_refused_where_the_data_belong_to_the_tasks_model(tiny_model_dir, tmp_path, capsys):
    code = main(["--methods", "random", "--tasks", "del_organism", "--model", str(tiny_model_dir("gpt2")),
                 "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("memeval: error")]
    assert len(errors) == 1 and "task 'del_organism' cannot score another model" in errors[0]
    assert "data.source: organism" in errors[0]


def test_an_organism_task_accepts_another_organism(micro_organism, tmp_path, capsys):
    """Another organism (another seed, another preset) brings its own memorized set: accepted, and the task then
    reads that organism's data (micro memorized 2 sequences, too few for del_organism's 5 dev targets)."""
    code = main(["--methods", "random", "--tasks", "del_organism", "--model", "organism:micro",
                 "--output", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot score another model" not in err and "only 2 memorized sequences" in err


def test_a_file_task_without_a_model_asks_for_one(tmp_path, capsys):
    assert main(["--methods", "random", "--tasks", "del_file", "--output", str(tmp_path / "o")]) == 2
    assert "names no model (model: null); pass --model SPEC" in capsys.readouterr().err


def test_model_args_are_typed_and_unknown_keys_refused():
    assert parse_model_args("revision=main,trust_remote_code=true") == {"revision": "main", "trust_remote_code": True}
    with pytest.raises(UsageError, match="unknown key 'revison' \\(did you mean: revision\\?\\)"):
        parse_model_args("revison=main")
    with pytest.raises(UsageError, match="trust_remote_code: expected true or false"):
        parse_model_args("trust_remote_code=perhaps")
    with pytest.raises(UsageError, match="unknown dtype 'float8'"):
        parse_model_args("dtype=float8")


def test_model_args_reach_loading_and_the_config_hash(toy):
    tasks, model_dir, out = toy
    plain = memeval.evaluate("toy_oracle", "toy_task", output=out, device="cpu", include_paths=[tasks],
                             model=str(model_dir), progress=False)
    with_args = memeval.evaluate("toy_oracle", "toy_task", output=out, device="cpu", include_paths=[tasks],
                                 model=str(model_dir), model_args={"attn_implementation": "eager"}, progress=False)
    assert plain["results"][0]["config_hash"] != with_args["results"][0]["config_hash"]
    a, b = plain["results"][0]["metrics"], with_args["results"][0]["metrics"]  # eager and sdpa attention agree
    assert a["recall"] == b["recall"] and a["top_score"]["mean"] == pytest.approx(b["top_score"]["mean"], rel=1e-5)
    with pytest.raises(UsageError, match="contradicts --dtype"):
        memeval.evaluate("toy_oracle", "toy_task", output=out, device="cpu", include_paths=[tasks], dtype="float32",
                         model_args={"dtype": "bfloat16"})


# ---------------------------------------------------------------------------------------------
# summary.json over the output directory


def test_summary_covers_earlier_pairs_that_are_still_current(toy, capsys):
    tasks, _, out = toy
    base = ["--tasks", "toy_task", "--include-path", str(tasks), "--device", "cpu", "--output", str(out)]
    assert main(["--methods", "toy_oracle", *base]) == 0
    assert main(["--methods", "random", *base]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(e["method"] for e in summary["results"]) == ["random", "toy_oracle"]
    assert sorted(summary["methods"]) == ["random", "toy_oracle"]
    # the task changes: the earlier pair is no longer what the current code would give, and is left out
    (tasks / "toy_task.yaml").write_text((tasks / "toy_task.yaml").read_text().replace("version: 1", "version: 2"))
    capsys.readouterr()
    assert main(["--methods", "random", *base]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [e["method"] for e in summary["results"]] == ["random"]
    assert "toy_oracle · toy_task left out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# validate checks the data


def test_validate_checks_data_files_and_names_an_unset_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEMEVAL_NO_SUCH_VAR", raising=False)
    task = tmp_path / "t.yaml"
    body = ("task: mine\nversion: 1\nprotocol: deletion\nmodel: organism:micro\n"
            "data: {{source: file, path: '{path}', ppl_path: '{path}'}}\n")
    task.write_text(body.format(path="${MEMEVAL_NO_SUCH_VAR}/mem.jsonl"))
    assert main(["validate", str(task)]) == 2
    assert "environment variable MEMEVAL_NO_SUCH_VAR is not set" in capsys.readouterr().err
    task.write_text(body.format(path=tmp_path / "missing.jsonl"))
    assert main(["validate", str(task)]) == 2
    assert f"'{tmp_path / 'missing.jsonl'}' not found" in capsys.readouterr().err
    assert main(["validate", "--schema-only", str(task)]) == 0
    (tmp_path / "missing.jsonl").write_text('{"text": "a"}\n')
    assert main(["validate", str(task)]) == 0


# ---------------------------------------------------------------------------------------------
# del_file on an exported organism = the organism task


DEL_MICRO = """task: del_micro
version: 1
protocol: deletion
model: organism:micro
data: {source: organism, targets: 12, dev: 0, negatives: 10, ppl_sequences: 6, ppl_tokens: 48}
params: {ratios: [0.05, 0.2], skip_layers: [0]}
"""


@pytest.mark.slow
def test_del_file_on_the_exported_organism_equals_the_organism_task(micro_organism, tmp_path):
    exported = micro_organism.export(tmp_path / "exported")
    with open(exported / "heldout.jsonl", "w") as fh:
        for text in micro_organism.heldout[:6]:
            fh.write(json.dumps({"text": text}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "del_micro.yaml").write_text(DEL_MICRO)
    common = ["--methods", "random,activations", "--device", "cpu"]
    assert main([*common, "--tasks", "del_micro", "--include-path", str(tmp_path / "tasks"),
                 "--output", str(tmp_path / "org"), "--log-samples"]) == 0
    overrides = ["data.path=" + str(exported / "organism_memorized.jsonl"), "data.targets=12", "data.dev=0",
                 "data.negatives=10", "data.ppl_sequences=6", "data.ppl_tokens=48", "params.ratios=0.05,0.2"]
    assert main([*common, "--tasks", "del_file", "--model", str(exported), "--output", str(tmp_path / "file"),
                 *[a for o in overrides for a in ("--task-config", f"del_file.{o}")]]) == 0
    org = {(m, i): v for (m, _, i), v in per_item(tmp_path / "org").items()}
    file = {(m, i): v for (m, _, i), v in per_item(tmp_path / "file").items()}
    assert len(org) == 2 * len(micro_organism.memorized) and org == file

    # --log-samples: per item the prefix, the true suffix and the greedy continuations before and after
    rows = [json.loads(l) for l in (tmp_path / "org" / "samples" / "random__del_micro.jsonl").read_text().splitlines()]
    assert sorted(r["item"] for r in rows) == sorted(i for (m, i) in org if m == "random")
    model = micro_organism.load()
    tok = model.tokenizer
    by_id = {m["id"]: m for m in micro_organism.memorized}
    for row in rows:
        (sample,) = row["samples"]
        seq = by_id[sample["id"]]
        prefix = torch.tensor([seq["input_ids"][: seq["prefix_len"]]])
        n_new = len(seq["input_ids"]) - seq["prefix_len"]
        plain = model.hf.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, pad_token_id=model.pad_id)
        assert sample["before"] == tok.decode(plain[0, prefix.shape[1]:], skip_special_tokens=True)
        assert sample["suffix"] == tok.decode(seq["input_ids"][seq["prefix_len"]:], skip_special_tokens=True)
        assert set(sample) == {"id", "prefix", "suffix", "before", "after@0.05", "after@0.2"}
    assert all("samples" not in r.get("metrics", {}) for r in map(json.loads, open(tmp_path / "org" / "results.jsonl")))


@pytest.mark.parametrize("content, message", [
    (b'{"text": "' + b"word " * 40 + b'"}\nnot json\n', "memorized.jsonl:2: not JSON"),
    (b'{"ids": [1, 2, 3]}\n', 'memorized.jsonl:1: expected "input_ids" (a list of ints) or "text" (a string)'),
    (b'{"text": "abc", "prefix_len": -1}\n', "memorized.jsonl:1: prefix_len must be a non-negative integer"),
    (b'{"input_ids": [5, 6, 7]}\n', "memorized.jsonl:1: 3 tokens, no more than the prefix (32)"),
    (b'\xff\xfe{"text": 1}\n', "memorized.jsonl: not UTF-8 text"),
])
def test_a_bad_data_file_is_one_line_naming_file_and_line(tiny_model_dir, tmp_path, capsys, content, message):
    (tmp_path / "memorized.jsonl").write_bytes(content)
    (tmp_path / "heldout.jsonl").write_text('{"text": "some held-out text"}\n')
    code = main(["--methods", "random", "--tasks", "del_file", "--model", str(tiny_model_dir("gpt2")),
                 "--output", str(tmp_path / "out"), "--task-config", f"del_file.data.path={tmp_path / 'memorized.jsonl'}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("memeval: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_a_model_that_is_not_there_is_one_line(tmp_path, capsys):
    code = main(["--methods", "random", "--tasks", "del_file", "--model", str(tmp_path / "nope"),
                 "--output", str(tmp_path / "out"), "--task-config", "del_file.data.path=x.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and f"model '{tmp_path / 'nope'}': not a directory" in err and len(err.strip().splitlines()) == 1
