"""Writes the tiny offline fixture data under tests/evaluation/data (run once; output is kept).

Items are written by this project in each upstream data set's schema, at the path
``--data-dir`` expects: ``<dataset_path>/<dataset_name or default>/<split>.jsonl``.
Run: python tests/evaluation/make_fixture_data.py
"""

from pathlib import Path

from mergekit_ace.evaluation.data import write_jsonl

HERE = Path(__file__).resolve().parent / "data"

XQUAD_ZH = [
    {"id": "fx-zh-0", "context": "北京是中国的首都，也是一座有三千多年历史的城市。",
     "question": "中国的首都是哪里？", "answers": {"text": ["北京"], "answer_start": [0]}},
    {"id": "fx-zh-1", "context": "长江是亚洲最长的河流，全长约六千三百公里。",
     "question": "亚洲最长的河流是什么？", "answers": {"text": ["长江"], "answer_start": [0]}},
    {"id": "fx-zh-2", "context": "熊猫主要吃竹子，生活在四川的山区。",
     "question": "熊猫主要吃什么？", "answers": {"text": ["竹子"], "answer_start": [4]}},
]
XQUAD_VI = [
    {"id": "fx-vi-0", "context": "Hà Nội là thủ đô của Việt Nam.",
     "question": "Thủ đô của Việt Nam là gì?", "answers": {"text": ["Hà Nội"], "answer_start": [0]}},
    {"id": "fx-vi-1", "context": "Sông Mê Kông chảy qua sáu quốc gia.",
     "question": "Sông Mê Kông chảy qua bao nhiêu quốc gia?",
     "answers": {"text": ["sáu"], "answer_start": [25]}},
]
GSM8K = [
    {"question": "Tom has 3 boxes with 6 apples each. How many apples does he have?",
     "answer": "Tom has 3 * 6 = <<3*6=18>>18 apples.\n#### 18"},
    {"question": "A book costs $12 and a pen costs $3. How much do 2 books and 1 pen cost?",
     "answer": "2 books cost 2 * 12 = <<2*12=24>>24 dollars. Total 24 + 3 = <<24+3=27>>27.\n#### 27"},
    {"question": "There are 40 birds. 15 fly away. How many birds are left?",
     "answer": "40 - 15 = <<40-15=25>>25 birds are left.\n#### 25"},
]
HUMANEVAL = [
    {"task_id": "Fixture/0",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
     "canonical_solution": "    return a + b\n",
     "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n    assert candidate(10, 7) == 17\n",
     "entry_point": "add"},
    {"task_id": "Fixture/1",
     "prompt": 'from typing import List\n\n\ndef running_max(numbers: List[int]) -> List[int]:\n    """Return the running maximum of the list.\n    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    """\n',
     "canonical_solution": "    result = []\n    best = None\n    for n in numbers:\n        best = n if best is None else max(best, n)\n        result.append(best)\n    return result\n",
     "test": "\n\ndef check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]\n    assert candidate([5, 4, 3]) == [5, 5, 5]\n",
     "entry_point": "running_max"},
    {"task_id": "Fixture/2",
     "prompt": 'def is_palindrome(text: str) -> bool:\n    """Whether text reads the same backwards.\n    >>> is_palindrome("abba")\n    True\n    """\n',
     "canonical_solution": "    return text == text[::-1]\n",
     "test": "\n\ndef check(candidate):\n    assert candidate('abba') is True\n    assert candidate('abc') is False\n    assert candidate('') is True\n",
     "entry_point": "is_palindrome"},
]
IFEVAL = [
    {"key": 9001, "prompt": "Write one short sentence about cats. Do not use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 9002, "prompt": "Describe the sea in less than 3 sentences.",
     "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}]},
    {"key": 9003, "prompt": "Write a poem about rain. Wrap its title in double angular brackets, i.e. <<title>>.",
     "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
]

if __name__ == "__main__":
    write_jsonl(HERE / "google/xquad/xquad.zh/validation.jsonl", XQUAD_ZH)
    write_jsonl(HERE / "google/xquad/xquad.vi/validation.jsonl", XQUAD_VI)
    write_jsonl(HERE / "openai/gsm8k/main/test.jsonl", GSM8K)
    write_jsonl(HERE / "openai/openai_humaneval/default/test.jsonl", HUMANEVAL)
    write_jsonl(HERE / "google/IFEval/default/train.jsonl", IFEVAL)
    print("written under", HERE)
