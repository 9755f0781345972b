"""A stand-in lm-eval model for the tests: it answers each item from the item itself.

Registered with lm-eval as ``mergekit-ace-standin``; ``pretrained`` is a directory holding
``standin.json`` = ``{"mode": MODE}``. Modes:

* ``oracle`` -- the right answer (HumanEval: the canonical solution);
* ``wrong``  -- a wrong answer (HumanEval: code that fails the tests);
* ``loop``   -- HumanEval: a body that never returns (other tasks: as ``wrong``);
* ``even``   -- ``oracle`` on even ``doc_id``, ``wrong`` on odd ones;
* ``crash``  -- raises, to test that a failing cell is recorded and the others go on.

Two environment variables let the tests watch and stop a run (they are not model settings):
``MERGEKIT_ACE_STANDIN_CALLS=FILE`` appends ``MODE TASK N`` to FILE for every batch of requests
the model answers; ``MERGEKIT_ACE_STANDIN_HANG=TASK`` makes the model hang on that task (until
the run is killed), as a long cell does.

The answer goes through the real task pipeline: lm-eval builds the request from the fixture
data, the stand-in's text is cut at the task's stop sequences as a real model's is, then the
stock filters and metrics score it.
"""

import json
import os
import time
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

IFEVAL_RIGHT = {
    9001: "Cats sleep most of the day.",
    9002: "The sea is wide and blue. It never sleeps.",
    9003: "<<Rain>>\nSoft rain taps the roof.\nThe night is calm.",
}
IFEVAL_WRONG = {
    9001: "Cats, as everyone knows, sleep a lot.",
    9002: "The sea is wide. It is blue. It is deep. It is old.",
    9003: "Rain\nSoft rain taps the roof.",
}


def answer(task: str, doc: dict, right: bool, loop: bool = False) -> str:
    if task.startswith("humaneval"):
        if loop:
            return "    while True:\n        pass\n"
        return doc["canonical_solution"] if right else "    return None\n"
    if task.startswith("xquad"):
        return doc["answers"]["text"][0] if right else "不知道"
    if task.startswith("gsm8k"):
        value = doc["answer"].split("####")[-1].strip()
        return f" Let me think. The answer is {value if right else int(value) + 1}."
    if task.startswith("local_"):  # the include_path test's own task
        return f"{doc['answer'] if right else 'no idea'}\nQ: more"
    if task == "ifeval":
        return (IFEVAL_RIGHT if right else IFEVAL_WRONG)[doc["key"]]
    raise ValueError(f"the stand-in model does not know task {task!r}")


def cut_at_stop(text: str, until) -> str:
    """What a real model returns: the generation up to the first stop sequence."""
    for stop in until or []:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


BACKEND = "mergekit-ace-standin"


@register_model(BACKEND)
class StandInLM(LM):
    def __init__(self, pretrained: str, **kwargs):
        super().__init__()
        self.mode = json.loads((Path(pretrained) / "standin.json").read_text())["mode"]
        self.calls = 0

    def generate_until(self, requests, disable_tqdm: bool = False):
        tasks = sorted({req.task_name for req in requests})
        calls = os.environ.get("MERGEKIT_ACE_STANDIN_CALLS")
        if calls:
            with open(calls, "a") as handle:
                handle.write(f"{self.mode} {','.join(tasks)} {len(requests)}\n")
        if os.environ.get("MERGEKIT_ACE_STANDIN_HANG") in tasks:
            time.sleep(600)
        out = []
        for req in requests:
            if self.mode == "crash":
                raise RuntimeError("stand-in model crashed on purpose")
            _, gen_kwargs = req.args
            right = self.mode == "oracle" or (self.mode == "even" and req.doc_id % 2 == 0)
            text = answer(req.task_name, req.doc, right, loop=self.mode == "loop")
            out.append(cut_at_stop(text, gen_kwargs.get("until")))
            self.calls += 1
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the stand-in model only generates")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the stand-in model only generates")


def make_standin(directory: Path, mode: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "standin.json").write_text(json.dumps({"mode": mode}))
    return directory
