"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    result, scene = namespace["result"], namespace["scene"]
    assert result.background.shape == scene.image.shape
    assert namespace["mesh"].background.shape == scene.image.shape


def test_readme_quick_start_has_exactly_the_two_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert commands == ["pip install . && skymap demo", 'pip install ".[test]" && pytest -n 2']
