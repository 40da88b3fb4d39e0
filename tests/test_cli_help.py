"""`python run.py --help`: every option group with its options, every variant and preset; no schemas, no files
that are not options."""

import re

from conftest import CONF, ROOT, run_cli
from loralab.cli_help import WIDTH


def test_help_lists_groups_options_variants_and_presets(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for group in ("model", "task", "variant", "logger", "experiment"):
        for option in (CONF / group).glob("*.yaml"):
            assert option.stem in text, (group, option.stem)
    assert "minilm*" in text and "lora*" in text and "tweet_sentiment*" in text and "wandb*" in text
    assert re.search(r"^  lierra +LieRA \(Si et al. 2025\)", text, re.M)  # a variant with its description
    assert re.search(r"^  loraga_llama +LoRA-GA's Llama-2-7B table", text, re.M)  # a preset with its description
    # one name column for variants and presets, wide enough for the longest name, which keeps a gap
    named = [p.stem for group in ("variant", "experiment") for p in (CONF / group).glob("*.yaml")]
    rows = [line for line in text.splitlines() if line.split()[:1] and line.split()[0] in named]
    starts = {len(line) - len(line[2:].split(" ", 1)[1].lstrip()) for line in rows}
    assert len(starts) == 1 and starts.pop() >= 2 + max(map(len, named)) + 2, starts
    assert max(map(len, text.splitlines())) <= WIDTH
    assert "_schema" not in text and "schema/" not in text and "accelerate" not in text
    assert "python run.py -m variant=lora,loraga,lierra rank=1,4,8,64" in text


def test_schemas_and_launch_files_are_not_option_groups():
    assert not (CONF / "accelerate").exists() and (ROOT / "launch" / "accelerate_ddp.yaml").is_file()
    assert not [p for p in CONF.rglob("*.yaml") if "_schema" in p.read_text()]
