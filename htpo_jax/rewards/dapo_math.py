"""The DAPO math reward: +1 if the last `Answer: ...` line matches the ground truth, else -1.

This is the reward the paper trains with (verl's `math_dapo.compute_score`, the Minerva-style
checker): only the last 300 characters of a response are read, the answer is the text after the
last `Answer:` (case-insensitive) up to the end of its line, and both it and the ground truth go
through `normalize_final_answer` before an exact string comparison. The optional strict-box mode
reads the last `\\boxed{...}` of the final 100 characters and compares it unnormalized.

Behaviour is pinned by `tests/golden/dapo_math_reward_cases.jsonl` (outputs of the official code).
"""

from __future__ import annotations

import re

INVALID = "[INVALID]"

# Only the tail is read: the longest MATH-500 answer has 159 characters, and a bounded input keeps
# every regex below cheap whatever the model writes.
TAIL_CHARS = 300
STRICT_BOX_TAIL_CHARS = 100
# Normalization reads at most the last this-many characters of an answer (after its last '=').
# Several rewrites below are quadratic in the length of a line (30,000 characters took 10 s),
# and a ground truth comes from data nobody checked. A response's answer is at most TAIL_CHARS
# long (at most ~500 once `frac12`-style shorthands are expanded), so a longer ground truth could
# never match anyway; the longest MATH-500 answer has 159 characters.
MAX_ANSWER_CHARS = 1000

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Plain string replacements, applied in this order (the order matters: "an " before "a ", the
# "\ " escape before bare spaces, "mbox" before the \text rules).
_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# Units and filler removed verbatim, in this order, after the substitutions.
_REMOVED: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

# (pattern, replacement) pairs applied with re.sub, in order. Each works line by line ('.' does
# not match a newline), exactly like the reference.
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    # keep only the first $...$ math span of a line
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),
    # unwrap \text{..}, \textbf{..}, \overline{..} (shortest) and \boxed{..} (longest)
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
    # shorthand TeX: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    (re.compile(r"(frac)([^{])(.)"), r"frac{\2}{\3}"),
    (re.compile(r"(sqrt)([^{])"), r"sqrt{\2}"),
)


def normalize_final_answer(answer: str) -> str:
    """Canonical string form of a final answer (Minerva / Hendrycks MATH normalization).

    Steps: keep the text after the last '='; apply the substitution list, then the removal list;
    unwrap math delimiters and text/bold/overline/boxed macros; expand shorthand \\frac and
    \\sqrt; drop '$'; drop thousands separators from pure digit strings; strip whitespace.
    Only the last MAX_ANSWER_CHARS characters after the last '=' are read (bounded time).
    """
    s = answer[answer.rfind("=") + 1 :][-MAX_ANSWER_CHARS:]  # == split("=")[-1], linear
    for old, new in _SUBSTITUTIONS:
        s = s.replace(old, new)
    for junk in _REMOVED:
        s = s.replace(junk, "")
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` of `text` with balanced braces, or None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def _unbox(boxed: str) -> str:
    return boxed[len("\\boxed{") : -1]


def extract_answer(solution: str) -> str:
    """Text after the last `Answer:` line marker, or INVALID. Reads the whole string given."""
    found = _ANSWER_LINE.findall(solution)
    return found[-1] if found else INVALID


def dapo_math_score(solution: str, ground_truth: str, strict_box: bool = False) -> dict:
    """DAPO reward of one response.

    Returns `{"score": 1.0 | -1.0, "acc": bool, "pred": str}` where `pred` is the normalized
    extracted answer (or "[INVALID]" when no answer line is found).
    """
    tail = solution[-TAIL_CHARS:]
    if strict_box:
        boxed = last_boxed(tail[-STRICT_BOX_TAIL_CHARS:])
        pred = _unbox(boxed) if boxed is not None else INVALID
        correct = pred == ground_truth
    else:
        pred = normalize_final_answer(extract_answer(tail))
        correct = pred == normalize_final_answer(ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
