"""The README's usage example runs as written, and .ci/run executes the README's test command."""
import pathlib
import re
import subprocess

import tnlayers

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_example_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]  # the usage example comes first
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    # the totals the README claims for the tensorized ResNet-32 are the real ones: summary's footer prints
    # them, and they match parameter counts summed here, independently of summary
    claimed, claimed_dense = (int(n.replace(",", "")) for n in re.search(
        r"tnlayers\.summary\(model\).*totals ([\d,]+) vs ([\d,]+) dense", code).groups())
    params = sum(p.numel() for p in scope["model"].parameters())
    dense = sum(p.numel() for p in tnlayers.models.resnet32().parameters())
    assert (claimed, claimed_dense) == (params, dense)
    footer = capsys.readouterr().out.strip().splitlines()[-1]
    assert footer.startswith(f"total: {params:,} parameters (dense: {dense:,}, {dense / params:.2f}x smaller)"), footer


def test_peft_example_runs(capsys):
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "import peft" in c and "core_groups" in c]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    names = eval(capsys.readouterr().out.strip().splitlines()[-1])  # the printed group names
    assert names == [f"base_model.model.transformer.h.{i}.attn.c_attn[default]" for i in range(2)]
    groups = {id(p) for _, cores in tnlayers.core_groups(scope["model"]) for p in cores}
    assert groups and all(id(p) in groups for n, p in scope["model"].named_parameters() if "lora_" in n)


def test_ci_runs_the_readme_test_command():
    awk = ROOT / ".ci" / "run"
    extract = re.search(r"test_cmd=\$\((awk .*?README\.md)\)", awk.read_text()).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True)
    block = README.split("<!-- ci:test-command -->", 1)[1]
    assert out.stdout.strip() == re.search(r"```bash\n(.*?)\n", block).group(1).strip()
    assert "pytest" in out.stdout



def test_trainer_example_runs(capsys):
    import pytest
    import torch

    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "SAMTrainer" in c]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads make each tiny step ~10x slower on a shared 2-core machine
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "SAM 10"
