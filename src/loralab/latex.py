"""LaTeX tables that compile with plain ``pdflatex`` + ``booktabs``.

Why this exists: ``DataFrame.to_latex(escape=True)`` escapes the ASCII specials (``% _ & #`` ...) but passes unicode
through untouched (φ, Δ, ‖, ⊙, ±, ≥, ², ᵀ, "…" -> "Unicode character not set up for use with LaTeX") and writes
``NaN`` cells verbatim; without ``escape`` even ``lora_r=8`` or ``50%`` breaks the build. Here every label, cell and
caption goes through :func:`latex_escape`, which maps Greek letters and math symbols to inline math, drops accents and
never emits raw non-ASCII, and missing values become ``--``. :func:`compile_check` runs pdflatex on the result.
"""

from __future__ import annotations

import numbers
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pandas as pd

__all__ = ["latex_escape", "latex_table", "compile_check"]

_TEXT = {  # ASCII specials (and OT1 glyph traps) -> text-mode LaTeX
    "\\": r"\textbackslash{}",
    "%": r"\%",
    "_": r"\_",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\u2026": r"\ldots{}",  # …
    "\u2013": "--",  # – en dash
    "\u2014": "---",  # — em dash
    "\u2018": "`",
    "\u2019": "'",
    "\u201c": "``",
    "\u201d": "''",
    "\u00a0": "~",  # no-break space
    "\u00df": r"\ss{}",
    "\u00e6": r"\ae{}",
    "\u00c6": r"\AE{}",
    "\u00f8": r"\o{}",
    "\u00d8": r"\O{}",
    "\u0142": r"\l{}",
    "\u0141": r"\L{}",
}

_GREEK = {
    "α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "varepsilon", "ϵ": "epsilon", "ζ": "zeta",
    "η": "eta", "θ": "theta", "ϑ": "vartheta", "ι": "iota", "κ": "kappa", "λ": "lambda", "μ": "mu", "µ": "mu",
    "ν": "nu", "ξ": "xi", "π": "pi", "ϖ": "varpi", "ρ": "rho", "ϱ": "varrho", "σ": "sigma", "ς": "varsigma",
    "τ": "tau", "υ": "upsilon", "φ": "phi", "ϕ": "phi", "χ": "chi", "ψ": "psi", "ω": "omega",
    "Γ": "Gamma", "Δ": "Delta", "Θ": "Theta", "Λ": "Lambda", "Ξ": "Xi", "Π": "Pi", "Σ": "Sigma", "Υ": "Upsilon",
    "Φ": "Phi", "Ψ": "Psi", "Ω": "Omega",
}  # fmt: skip
_GREEK_LATIN = dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΧο", "ABEZHIKMNOPTXo"))  # no LaTeX command: same glyph as a Latin letter

_MATH = {  # -> inside $...$
    "‖": r"\|", "⊙": r"\odot", "−": "-", "±": r"\pm", "∓": r"\mp", "≥": r"\geq", "≤": r"\leq", "×": r"\times",
    "·": r"\cdot", "⋅": r"\cdot", "∙": r"\cdot", "•": r"\bullet", "÷": r"\div", "→": r"\rightarrow",
    "←": r"\leftarrow", "↔": r"\leftrightarrow", "⇒": r"\Rightarrow", "⇐": r"\Leftarrow", "⇔": r"\Leftrightarrow",
    "↑": r"\uparrow", "↓": r"\downarrow", "≈": r"\approx", "≃": r"\simeq", "≅": r"\cong", "≠": r"\neq",
    "≡": r"\equiv", "∼": r"\sim", "≪": r"\ll", "≫": r"\gg", "∝": r"\propto", "∞": r"\infty", "∑": r"\sum",
    "∏": r"\prod", "∫": r"\int", "√": r"\surd", "∂": r"\partial", "∇": r"\nabla", "∈": r"\in", "∉": r"\notin",
    "⊂": r"\subset", "⊆": r"\subseteq", "∪": r"\cup", "∩": r"\cap", "∅": r"\emptyset", "∀": r"\forall",
    "∃": r"\exists", "¬": r"\neg", "∧": r"\wedge", "∨": r"\vee", "⊗": r"\otimes", "⊕": r"\oplus", "∘": r"\circ",
    "†": r"\dagger", "‡": r"\ddagger", "′": r"\prime", "°": r"^\circ", "|": "|", "<": "<", ">": ">",
}  # fmt: skip
_SUP = {"ᵀ": r"\top", "⁺": "+", "⁻": "-", "⁼": "=", "⁽": "(", "⁾": ")", "ⁿ": "n", "ⁱ": "i"}
_SUP.update(zip("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789"))
_SUB = {"₊": "+", "₋": "-", "₌": "=", "₍": "(", "₎": ")"}
_SUB.update(zip("₀₁₂₃₄₅₆₇₈₉", "0123456789"))


def _char(ch: str) -> tuple[str, str]:
    """One character -> (kind, LaTeX): kind "text", "math", "sup" or "sub"."""
    if ch in _TEXT:
        return "text", _TEXT[ch]
    if ch in _GREEK:
        return "math", "\\" + _GREEK[ch]
    if ch in _MATH:
        return "math", _MATH[ch]
    if ch in _SUP:
        return "sup", _SUP[ch]
    if ch in _SUB:
        return "sub", _SUB[ch]
    if ch in _GREEK_LATIN:
        return "text", _GREEK_LATIN[ch]
    if ch.isascii():
        return "text", ch if ch.isprintable() else " "  # tabs, newlines, control characters -> a space
    if unicodedata.combining(ch):
        return "text", ""  # a stray accent
    if ch.isspace():
        return "text", " "
    decomposed = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if decomposed and decomposed != ch:  # é -> e, ﬁ -> fi, full-width ％ -> \%; NFKD is idempotent: no loop
        return "text", latex_escape(decomposed)
    return "text", "?"


