"""loralab.latex: escaping, table rendering and a real pdflatex compile of the nasty cases."""

import numpy as np
import pandas as pd
import pytest

from loralab.latex import compile_check, latex_escape, latex_table

PDFLATEX_MISSING = "pdflatex not installed (Debian texlive-latex-base + texlive-latex-recommended)"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\", r"\textbackslash{}"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}"),
        ("<>|", r"$<>|$"),
        ("φ", r"$\phi$"),
        ("Δ", r"$\Delta$"),
        ("σ", r"$\sigma$"),
        ("η", r"$\eta$"),
        ("α", r"$\alpha$"),
        ("Ω", r"$\Omega$"),
        ("‖", r"$\|$"),
        ("⊙", r"$\odot$"),
        ("−", r"$-$"),
        ("±", r"$\pm$"),
        ("≥", r"$\geq$"),
        ("≤", r"$\leq$"),
        ("×", r"$\times$"),
        ("·", r"$\cdot$"),
        ("→", r"$\rightarrow$"),
        ("²", r"$^2$"),
        ("ᵀ", r"$^\top$"),
        ("…", r"\ldots{}"),
        ("–", "--"),
        ("plain text 1.5e-3 (a, b) = c", "plain text 1.5e-3 (a, b) = c"),
        ("lora_r=8", r"lora\_r=8"),
        ("50%", r"50\%"),
        ("ΔW_q ‖·‖", r"$\Delta$W\_q $\|\cdot\|$"),
        ("86.5 ± 0.4", r"86.5 $\pm$ 0.4"),
        ("φ(1,1)", r"$\phi$(1,1)"),
        ("W_qᵀ x²", r"W\_q$^\top$ x$^2$"),
        ("x²³", r"x$^{23}$"),
        ("Aᵀⁿ", r"A$^{\top n}$"),  # control word kept apart from the next letter
        ("σ₁", r"$\sigma_1$"),
        ("Δ²", r"$\Delta^2$"),
        ("a…b", r"a\ldots{}b"),
        ("café naïve", "cafe naive"),
        ("ﬁ", "fi"),
        ("％", r"\%"),
        ("😀 ✓", "? ?"),
        ("a\nb\tc", "a b c"),
    ],
)
def test_latex_escape(text, expected):
    assert latex_escape(text) == expected


def test_latex_escape_is_always_ascii():
    every_char = "".join(map(chr, range(0x20, 0x3000)))
    assert latex_escape(every_char).isascii()


def _nasty_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "φ(1,1)": [0.123456, np.nan, 12345.678],
            "ΔW_q ‖·‖": ["86.5 ± 0.4", None, "50%"],
            "acc_%": [pd.NA, 1.5, float("inf")],
            3: [1, 2, 3],
            ("tuple", 1): ["W ⊙ Bᵀ", "η ≥ 1e-4 → ×2", "a & b # c $ d"],
        },
        index=pd.Index(["lora_r=8", "α=16", "σ≤0.1…"], name="config_name"),
    )


def _multi_frame() -> pd.DataFrame:
    columns = pd.MultiIndex.from_product([["acc_%", "‖ΔW‖²"], [1, 2]], names=["metric_name", "seed#"])
    index = pd.MultiIndex.from_tuples(
        [("lora_r=8", 0.001), ("lora_r=8", 0.0001), ("LieRA φ", np.nan)], names=["a_b", None]
    )
    frame = pd.DataFrame(np.arange(12.0).reshape(3, 4) / 3, index=index, columns=columns)
    frame.iloc[1, 2] = np.nan
    return frame


def test_latex_table_nasty_frame_is_ascii_and_escaped():
    tex = latex_table(_nasty_frame(), caption="Results: 50% of ΔW_q ‖·‖ — η ≥ 0", label="tab:nasty_1")
    assert tex.isascii()
    assert tex.startswith("\\begin{table}") and tex.rstrip().endswith("\\end{table}")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert rule in tex
    assert "\\caption{Results: 50\\% of $\\Delta$W\\_q $\\|\\cdot\\|$ --- $\\eta$ $\\geq$ 0}" in tex
    assert "\\label{tab:nasty_1}" in tex
    assert "$\\phi$(1,1)" in tex and "$\\Delta$W\\_q $\\|\\cdot\\|$" in tex and "acc\\_\\%" in tex
    assert "('tuple', 1)" in tex and "config\\_name" in tex
    assert "lora\\_r=8 & 0.123 & 86.5 $\\pm$ 0.4 & -- & 1 & W $\\odot$ B$^\\top$ \\\\" in tex
    assert "$\\alpha$=16 & -- & -- & 1.5 & 2 &" in tex
    assert "1.23e+04" in tex and "50\\%" in tex and "a \\& b \\# c \\$ d" in tex
    assert "NaN" not in tex and "nan" not in tex and "None" not in tex and "<NA>" not in tex
    assert "\\begin{tabular}{lrlrrl}" in tex  # numeric columns right-aligned


