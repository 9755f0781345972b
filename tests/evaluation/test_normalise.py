"""Tables against hand-computed values; presets and primary metrics."""

import json

import pytest

from mergekit_ace.evaluation.normalise import (
    TableError,
    build_tables,
    load_owners,
    parse_owners,
)
from mergekit_ace.evaluation.presets import PRESETS, expand_tasks, primary_metric

TASKS = ["xquad_zh", "gsm8k_cot"]
SCORES = {
    "base": {"xquad_zh": {"f1,none": 0.2, "exact_match,none": 0.1},
             "gsm8k_cot": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.3}},
    "zh": {"xquad_zh": {"f1,none": 0.5, "exact_match,none": 0.4},
           "gsm8k_cot": {"exact_match,strict-match": 0.05, "exact_match,flexible-extract": 0.1}},
    "math": {"xquad_zh": {"f1,none": 0.1, "exact_match,none": 0.0},
             "gsm8k_cot": {"exact_match,strict-match": 0.4, "exact_match,flexible-extract": 0.5}},
    "ace": {"xquad_zh": {"f1,none": 0.45, "exact_match,none": 0.3},
            "gsm8k_cot": {"exact_match,strict-match": 0.3, "exact_match,flexible-extract": 0.25}},
}
OWNERS = {"xquad_zh": "zh", "gsm8k_cot": "math"}


def test_normalised_table_and_averages_by_hand():
    t = build_tables(SCORES, TASKS, OWNERS, base="base")
    assert t["primary_metrics"] == {"xquad_zh": "f1,none", "gsm8k_cot": "exact_match,strict-match"}
    assert t["roles"] == {"base": "base", "zh": "expert", "math": "expert", "ace": "merge"}
    expected = {  # score / owner's score * 100
        "base": (40.0, 25.0, 32.5),
        "zh": (100.0, 12.5, 56.25),
        "math": (20.0, 100.0, 60.0),
        "ace": (90.0, 75.0, 82.5),
    }
    for model, (zh, gsm, avg) in expected.items():
        assert t["normalised"][model]["xquad_zh"] == pytest.approx(zh)
        assert t["normalised"][model]["gsm8k_cot"] == pytest.approx(gsm)
        assert t["averages"][model]["normalised"] == pytest.approx(avg)
    assert t["raw"]["ace"] == {"xquad_zh": 0.45, "gsm8k_cot": 0.3}
    assert t["averages"]["ace"]["raw"] == pytest.approx(0.375)
    assert t["averages"]["base"]["raw"] == pytest.approx(0.15)


def test_primary_metric_override_changes_the_table():
    t = build_tables(SCORES, TASKS, OWNERS, primary_overrides={"gsm8k_cot": "exact_match,flexible-extract"})
    assert t["normalised"]["ace"]["gsm8k_cot"] == pytest.approx(50.0)  # 0.25 / 0.5
    assert t["roles"]["base"] == "merge"  # no base given: not an expert, so a merge
    with pytest.raises(TableError, match="no metric 'bleu'"):
        build_tables(SCORES, TASKS, OWNERS, primary_overrides={"xquad_zh": "bleu"})


def test_owner_scoring_zero_gives_missing_not_infinity():
    scores = {"e": {"t": {"acc,none": 0.0}, "u": {"acc,none": 0.5}},
              "m": {"t": {"acc,none": 0.5}, "u": {"acc,none": 0.25}}}
    t = build_tables(scores, ["t", "u"], {"t": "e", "u": "e"})
    assert t["normalised"]["m"] == {"t": None, "u": 50.0}
    assert t["averages"]["m"]["normalised"] == pytest.approx(50.0)  # mean of the defined ones


def test_table_errors_name_the_culprit():
    with pytest.raises(TableError, match="task 'gsm8k_cot' has no owner"):
        build_tables(SCORES, TASKS, {"xquad_zh": "zh"})
    with pytest.raises(TableError, match="owner 'nobody' of task 'gsm8k_cot'"):
        build_tables(SCORES, TASKS, {"xquad_zh": "zh", "gsm8k_cot": "nobody"})
    with pytest.raises(TableError, match="base 'llama' is not one of the models"):
        build_tables(SCORES, TASKS, OWNERS, base="llama")
    assert build_tables(SCORES, TASKS)["normalised"] is None


def test_owner_file_formats(tmp_path):
    assert parse_owners({"zh": ["xquad_zh"], "math": ["gsm8k_cot", "mathqa"]}) == {
        "xquad_zh": "zh", "gsm8k_cot": "math", "mathqa": "math"}
    assert parse_owners({"owners": {"xquad_zh": "zh"}}) == {"xquad_zh": "zh"}
    with pytest.raises(TableError, match="two owners"):
        parse_owners({"a": ["t"], "b": ["t"]})
    yaml_file = tmp_path / "owners.yaml"
    yaml_file.write_text("xquad_zh: zh\ngsm8k_cot: math\n")
    assert load_owners(yaml_file) == OWNERS
    json_file = tmp_path / "owners.json"
    json_file.write_text(json.dumps({"zh": ["xquad_zh"]}))
    assert load_owners(json_file) == {"xquad_zh": "zh"}
    with pytest.raises(TableError, match="does not exist"):
        load_owners(tmp_path / "missing.yaml")


def test_presets_and_primary_metrics():
    assert expand_tasks(["ace-llama"]) == ["xquad_zh", "xquad_vi", "gsm8k_cot", "mathqa", "humaneval"]
    assert expand_tasks(["actmat-olmo"]) == list(PRESETS["actmat-olmo"])
    assert expand_tasks(["ifeval,humaneval", "ace-llama"])[:3] == ["ifeval", "humaneval", "xquad_zh"]
    assert primary_metric("humaneval", {"pass@1,create_test": 0.5, "alias": "humaneval"}) == "pass@1,create_test"
    assert primary_metric("ifeval", {"inst_level_strict_acc,none": 0.6,
                                     "prompt_level_strict_acc,none": 0.5}) == "prompt_level_strict_acc,none"
    assert primary_metric("xquad_vi", {"exact_match,none": 0.1, "f1,none": 0.3}) == "f1,none"
    assert primary_metric("my_task", {"sample_len": 5, "bleu,none": 3.0, "bleu_stderr,none": 0.1}) == "bleu,none"
    assert primary_metric("my_task", {"alias": "x"}) is None


def test_hub_ids_pass_the_model_check_and_missing_local_paths_do_not(tmp_path):
    from mergekit_ace.errors import UserError
    from mergekit_ace.evaluation.runner import check_models

    checked = check_models({"base": "meta-llama/Llama-3.2-3B-Instruct"}, "hf", {})
    assert str(checked["base"]) == "meta-llama/Llama-3.2-3B-Instruct"
    with pytest.raises(UserError, match="does not exist"):
        check_models({"m": str(tmp_path / "missing" / "model")}, "hf", {})