def _join(parts: list[str]) -> str:
    """Concatenate math snippets, keeping control words apart (``\\top`` + ``n`` is not ``\\topn``)."""
    out = ""
    for part in parts:
        if out and re.search(r"\\[A-Za-z]+$", out) and part[:1].isalpha():
            out += " "
        out += part
    return out


def latex_escape(text: str) -> str:
    """``text`` as pdflatex-safe LaTeX: pure ASCII, specials escaped, Greek letters and math symbols as inline math.

    ``"ΔW_q ‖·‖"`` -> ``"$\\Delta$W\\_q $\\|\\cdot\\|$"``, ``"86.5 ± 0.4"`` -> ``"86.5 $\\pm$ 0.4"``, ``"x²"`` ->
    ``"x$^2$"``. Adjacent math characters share one ``$...$``; accents are dropped (NFKD); anything else becomes ``?``.
    """
    out: list[str] = []
    math: list[str] = []  # the pending $...$ run
    script: tuple[str, list[str]] | None = None  # the pending ^{...} / _{...} run inside it

    def close_script():
        nonlocal script
        if script is not None:
            body = _join(script[1])
            math.append(("^" if script[0] == "sup" else "_") + (body if len(script[1]) == 1 else "{" + body + "}"))
            script = None

    def close_math():
        close_script()
        if math:
            out.append("$" + _join(math) + "$")
            math.clear()

    for ch in str(text):
        kind, tex = _char(ch)
        if kind == "text":
            close_math()
            out.append(tex)
        elif kind == "math":
            close_script()
            math.append(tex)
        else:
            if script is not None and script[0] != kind:
                close_script()
            if script is None:
                script = (kind, [])
            script[1].append(tex)
    close_math()
    return "".join(out)


def _cell(value, float_format: str | Callable[[float], str]) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "--"
    if isinstance(value, str):
        return latex_escape(value)
    if pd.api.types.is_float(value):
        return latex_escape(float_format(value) if callable(float_format) else float_format % value)
    return latex_escape(str(value))


def _numeric(column: pd.Series) -> bool:
    """Right-align a column whose present values are all numbers (also an object column of floats and pd.NA)."""
    if pd.api.types.is_bool_dtype(column.dtype):
        return False
    if pd.api.types.is_numeric_dtype(column.dtype):
        return True
    present = [v for v in column if not (v is None or (pd.api.types.is_scalar(v) and pd.isna(v)))]
    return bool(present) and all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in present)


def _name(name) -> str | None:
    return None if name is None else _cell(name, str)


def _labels(index: pd.Index, float_format) -> pd.Index:
    levels = [[_cell(v, float_format) for v in index.get_level_values(i)] for i in range(index.nlevels)]
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_arrays(levels, names=[_name(n) for n in index.names])
    return pd.Index(levels[0], name=_name(index.name), dtype=object)


def latex_table(
    frame: pd.DataFrame,
    caption: str,
    label: str,
    float_format: str = "%.3g",
    index: bool = True,
) -> str:
    """A complete booktabs ``table`` environment for ``frame`` that compiles with pdflatex (see the module docstring).

    Index and column labels (MultiIndex levels, names, ints, tuples), cells and ``caption`` go through
    :func:`latex_escape`; NaN / None / ``pd.NA`` -> ``--``; floats (cells and labels) through ``float_format``; numeric
    columns are right-aligned. ``label`` keeps ``[A-Za-z0-9:._/+-]`` (other characters -> ``-``).
    """
    rows = [[_cell(v, float_format) for v in row] for row in frame.itertuples(index=False, name=None)]
    body = pd.DataFrame(
        rows, index=_labels(frame.index, float_format), columns=_labels(frame.columns, float_format), dtype=object
    )
    align = "".join("r" if _numeric(frame.iloc[:, i]) else "l" for i in range(frame.shape[1]))
    tex = body.to_latex(
        escape=False,
        index=index,
        na_rep="--",
        column_format=("l" * frame.index.nlevels if index else "") + align,
        caption=latex_escape(caption),
        label=re.sub(r"[^A-Za-z0-9:._/+-]", "-", label),
        multicolumn=True,
        multicolumn_format="c",
        multirow=False,  # \multirow needs the multirow package
    )
    return tex.replace("\\begin{table}\n", "\\begin{table}\n\\centering\n", 1)


def compile_check(tex_body: str, workdir: str | Path) -> subprocess.CompletedProcess | None:
    """Compile ``tex_body`` (e.g. tables from :func:`latex_table`) in a minimal article + booktabs document.

    Writes ``workdir/compile_check.tex`` and runs ``pdflatex -interaction=nonstopmode -halt-on-error`` there (the PDF is
    ``workdir/compile_check.pdf``); returns the finished process, or None when pdflatex is not installed.
    """
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        return None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    doc = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + tex_body + "\n\\end{document}\n"
    (workdir / "compile_check.tex").write_text(doc, encoding="utf-8")
    return subprocess.run(
        [pdflatex, "-interaction=nonstopmode", "-halt-on-error", "compile_check.tex"],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