def test_latex_table_nan_cells():
    frame = pd.DataFrame({"x": [np.nan, 1.0], "y": [None, "a"], "z": pd.array([pd.NA, 2], dtype="Int64")})
    tex = latex_table(frame, caption="c", label="tab:nan")
    assert "0 & -- & -- & -- \\\\" in tex
    assert "1 & 1 & a & 2 \\\\" in tex


def test_latex_table_float_format_and_no_index():
    frame = pd.DataFrame({"v": [1 / 3, 2 / 3]}, index=["a", "b"])
    tex = latex_table(frame, caption="c", label="tab:ff", float_format="%.2f", index=False)
    assert "0.33 \\\\" in tex and "0.67 \\\\" in tex
    assert "\\begin{tabular}{r}" in tex and "a &" not in tex


def test_latex_table_multiindex():
    tex = latex_table(_multi_frame(), caption="Multi: ‖ΔW‖² per seed", label="tab:multi")
    assert tex.isascii()
    assert "\\multicolumn{2}{c}{acc\\_\\%}" in tex
    assert "\\multicolumn{2}{c}{$\\|\\Delta$W$\\|^2$}" in tex
    assert "metric\\_name" in tex and "seed\\#" in tex and "a\\_b" in tex
    assert "lora\\_r=8 & 0.001 & 0 & 0.333 & 0.667 & 1 \\\\" in tex
    assert " & 0.0001 & 1.33 & 1.67 & -- & 2.33 \\\\" in tex  # sparsified first level, NaN cell
    assert "LieRA $\\phi$ & -- & 2.67 &" in tex  # NaN index label
    assert "\\multirow" not in tex  # needs a package the minimal document lacks
    assert "NaN" not in tex and "nan" not in tex


def test_latex_table_label_sanitized():
    tex = latex_table(pd.DataFrame({"a": [1]}), caption="c", label="tab:a b%φ")
    assert "\\label{tab:a-b--}" in tex


def test_tables_compile_with_pdflatex(tmp_path):
    tables = [
        latex_table(_nasty_frame(), caption="Results: 50% of ΔW_q ‖·‖ — η ≥ 0 (α/r, σ², Wᵀ)…", label="tab:nasty"),
        latex_table(_nasty_frame(), caption="No index: x ± y & #1", label="tab:noindex", index=False),
        latex_table(_multi_frame(), caption="Multi: ‖ΔW‖² per seed", label="tab:multi"),
        latex_table(_multi_frame().T, caption="Multi transposed", label="tab:multi_t"),
        latex_table(pd.DataFrame({"x": [np.nan], "y": [None]}), caption="only missing", label="tab:missing"),
        latex_table(
            pd.DataFrame({"path\\to": ["C:\\dir", "{~^}"], "Aᵀⁿ x²³ σ₁": ["café 😀", "<a|b>"]}),
            caption="backslashes, braces, scripts",
            label="tab:odd",
        ),
    ]
    result = compile_check("\n\n".join(tables), tmp_path)
    if result is None:
        pytest.skip(PDFLATEX_MISSING)
    log = (
        (tmp_path / "compile_check.log").read_text(errors="replace")
        if (tmp_path / "compile_check.log").exists()
        else ""
    )
    assert result.returncode == 0, result.stdout[-4000:] + log[-4000:]
    pdf = tmp_path / "compile_check.pdf"
    assert pdf.exists() and pdf.stat().st_size > 0
    assert "Missing character" not in log  # a glyph the font lacks would print as nothing


def test_compile_check_reports_failure(tmp_path):
    result = compile_check("\\begin{tabular}{ll}\nlora_r=8 & 50\\% \\\\\n\\end{tabular}", tmp_path)  # raw _
    if result is None:
        pytest.skip(PDFLATEX_MISSING)
    assert result.returncode != 0
