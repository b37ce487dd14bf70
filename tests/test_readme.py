"""The README's usage example runs as written, and .ci/run executes the README's test command."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_example_runs():
    (code,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    awk = ROOT / ".ci" / "run"
    extract = re.search(r"test_cmd=\$\((awk .*?README\.md)\)", awk.read_text()).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True)
    block = README.split("<!-- ci:test-command -->", 1)[1]
    assert out.stdout.strip() == re.search(r"```bash\n(.*?)\n", block).group(1).strip()
    assert "pytest" in out.stdout
