"""The shipped lm-evaluation-harness task: YAML keys (lm-eval 0.4.x schema), JSONL rows, and the
include-path copy. lm-eval itself is not needed."""

import json
import re
from pathlib import Path

import yaml

from wuneng.eval.lm_eval_tasks import (
    WUNENG_ARITH_JSONL,
    WUNENG_ARITH_YAML,
    load_task_yaml,
    prepare_include_path,
    wuneng_arith_records,
)
from wuneng.eval.scoring import parse_final_number

OUTPUT_TYPES = {"loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until"}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_yaml_has_the_required_keys():
    config = load_task_yaml()
    for key in (
        "task",
        "dataset_path",
        "dataset_kwargs",
        "test_split",
        "output_type",
        "doc_to_text",
        "doc_to_target",
        "metric_list",
    ):
        assert key in config, key
    assert config["task"] == "wuneng_arith"
    assert config["dataset_path"] == "json"
    assert config["output_type"] in OUTPUT_TYPES
    files = config["dataset_kwargs"]["data_files"]
    assert set(files) == {config["test_split"]}
    assert (WUNENG_ARITH_YAML.parent / files["test"]).resolve() == WUNENG_ARITH_JSONL.resolve()
    assert WUNENG_ARITH_JSONL.exists()
    assert all({"metric", "aggregation", "higher_is_better"} <= set(m) for m in config["metric_list"])
    assert config["generation_kwargs"]["until"] and config["generation_kwargs"]["do_sample"] is False
    # the Jinja templates only use fields the JSONL has
    row = read_jsonl(WUNENG_ARITH_JSONL)[0]
    for template in (config["doc_to_text"], config["doc_to_target"]):
        for field in re.findall(r"\{\{\s*(\w+)\s*\}\}", template):
            assert field in row


def test_metric_regexes_reduce_answers_to_the_final_number():
    config = load_task_yaml()
    regexes = config["metric_list"][0]["regexes_to_ignore"]

    def clean(text):
        for r in regexes:
            text = re.sub(r, "", text)
        return text

    assert clean(" 5+3=8. #### 8") == clean("5+3=8. #### 8") == "8"
    assert clean(" 5+3=9. #### 9") != clean("5+3=8. #### 8")


def test_jsonl_rows_are_correct_and_regenerable():
    rows = read_jsonl(WUNENG_ARITH_JSONL)
    assert len(rows) == 48
    assert rows == wuneng_arith_records(), "the shipped JSONL is the seeded generator's output"
    counts = {}
    for r in rows:
        assert set(r) == {"question", "answer", "final", "category"}
        m = re.fullmatch(r"(\d+)([+\-])(\d+)=(\d+)\. #### (\d+)", r["answer"])
        assert m is not None
        a, op, b, c, final = m.groups()
        assert eval(a + op + b) == int(c) == int(final) == int(r["final"]) == parse_final_number(r["answer"])  # noqa: S307
        assert r["question"].startswith("Q: ") and r["question"].endswith(" A:")
        assert re.findall(r"\d+", r["question"]) == [a, b]
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    assert counts == {"+1d": 12, "-1d": 12, "+2d": 12, "-2d": 12}
    assert len({r["question"] for r in rows}) == 48


def test_prepare_include_path_writes_absolute_data_files(tmp_path):
    out = prepare_include_path(tmp_path / "tasks")
    copy = out / "wuneng_arith" / "wuneng_arith.yaml"
    with open(copy, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.resolve() == WUNENG_ARITH_JSONL.resolve()
    shipped = load_task_yaml()
    shipped.pop("dataset_kwargs")
    config.pop("dataset_kwargs")
    assert config == shipped
