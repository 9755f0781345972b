"""Three synthetic skills for the demo: data generators and answer checkers.

Every skill turns a seeded :class:`random.Random` into ``(prompt, answer)`` pairs. The prompt ends
with ``=`` and the answer follows it directly, so the boundary between them is also a boundary of
the tokenizer's pre-tokenisation (what the model sees in training is exactly what lm-eval feeds it).

* ``arithmetic``: multi-digit addition, ``add 48+79=`` -> ``127``. Scored by exact match.
* ``rpn``: a code-like task. Compile an infix expression over single digits into a program for a
  tiny stack machine, ``rpn (3+4)*2=`` -> ``3 4 + 2 *``. Scored by a *checker* that runs the
  program: it must be well formed, use exactly the expression's digits, and compute the same value.
  Any correct program passes, not only the reference one (``4 3 + 2 *`` is also right).
* ``translate``: translate a small English sentence into a made-up language with its own word
  order (subject-object-verb, adjectives after their noun, no articles) and a lexicon drawn from a
  seeded syllable generator, ``tr the red dog sees a cat=`` -> ``vobu lesa kira tomi``.
  Scored by exact match.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

Example = tuple[str, str]

# --------------------------------------------------------------------------------------------
# arithmetic


def make_arithmetic(min_digits: int = 2, max_digits: int = 3) -> Callable[[random.Random], Example]:
    """Addition of two numbers with ``min_digits``..``max_digits`` digits each."""

    def generate(rng: random.Random) -> Example:
        da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
        a, b = rng.randint(10 ** (da - 1), 10**da - 1), rng.randint(10 ** (db - 1), 10**db - 1)
        return f"add {a}+{b}=", str(a + b)

    return generate


# --------------------------------------------------------------------------------------------
# rpn: infix -> stack program, checked by running the program

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _random_expression(rng: random.Random, n_ops: int) -> str:
    """A random infix expression over single digits with ``n_ops`` binary operators; random
    sub-expressions are parenthesised so both precedence and brackets matter."""
    if n_ops == 0:
        return str(rng.randint(0, 9))
    left_ops = rng.randint(0, n_ops - 1)
    left = _random_expression(rng, left_ops)
    right = _random_expression(rng, n_ops - 1 - left_ops)
    op = rng.choice("+-*")
    if left_ops and rng.random() < 0.5:
        left = f"({left})"
    if n_ops - 1 - left_ops and rng.random() < 0.5:
        right = f"({right})"
    return f"{left}{op}{right}"


def infix_to_rpn(expression: str) -> list[str]:
    """Shunting-yard: the reference stack program for ``expression`` (left-associative ops)."""
    output: list[str] = []
    stack: list[str] = []
    for ch in expression:
        if ch.isdigit():
            output.append(ch)
        elif ch in _PRECEDENCE:
            while stack and stack[-1] in _PRECEDENCE and _PRECEDENCE[stack[-1]] >= _PRECEDENCE[ch]:
                output.append(stack.pop())
            stack.append(ch)
        elif ch == "(":
            stack.append(ch)
        elif ch == ")":
            while stack[-1] != "(":
                output.append(stack.pop())
            stack.pop()
        else:
            raise ValueError(f"unexpected character {ch!r} in {expression!r}")
    while stack:
        output.append(stack.pop())
    return output


def run_stack_program(program: Sequence[str]) -> int | None:
    """Run a stack program (digits push themselves; ``+ - *`` pop two and push the result).
    Return the single value left on the stack, or ``None`` if the program is malformed."""
    stack: list[int] = []
    for token in program:
        if len(token) == 1 and token.isdigit():
            stack.append(int(token))
        elif token in _PRECEDENCE:
            if len(stack) < 2:
                return None
            b, a = stack.pop(), stack.pop()
            stack.append(a + b if token == "+" else a - b if token == "-" else a * b)
        else:
            return None
    return stack[0] if len(stack) == 1 else None


def evaluate_infix(expression: str) -> int:
    value = run_stack_program(infix_to_rpn(expression))
    assert value is not None
    return value


def check_rpn(expression: str, completion: str) -> bool:
    """True iff ``completion`` is a stack program that uses exactly the digits of ``expression``
    (as a multiset) and computes its value. Pushing a precomputed result is not a compilation."""
    program = completion.split()
    if not program:
        return False
    digits_used = sorted(t for t in program if t.isdigit())
    if digits_used != sorted(ch for ch in expression if ch.isdigit()):
        return False
    value = run_stack_program(program)
    return value is not None and value == evaluate_infix(expression)


def make_rpn(min_ops: int = 1, max_ops: int = 3) -> Callable[[random.Random], Example]:
    def generate(rng: random.Random) -> Example:
        expression = _random_expression(rng, rng.randint(min_ops, max_ops))
        return f"rpn {expression}=", " ".join(infix_to_rpn(expression))

    return generate


def rpn_expression_from_prompt(prompt: str) -> str:
    """``'rpn (3+4)*2='`` -> ``'(3+4)*2'``."""
    body = prompt.strip()
    if body.startswith("rpn "):
        body = body[4:]
    return body.rstrip("=").strip()


# --------------------------------------------------------------------------------------------
# translate: English -> a made-up language

ENGLISH_NOUNS = ("dog", "cat", "bird", "fish", "man", "woman", "child", "king", "horse", "frog")
ENGLISH_ADJECTIVES = ("big", "small", "red", "blue", "old", "young", "happy", "green")
ENGLISH_VERBS = ("sees", "eats", "likes", "finds", "chases", "helps")
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def make_lexicon(seed: int) -> dict[str, str]:
    """A seeded English -> made-up lexicon: distinct two-syllable words."""
    rng = random.Random(seed)
    words = ENGLISH_NOUNS + ENGLISH_ADJECTIVES + ENGLISH_VERBS
    made_up: dict[str, str] = {}
    used = set()
    for word in words:
        while True:
            candidate = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)
            if candidate not in used:
                break
        used.add(candidate)
        made_up[word] = candidate
    return made_up


def make_translate(
    lexicon_seed: int = 7, p_adjective: float = 0.5, phrases_only: bool = False
) -> Callable[[random.Random], Example]:
    """``the [adj] N1 V the [adj] N2`` (articles ``the``/``a``) -> ``N1' [adj'] N2' [adj'] V'``.

    With ``phrases_only`` the examples are single noun phrases (``tr the red dog=`` -> ``vobu lesa``)
    or single verbs: the whole lexicon, but none of the sentence-level word order."""
    lexicon = make_lexicon(lexicon_seed)

    def phrase(rng: random.Random) -> tuple[list[str], list[str]]:
        noun = rng.choice(ENGLISH_NOUNS)
        adjective = rng.choice(ENGLISH_ADJECTIVES) if rng.random() < p_adjective else None
        english = [rng.choice(("the", "a"))] + ([adjective] if adjective else []) + [noun]
        target = [lexicon[noun]] + ([lexicon[adjective]] if adjective else [])
        return english, target

    def generate(rng: random.Random) -> Example:
        if phrases_only:
            if rng.random() < 0.25:
                verb = rng.choice(ENGLISH_VERBS)
                return f"tr {verb}=", lexicon[verb]
            english, target = phrase(rng)
            return f"tr {' '.join(english)}=", " ".join(target)
        subject, subject_t = phrase(rng)
        obj, obj_t = phrase(rng)
        verb = rng.choice(ENGLISH_VERBS)
        english = " ".join(subject + [verb] + obj)
        target = " ".join(subject_t + obj_t + [lexicon[verb]])
        return f"tr {english}=", target

    return generate


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Skill:
    """A skill: its name (also the lm-eval task suffix), a generator, and a scorer."""

    name: str
    description: str
    generate: Callable[[random.Random], Example]
    check: Callable[[str, str, str], bool]  # (prompt, reference answer, completion) -> correct


def _exact(prompt: str, answer: str, completion: str) -> bool:
    return completion.strip() == answer.strip()


def _rpn_check(prompt: str, answer: str, completion: str) -> bool:
    return check_rpn(rpn_expression_from_prompt(prompt), completion)


def build_skills(options: dict[str, dict] | None = None) -> dict[str, Skill]:
    """The three skills, optionally with generator options per skill name."""
    options = options or {}
    return {
        "arithmetic": Skill(
            "arithmetic",
            "multi-digit addition, exact match",
            make_arithmetic(**options.get("arithmetic", {})),
            _exact,
        ),
        "rpn": Skill(
            "rpn",
            "compile infix to a stack program; a checker runs it",
            make_rpn(**options.get("rpn", {})),
            _rpn_check,
        ),
        "translate": Skill(
            "translate",
            "English to a made-up SOV language, exact match",
            make_translate(**options.get("translate", {})),
            _exact,
        ),
    }


SKILL_NAMES = ("arithmetic", "rpn", "translate")


def unique_examples(
    generate: Callable[[random.Random], Example], n: int, rng: random.Random, exclude: Iterable[str] = ()
) -> list[Example]:
    """``n`` examples with distinct prompts, none of them in ``exclude``."""
    seen = set(exclude)
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct examples; the skill's space is too small")
        prompt, answer = generate(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def write_jsonl(examples: Sequence[Example], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for prompt, answer in examples:
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# lm-eval hooks (used through ``!function`` from the generated task YAMLs)


def _completion(results) -> str:
    text = results[0] if isinstance(results, (list, tuple)) else results
    if isinstance(text, (list, tuple)):  # some filters wrap once more
        text = text[0]
    return str(text).split("\n")[0]


def process_results_exact(doc, results) -> dict[str, float]:
    return {"exact_match": float(_exact(doc["prompt"], doc["answer"], _completion(results)))}


def process_results_rpn(doc, results) -> dict[str, float]:
    return {"pass": float(_rpn_check(doc["prompt"], doc["answer"], _completion(results)))}
